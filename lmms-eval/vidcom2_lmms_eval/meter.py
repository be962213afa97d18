"""Efficiency meter: one record per sample, aggregated over all ranks and per task.

Why our own meter: lmms-eval's throughput log is rank-0 only and times the whole generate call.
Here every rank keeps its per-sample records (stage seconds, visual tokens before/after, peak
memory); at the end the records of all ranks are gathered to rank 0, which aggregates them (sum of
times, max of peaks, counts) and writes ``<stamp>_vidcom2_meter.json`` plus the per-sample
``<stamp>_vidcom2_meter_samples.jsonl`` next to lmms-eval's results.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llava.runtime import STAGES

STATUSES = ("ok", "failed", "cached")


@dataclass
class SampleRecord:
    """Efficiency figures of one answered (or failed) request."""

    task: str
    doc_id: int | str
    rank: int
    status: str = "ok"
    timings: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    tokens_before: int = 0
    tokens_after: int = 0
    output_tokens: int = 0
    frames: int | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    batch_size: int = 1
    error: str | None = None
    video: str | None = None
    layer_average_retention: float | None = None  # video tokens entering each LM layer, averaged, over those before

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"SampleRecord.status={self.status!r} is not one of {STATUSES}")


class PeakMemory:
    """Per-sample CUDA peaks (allocated and reserved); None on CPU, where torch keeps no peaks.

    ``devices``: every GPU a split model (llava.placement) runs on; the peaks are summed over them (the
    request's footprint on the host). Default: ``device`` alone."""

    def __init__(self, device: torch.device, devices: tuple[torch.device, ...] = ()) -> None:
        self.devices = tuple(d for d in (devices or (device,)) if d.type == "cuda")
        self.cuda = bool(self.devices) and torch.cuda.is_available()
        self.device = device

    def reset(self) -> None:
        if self.cuda:
            for device in self.devices:
                torch.cuda.reset_peak_memory_stats(device)

    def read(self) -> tuple[int | None, int | None]:
        if not self.cuda:
            return None, None
        allocated = sum(int(torch.cuda.max_memory_allocated(d)) for d in self.devices)
        return allocated, sum(int(torch.cuda.max_memory_reserved(d)) for d in self.devices)


def _max_or_none(values: list[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def summarize(records: list[SampleRecord]) -> dict[str, Any]:
    """Totals over ``records``: sums of seconds and tokens, max of peaks, counts by status and rank."""
    stage_sums = {s: 0.0 for s in STAGES}
    for r in records:
        for stage, seconds in r.timings.items():
            stage_sums[stage] = stage_sums.get(stage, 0.0) + float(seconds)
    measured = [r for r in records if r.status == "ok"]
    before = sum(r.tokens_before for r in records if r.status != "failed")
    after = sum(r.tokens_after for r in records if r.status != "failed")
    layered = [r for r in records if r.status != "failed" and r.layer_average_retention is not None]
    layered_before = sum(r.tokens_before for r in layered)
    ranks: dict[str, int] = {}
    for r in records:
        ranks[str(r.rank)] = ranks.get(str(r.rank), 0) + 1
    n_ok = len(measured)
    wall = sum(r.wall_s for r in records)
    return {
        "samples": len(records),
        "ok": n_ok,
        "failed": sum(r.status == "failed" for r in records),
        "cached": sum(r.status == "cached" for r in records),
        "samples_per_rank": dict(sorted(ranks.items())),
        "stage_seconds_sum": stage_sums,
        "wall_seconds_sum": wall,
        "wall_seconds_mean": wall / len(records) if records else None,
        "prefill_seconds_mean": (sum(r.timings.get("prefill", 0.0) for r in measured) / n_ok) if n_ok else None,
        "visual_tokens_before_sum": before,
        "visual_tokens_after_sum": after,
        "achieved_retention": after / before if before else None,
        # token-weighted like achieved_retention; None unless every measured record reports it (older caches do not)
        "layer_average_retention": (
            sum(r.layer_average_retention * r.tokens_before for r in layered) / layered_before
            if layered_before and len(layered) == sum(r.status != "failed" for r in records)
            else None
        ),
        "output_tokens_sum": sum(r.output_tokens for r in records),
        "peak_allocated_bytes_max": _max_or_none([r.peak_allocated_bytes for r in records]),
        "peak_reserved_bytes_max": _max_or_none([r.peak_reserved_bytes for r in records]),
    }


def aggregate(records: list[SampleRecord]) -> dict[str, Any]:
    """Overall and per-task summaries of the records of every rank."""
    tasks = sorted({r.task for r in records})
    return {
        "overall": summarize(records),
        "per_task": {t: summarize([r for r in records if r.task == t]) for t in tasks},
    }


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, so a timing row is never separated from what produced it."""
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    from llava.bench import source_commit

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else None
    return {
        "commit": source_commit(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "lmms_eval": version("lmms_eval"),
        "vidcom2_toolkit": version("vidcom2-toolkit"),
        "python": platform.python_version(),
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
    }


class EfficiencyMeter:
    """Collects SampleRecords on one rank; :meth:`finalize` gathers every rank and writes on rank 0."""

    def __init__(
        self, device: torch.device, run_info: dict[str, Any], devices: tuple[torch.device, ...] = ()
    ) -> None:
        self.records: list[SampleRecord] = []
        self.memory = PeakMemory(device, devices)
        self.device = device
        self.run_info = run_info
        self.started = time.time()

    def add(self, record: SampleRecord) -> None:
        self.records.append(record)

    def gather(self) -> list[SampleRecord]:
        """Records of all ranks (on every rank); a no-op without an initialised process group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return list(self.records)
        gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [asdict(r) for r in self.records])
        return [SampleRecord(**d) for part in gathered for d in (part or [])]

    def finalize(self, out_dir: Path | None, rank: int, world_size: int) -> Path | None:
        """Gather, aggregate and (rank 0) write the JSON summary and per-sample JSONL; returns the JSON path."""
        records = self.gather()
        if rank != 0 or out_dir is None:
            return None
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(self.started))
        path = out_dir / f"{stamp}_vidcom2_meter.json"
        summary = {
            "schema": "vidcom2-meter/1",
            # elapsed: from the wrapper's construction (model loaded) to the end of the last rank's last request
            "run": {**self.run_info, "world_size": world_size, "elapsed_seconds": time.time() - self.started},
            "environment": environment(self.device),
            **aggregate(records),
        }
        path.write_text(json.dumps(summary, indent=2, default=str))
        with (out_dir / f"{stamp}_vidcom2_meter_samples.jsonl").open("w") as fh:
            for r in records:
                fh.write(json.dumps(asdict(r), default=str) + "\n")
        return path
