"""Where the time goes: per-stage timings of full-size models on one GPU, against the ideal.

Each case runs the adapter's own ``answer_batch`` (the path `vidcom2 infer` and lmms-eval use) on a
synthetic mp4, after warm-up, and keeps the median of the repeats per stage (the ideal prefill runs between
the repeats, so both see the same load on a shared host). Stage times come from
the adapters' StageTimer (CUDA events around each stage, read once per request). The 'ideal' of a case is
the same language model run on the kept length with no compression step: vision time of the
uncompressed run + prefill of a sequence as long as the compressed prompt. A row then states the
fraction of that ideal speedup it achieved.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llava.bench.models import BenchModel, text_prefill
from llava.bench.timing import time_call_ms
from llava.model.compression import CompressionSpec, options_for
from llava.model.static_decode import release_static_decode
from llava.model.vidcom2 import release_selection_graphs
from llava.placement import Placement
from llava.runtime import GenerationOptions, InferenceResult, VideoLLM

STAGES = ("read_video", "preprocess", "vision", "compress", "prefill", "decode")


@dataclass(frozen=True)
class Case:
    compressor: str
    retention: float
    frames: int
    batch: int


def sweep_cases(
    compressors: Iterable[str],
    retentions: Iterable[float],
    frames: Iterable[int],
    batches: Iterable[int],
    *,
    full: bool = False,
) -> list[Case]:
    """The cases to run. ``full`` is the whole cross product; otherwise the retention x compressor
    sweep runs at the first frame count and batch size, and the frame and batch sweeps compare only
    the uncompressed run with the first compressor at R = 0.25 (or the first retention below 1)."""
    compressors, retentions, frames, batches = list(compressors), list(retentions), list(frames), list(batches)
    methods = [c for c in compressors if c != "none"]
    below_one = [r for r in retentions if r < 1.0]
    cases: list[Case] = []

    def add(compressor: str, retention: float, n_frames: int, batch: int) -> None:
        case = Case(compressor, 1.0 if compressor == "none" else retention, n_frames, batch)
        if case not in cases:
            cases.append(case)

    grid_frames = frames if full else frames[:1]
    grid_batches = batches if full else batches[:1]
    for n_frames in grid_frames:
        for batch in grid_batches:
            add("none", 1.0, n_frames, batch)
            for compressor in methods:
                for retention in below_one:
                    add(compressor, retention, n_frames, batch)
    if not full and methods and below_one:
        anchor = 0.25 if 0.25 in below_one else below_one[0]
        for n_frames in frames[1:]:
            add("none", 1.0, n_frames, batches[0])
            add(methods[0], anchor, n_frames, batches[0])
        for batch in batches[1:]:
            add("none", 1.0, frames[0], batch)
            add(methods[0], anchor, frames[0], batch)
    return cases


def write_bench_video(path: Path, frames: int, size: int = 384, fps: int = 4) -> Path:
    """A moving-pattern mp4 of ``frames`` frames (content does not matter for speed; decoding does)."""
    from llava.synthetic_videos import write_mp4

    yy, xx = np.mgrid[0:size, 0:size]
    t = np.arange(frames)[:, None, None]
    base = ((xx[None] + 3 * t) % 64 < 32) ^ ((yy[None] + 2 * t) % 48 < 24)
    video = np.stack([base * 200, (xx[None] + t) % 256 * np.ones_like(base), yy[None] * np.ones_like(base)], -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(video.astype(np.uint8), path, fps)
    return path


def _memory(device: torch.device) -> tuple[float, float]:
    if device.type != "cuda":
        return float("nan"), float("nan")
    return torch.cuda.max_memory_allocated(device) / 2**20, torch.cuda.max_memory_reserved(device) / 2**20


def _reset_memory(device: torch.device) -> float:
    """Empty the allocator's cache and restart its peak counters; returns what stays reserved (MiB):
    memory held across requests (weights, captured graphs' pools and static buffers, caches)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_reserved(device) / 2**20


def prompt_tokens(result: InferenceResult) -> int:
    """The prompt length the LM prefilled (each family names it in its results' extra)."""
    return int(result.extra.get("prompt_tokens", result.extra.get("prompt_tokens_after", 0)))


def ttft_seconds(stages: dict[str, float]) -> float:
    """Time to first token from a case's stage medians: preprocessing to the first token (the video read is
    its own stage, outside it)."""
    return stages["preprocess"] + stages["vision"] + stages["compress"] + stages["prefill"]


@contextmanager
def compiling_in_process() -> Iterator[None]:
    """Have inductor compile in this process instead of its pool of worker processes.

    The pool is started by a process's first compilation and boots in the background (each worker imports
    torch), which takes longer than that compilation, so it competed for the host with the timed requests
    that followed: on Qwen3-VL, 8 frames, the compress stage took 0.60 ms right after the first compile and
    0.16 ms with the workers off or after two more warm-ups (H100, 2026-11-26). Steady-state serving has
    no booting workers; the bench measures that."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(compile_threads=1):
        yield


def case_options(
    case: Case, vidcom2_options: dict[str, Any] | None, method_options: dict[str, Any] | None
) -> dict[str, Any]:
    """A case's method options: bare VidCom2 knobs for the vidcom2 cases, ``method.knob`` ones for theirs."""
    options = dict(vidcom2_options or {}) if case.compressor == "vidcom2" else {}
    options.update(options_for(case.compressor, method_options or {}))
    return options


@compiling_in_process()
def run_case(
    llm: VideoLLM,
    model: BenchModel,
    video: Path,
    case: Case,
    *,
    decode_tokens: int,
    repeats: int,
    warmup: int,
    decode_mode: str = "eager",
    vidcom2_options: dict[str, Any] | None = None,
    method_options: dict[str, Any] | None = None,
    after_each: Callable[[InferenceResult], None] | None = None,
) -> tuple[dict[str, float], InferenceResult, float, float, float]:
    """Median seconds per stage over ``repeats`` runs after ``warmup``; peak allocated and reserved memory
    of the first timed run (the runs are identical), and the memory still reserved when it began (all MiB).
    ``after_each(result)`` runs after every timed run (the ideal prefill, interleaved so that both see the
    same host load).

    ``decode_mode`` "compiled" compiles on the first run of a shape: keep ``warmup`` >= 1 so it is not timed.
    Everything torch.compile compiles here compiles in this process (see :func:`compiling_in_process`).
    """
    spec = CompressionSpec(case.compressor, case.retention, case_options(case, vidcom2_options, method_options))
    generation = GenerationOptions(max_new_tokens=decode_tokens, ignore_eos=True, decode_mode=decode_mode)
    sampling = model.sampling(case.frames)
    device = torch.device(llm.device)

    def once() -> tuple[list[InferenceResult], float]:
        start = time.perf_counter()
        out = llm.answer_batch(
            [video] * case.batch,
            ["Describe the video."] * case.batch,
            compression=spec,
            generation=generation,
            sampling=sampling,
        )
        return out, time.perf_counter() - start

    for _ in range(warmup):
        once()
    reserved_at_start = _reset_memory(device)
    runs = [once()]
    peak_alloc, peak_reserved = _memory(device)  # read before after_each's work can add to them
    while True:
        if after_each is not None:
            after_each(runs[-1][0][0])
        if len(runs) == repeats:
            break
        runs.append(once())
    medians = {stage: statistics.median(r[0][0].timings.get(stage, 0.0) for r in runs) for stage in STAGES}
    medians["wall"] = statistics.median(r[1] for r in runs)
    return medians, runs[-1][0][0], peak_alloc, peak_reserved, reserved_at_start


@torch.inference_mode()
def ideal_prefill_seconds(llm: VideoLLM, length: int, batch: int, *, repeats: int, warmup: int) -> float:
    """Median seconds of the bare LM prefill on ``length`` tokens (random embeddings), CUDA events."""
    from llava.bench.models import hidden_size

    forward = text_prefill(llm)
    device = torch.device(llm.device)
    dtype = next(llm.model.parameters()).dtype
    embeds = torch.randn(batch, length, hidden_size(llm), device=device, dtype=dtype) * 0.02
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device)[None].expand(batch, -1)
    for _ in range(warmup):
        forward(embeds, mask, positions)
    times = [time_call_ms(lambda: forward(embeds, mask, positions), device) / 1e3 for _ in range(repeats)]
    return statistics.median(times)


def environment(device: torch.device, attn: str, dtype: str, decode_mode: str = "eager") -> dict[str, Any]:
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": attn,
        "dtype": dtype,
        "decode_mode": decode_mode,
        # the caching allocator's settings change reserved memory (e.g. expandable_segments:True)
        "cuda_alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
    }


def build_bench_llm(
    model: BenchModel,
    device: str,
    dtype: str,
    attn: str,
    *,
    decode_mode: str = "eager",
    preprocess_device: str | None = None,
    placement: Placement | None = None,
) -> tuple[VideoLLM, dict[str, Any]]:
    """The model's adapter, and the environment columns of its rows.

    ``preprocess_device`` moves a Qwen adapter's HF video processor there (QwenVideoLLM.preprocess_device);
    a model without that knob raises rather than ignoring it. A split ``placement`` builds the random
    weights on the CPU and dispatches them over its device map (``device_map`` column)."""
    split = placement is not None and placement.split
    llm = model.build("cpu" if split else device, dtype, attn)
    if split:
        from llava.families_index import place_adapter

        llm = place_adapter(llm, placement)
    if preprocess_device is not None:
        if not hasattr(llm, "preprocess_device"):
            raise ValueError(f"--preprocess-device: {model.name} has no CPU video processor to move (Qwen models do)")
        llm.preprocess_device = preprocess_device
    env = environment(torch.device(llm.device), attn, dtype, decode_mode)
    if split:  # only then: unsplit rows keep the columns of the CSVs they append to
        env["device_map"] = placement.describe()
    env["preprocess_device"] = getattr(llm, "preprocess_device", None) or (
        "cpu" if hasattr(llm, "preprocess_device") else str(llm.device)
    )
    return llm, env


def bench_model(
    model: BenchModel,
    cases: list[Case],
    *,
    device: str,
    dtype: str,
    attn: str,
    decode_tokens: int,
    repeats: int,
    warmup: int,
    work_dir: Path,
    command: str,
    log: Any = print,
    on_row: Any = None,
    decode_mode: str = "eager",
    vidcom2_options: dict[str, Any] | None = None,
    method_options: dict[str, Any] | None = None,
    preprocess_device: str | None = None,
    placement: Placement | None = None,
) -> list[dict[str, Any]]:
    """Build one model, run its cases, and return one CSV row per case (ideal columns included).
    ``preprocess_device``, ``placement``: see :func:`build_bench_llm`."""
    llm, env = build_bench_llm(
        model, device, dtype, attn, decode_mode=decode_mode, preprocess_device=preprocess_device, placement=placement
    )
    videos = {n: write_bench_video(work_dir / f"bench_{n}f.mp4", n) for n in sorted({c.frames for c in cases})}
    baseline: dict[tuple[int, int], dict[str, float]] = {}
    rows = []
    for case in sorted(cases, key=lambda c: (c.frames, c.batch, c.compressor != "none", -c.retention)):
        ideal_times: list[float] = []

        def ideal_after(
            result: InferenceResult, batch: int = case.batch, times: list[float] = ideal_times, llm: VideoLLM = llm
        ) -> None:
            times.append(ideal_prefill_seconds(llm, prompt_tokens(result), batch, repeats=1, warmup=0 if times else 1))

        stages, result, alloc, reserved, reserved_at_start = run_case(
            llm,
            model,
            videos[case.frames],
            case,
            decode_tokens=decode_tokens,
            repeats=repeats,
            warmup=warmup,
            decode_mode=decode_mode,
            vidcom2_options=vidcom2_options,
            method_options=method_options,
            after_each=ideal_after,
        )
        if isinstance(getattr(llm, "model", None), torch.nn.Module):
            release_static_decode(llm.model)  # kept static caches would count in the next case's peak memory
        release_selection_graphs()  # likewise the captured selection graphs of this case's shape
        ttft, total = ttft_seconds(stages), sum(stages[s] for s in STAGES)
        prompt_length = prompt_tokens(result)
        ideal_prefill = statistics.median(ideal_times)  # the bare LM on prompt_length tokens, between the timed runs
        key = (case.frames, case.batch)
        if case.compressor == "none":
            baseline[key] = {"ttft": ttft, "prefill": stages["prefill"], "alloc": alloc}
        base = baseline.get(key)
        ideal_ttft = stages["preprocess"] + stages["vision"] + ideal_prefill
        row: dict[str, Any] = {
            "model": model.name,
            "compressor": case.compressor,
            "compressor_options": ";".join(
                f"{k}={v}" for k, v in sorted(case_options(case, vidcom2_options, method_options).items())
            ),
            "retention": case.retention,
            "frames": case.frames,
            "batch": case.batch,
            "visual_tokens_before": result.visual_tokens_before,
            "visual_tokens_after": result.visual_tokens_after,
            "achieved_retention": round(result.achieved_retention, 4),
            "layer_average_retention": round(result.layer_average_retention, 4),
            "prompt_tokens": prompt_length,
            **{f"{s}_ms": round(stages[s] * 1e3, 3) for s in STAGES},
            "decode_ms_per_token": round(stages["decode"] * 1e3 / max(1, decode_tokens - 1), 3),
            "ttft_ms": round(ttft * 1e3, 3),
            "end_to_end_ms": round(total * 1e3, 3),
            "samples_per_s": round(case.batch / total, 4),
            "compress_pct_of_ttft": round(100 * stages["compress"] / ttft, 3),
            "ideal_prefill_ms": round(ideal_prefill * 1e3, 3),
            "ideal_ttft_ms": round(ideal_ttft * 1e3, 3),
            "prefill_speedup": round(base["prefill"] / stages["prefill"], 3) if base else "",
            "ttft_speedup": round(base["ttft"] / ttft, 3) if base else "",
            "ideal_ttft_speedup": round(base["ttft"] / ideal_ttft, 3) if base else "",
            "fraction_of_ideal_speedup": (
                round((base["ttft"] - ttft) / (base["ttft"] - ideal_ttft), 3)
                if base and base["ttft"] - ideal_ttft > 1e-9
                else ""
            ),
            "peak_allocated_mib": round(alloc, 1),
            "peak_reserved_mib": round(reserved, 1),
            "reserved_at_start_mib": round(reserved_at_start, 1),
            "peak_vs_uncompressed": round(alloc / base["alloc"], 4) if base and base["alloc"] == base["alloc"] else "",
            "decode_tokens": decode_tokens,
            "repeats": repeats,
            **env,
            "command": command,
        }
        rows.append(row)
        if on_row is not None:  # e.g. write it now: a run cut short keeps the rows it finished
            on_row(row)
        log(
            f"{model.name} {case.compressor}@{case.retention:g} f={case.frames} b={case.batch}: "
            f"vision {row['vision_ms']:.1f} compress {row['compress_ms']:.2f} prefill {row['prefill_ms']:.1f} "
            f"(ideal {row['ideal_prefill_ms']:.1f}) ttft {row['ttft_ms']:.1f} decode/tok "
            f"{row['decode_ms_per_token']:.1f} peak {row['peak_allocated_mib']:.0f} MiB "
            f"kept {row['visual_tokens_after']}/{row['visual_tokens_before']}"
        )
    del llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def write_rows(rows: list[dict[str, Any]], path: Path, *, append: bool = False) -> None:
    """Write (or append) CSV rows; appending to a file whose header has other columns raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exists = append and path.exists() and path.stat().st_size > 0
    if exists:
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
        if header != list(rows[0]):
            raise ValueError(
                f"cannot append to {path}: its columns differ (missing {sorted(set(rows[0]) - set(header))}, "
                f"extra {sorted(set(header) - set(rows[0]))}); write a new file"
            )
    with path.open("a" if exists else "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if not exists:
            writer.writeheader()
        writer.writerows(rows)
