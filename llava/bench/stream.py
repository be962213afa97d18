"""`vidcom2 bench --stream N`: samples per second of an evaluation-like stream, the way lmms-eval runs it.

What a researcher waits for is a whole benchmark, not one request. Here N synthetic samples (mp4 files
on disk, so reading is real) go through the path the lmms-eval wrappers take: a
:class:`llava.prefetch.Prefetch` runs each batch's host stage (the adapter's ``prepare_batch``: read,
decode, CPU preprocessing) on worker threads while the GPU answers the previous batch
(``answer_prepared``). ``--serial-baseline`` adds the uncompressed stream without prefetching
(``answer_batch`` on paths, reading on the critical path: what the wrappers did before).

Per case (model, frames, batch, max_new_tokens, method, R) one CSV row:

- samples_per_s = timed samples / wall seconds of the timed stream (after ``--warmup`` batches);
- latency_* = per sample, the seconds the stream spent on its batch: waiting for the reader plus the
  device stage (their sum over the stream is its wall time) - mean, p50, p90, p99;
- gpu_busy_fraction = seconds of the model stages (vision + compress + prefill + decode, timed with
  CUDA events by the adapters; launch gaps inside a stage count as busy) / wall; on a CPU the same
  figure is the model-stage fraction;
- reader_wait_fraction = seconds the stream waited for the reader / wall (0: reading fully hidden);
- peak allocated / reserved memory over the timed stream (CUDA only);
- the mean stage times per batch, visual tokens, and the environment, command, commit and date.

Answers are ``max_new_tokens`` long (EOS ignored): 1 to 4 are the multiple-choice regime, 32 a short
open answer. Names ``tiny_<arch>`` (e.g. tiny_llava_ov, tiny_qwen3_vl) run random tiny checkpoints on
the CPU in seconds (tests); the full-size names come from llava.bench.models.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llava.bench.efficiency import build_bench_llm, case_options, compiling_in_process, write_rows
from llava.bench.models import BenchModel, get_bench_model
from llava.bench.stream_cli import check_stream_arguments
from llava.model.compression import CompressionSpec
from llava.prefetch import Prefetch
from llava.runtime import FrameSampling, GenerationOptions, InferenceResult, VideoLLM

MODEL_STAGES = ("vision", "compress", "prefill", "decode")
STAGES = ("read_video", "preprocess", *MODEL_STAGES)
QUESTION = (
    "Question: What is the moving shape doing in the video?\nOptions:\n(A) It moves left.\n(B) It moves right.\n"
    "(C) It stays still.\n(D) It changes colour.\nAnswer with the option's letter from the given choices directly."
)


@dataclass(frozen=True)
class StreamCase:
    """One stream: a method at a retention, answers of ``max_new_tokens``, ``workers`` prefetch threads
    (0 = the serial baseline: answer_batch on paths, no prefetching)."""

    compressor: str
    retention: float
    frames: int
    batch: int
    max_new_tokens: int
    workers: int


@dataclass(frozen=True)
class StreamSample:
    index: int
    video: Path
    question: str


@dataclass
class StreamStats:
    """What a timed stream measured (seconds); ``first`` is one result, for token counts."""

    samples: int
    wall_s: float
    latencies_s: list[float]
    stage_s: dict[str, float]  # summed over batches
    batches: int
    wait_s: float
    peak_allocated_mib: float
    peak_reserved_mib: float
    reserved_at_start_mib: float
    first: InferenceResult
    output_tokens: list[int]


def stream_cases(
    compressors: Sequence[str],
    retentions: Sequence[float],
    frames: Sequence[int],
    batches: Sequence[int],
    answer_tokens: Sequence[int],
    workers: int,
    *,
    serial_baseline: bool = False,
) -> list[StreamCase]:
    """Per frames, batch and answer length: [the serial uncompressed stream], the uncompressed stream,
    then every method at every retention below 1 (a method at R = 1 is not a case)."""
    cases: list[StreamCase] = []
    methods = [c for c in compressors if c != "none"]
    for n_frames in frames:
        for batch in batches:
            for tokens in answer_tokens:
                if serial_baseline:
                    cases.append(StreamCase("none", 1.0, n_frames, batch, tokens, 0))
                cases.append(StreamCase("none", 1.0, n_frames, batch, tokens, workers))
                for method in methods:
                    cases.extend(StreamCase(method, r, n_frames, batch, tokens, workers) for r in retentions if r < 1.0)
    return cases


# ---------------------------------------------------------------------- inputs


def write_stream_videos(directory: Path, count: int, frames: int, size: int = 384, fps: int = 4) -> list[Path]:
    """``count`` different moving-pattern mp4s of ``frames`` frames (the pattern of `vidcom2 bench`'s
    video, shifted per file; content does not matter for speed, decoding does)."""
    from llava.synthetic_videos import write_mp4

    directory.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    t = np.arange(frames)[:, None, None]
    paths = []
    for k in range(count):
        base = ((xx[None] + (3 + k) * t) % 64 < 32) ^ ((yy[None] + (2 + k) * t + 7 * k) % 48 < 24)
        video = np.stack(
            [base * 200, (xx[None] + t + 31 * k) % 256 * np.ones_like(base), yy[None] * np.ones_like(base)]
        )
        path = directory / f"stream_{frames}f_{size}px_{k}.mp4"
        write_mp4(np.moveaxis(video, 0, -1).astype(np.uint8), path, fps)
        paths.append(path)
    return paths


def stream_samples(videos: Sequence[Path], count: int, question: str = QUESTION) -> list[StreamSample]:
    """``count`` samples cycling over ``videos``."""
    return [StreamSample(i, videos[i % len(videos)], question) for i in range(count)]


def batched(samples: Sequence[StreamSample], size: int) -> list[tuple[StreamSample, ...]]:
    return [tuple(samples[i : i + size]) for i in range(0, len(samples), size)]


# ---------------------------------------------------------------------- running one stream


def _describe(batch: tuple[StreamSample, ...]) -> str:
    return ", ".join(f"sample {s.index} ({s.video})" for s in batch)


def answer_stream(
    llm: VideoLLM,
    batches: Sequence[tuple[StreamSample, ...]],
    *,
    compression: CompressionSpec,
    generation: GenerationOptions,
    sampling: FrameSampling,
    workers: int,
    depth: int | None = None,
    on_batch: Callable[[int], None] = lambda n: None,
) -> Iterator[tuple[tuple[StreamSample, ...], list[InferenceResult], float, float]]:
    """(batch, its results, seconds the stream spent on it, of which waiting for the reader) per batch, in
    order. ``workers`` > 0: host stages prefetched on that many threads; 0: ``answer_batch`` on paths."""
    if workers == 0:
        for batch in batches:
            start = time.perf_counter()
            results = llm.answer_batch(
                [s.video for s in batch],
                [s.question for s in batch],
                compression=compression,
                generation=generation,
                sampling=sampling,
            )
            on_batch(len(batch))
            # the stream waits for the reader as long as the batch's read takes: it is on the critical path
            yield batch, results, time.perf_counter() - start, float(results[0].timings.get("read_video", 0.0))
        return

    def load(batch: tuple[StreamSample, ...]) -> Any:
        return llm.prepare_batch([s.video for s in batch], [s.question for s in batch], sampling, pin_memory=True)

    with Prefetch(batches, load, workers=workers, depth=depth, name="stream_read") as stream:
        asked = time.perf_counter()
        for fetched in stream:
            if not fetched.ok:
                raise ValueError(f"cannot prepare {_describe(fetched.item)}: {fetched.error}") from fetched.error
            results = llm.answer_prepared(fetched.value, compression=compression, generation=generation)
            done = time.perf_counter()
            on_batch(len(fetched.item))
            yield fetched.item, results, done - asked, fetched.wait_s
            asked = time.perf_counter()


def _memory_mib(device: torch.device) -> tuple[float, float]:
    if device.type != "cuda":
        return float("nan"), float("nan")
    return torch.cuda.max_memory_allocated(device) / 2**20, torch.cuda.max_memory_reserved(device) / 2**20


def _reset_memory(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_reserved(device) / 2**20


@compiling_in_process()
def run_stream(
    llm: VideoLLM,
    samples: Sequence[StreamSample],
    case: StreamCase,
    sampling: FrameSampling,
    *,
    compression: CompressionSpec,
    warmup: int = 1,
    depth: int | None = None,
    decode_mode: str = "auto",
    progress: Any = None,
) -> StreamStats:
    """Run ``warmup`` batches (untimed, the same path), then every sample; see the module docstring."""
    generation = GenerationOptions(max_new_tokens=case.max_new_tokens, ignore_eos=True, decode_mode=decode_mode)
    device = torch.device(llm.device)
    batches = batched(samples, case.batch)
    options = {"compression": compression, "generation": generation, "sampling": sampling, "workers": case.workers}
    for _ in answer_stream(llm, batches[: max(0, warmup)], depth=depth, **options):
        pass
    reserved_at_start = _reset_memory(device)
    latencies: list[float] = []
    stage_s = dict.fromkeys(STAGES, 0.0)
    wait_s = 0.0
    first: InferenceResult | None = None
    output_tokens: list[int] = []
    update = progress.update if progress is not None else (lambda n: None)
    start = time.perf_counter()
    for batch, results, seconds, waited in answer_stream(llm, batches, depth=depth, on_batch=update, **options):
        latencies.extend([seconds] * len(batch))
        wait_s += waited
        for stage in STAGES:  # a batch's timings are those of the whole batch (every result carries them)
            stage_s[stage] += float(results[0].timings.get(stage, 0.0))
        output_tokens.extend(len(r.output_ids) for r in results)
        first = first or results[0]
    wall = time.perf_counter() - start
    if first is None:
        raise ValueError("the stream needs at least one sample")
    alloc, reserved = _memory_mib(device)
    return StreamStats(
        samples=len(samples),
        wall_s=wall,
        latencies_s=latencies,
        stage_s=stage_s,
        batches=len(batches),
        wait_s=wait_s,
        peak_allocated_mib=alloc,
        peak_reserved_mib=reserved,
        reserved_at_start_mib=reserved_at_start,
        first=first,
        output_tokens=output_tokens,
    )


def _release_case_state(llm: VideoLLM) -> None:
    """What a case keeps for its shapes (static caches, captured graphs), dropped so the next case's
    peak memory is its own."""
    from llava.model.static_decode import release_static_decode
    from llava.model.vidcom2 import release_selection_graphs

    if isinstance(getattr(llm, "model", None), torch.nn.Module):
        release_static_decode(llm.model)
    release_selection_graphs()


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def stream_row(model: str, case: StreamCase, stats: StreamStats, options: dict[str, Any], depth: int | None) -> dict:
    """The CSV row of one stream (without the speedup, environment and label columns)."""
    lat = np.asarray(stats.latencies_s)
    per_batch = {s: stats.stage_s[s] / stats.batches for s in STAGES}
    model_s = sum(stats.stage_s[s] for s in MODEL_STAGES)
    first = stats.first
    return {
        "model": model,
        "compressor": case.compressor,
        "compressor_options": ";".join(f"{k}={v}" for k, v in sorted(options.items())),
        "retention": case.retention,
        "frames": case.frames,
        "batch": case.batch,
        "max_new_tokens": case.max_new_tokens,
        "samples": stats.samples,
        "prefetch_workers": case.workers,
        "prefetch_depth": "" if case.workers == 0 else (depth if depth is not None else 2 * case.workers),
        "samples_per_s": round(stats.samples / stats.wall_s, 4),
        "speedup_vs_uncompressed": "",  # filled by Speedups
        "speedup_vs_serial_uncompressed": "",
        "latency_mean_ms": _ms(float(lat.mean())),
        "latency_p50_ms": _ms(float(np.percentile(lat, 50))),
        "latency_p90_ms": _ms(float(np.percentile(lat, 90))),
        "latency_p99_ms": _ms(float(np.percentile(lat, 99))),
        "gpu_busy_fraction": round(model_s / stats.wall_s, 4),
        "reader_wait_fraction": round(stats.wait_s / stats.wall_s, 4),
        **{f"{s}_ms": _ms(per_batch[s]) for s in STAGES},
        "decode_ms_per_token": _ms(per_batch["decode"] / (case.max_new_tokens - 1)) if case.max_new_tokens > 1 else "",
        "visual_tokens_before": first.visual_tokens_before,
        "visual_tokens_after": first.visual_tokens_after,
        "achieved_retention": round(first.achieved_retention, 4),
        "layer_average_retention": round(first.layer_average_retention, 4),
        "output_tokens_mean": round(statistics.fmean(stats.output_tokens), 3),
        "peak_allocated_mib": round(stats.peak_allocated_mib, 1),
        "peak_reserved_mib": round(stats.peak_reserved_mib, 1),
        "reserved_at_start_mib": round(stats.reserved_at_start_mib, 1),
        "wall_s": round(stats.wall_s, 3),
    }


class Speedups:
    """Fills a row's speedups from the uncompressed rows seen before it (stream_cases runs them first).

    speedup_vs_uncompressed: samples/s over the uncompressed stream of the same model, frames, batch,
    answer length and prefetch workers; speedup_vs_serial_uncompressed: over the serial uncompressed
    stream (``--serial-baseline``) of the same model, frames, batch and answer length. Empty where that
    stream was not measured."""

    def __init__(self) -> None:
        self.base: dict[tuple, float] = {}

    def fill(self, row: dict[str, Any]) -> dict[str, Any]:
        key = (row["model"], row["frames"], row["batch"], row["max_new_tokens"])
        if row["compressor"] == "none":
            self.base[(*key, row["prefetch_workers"])] = row["samples_per_s"]
        same, serial = self.base.get((*key, row["prefetch_workers"])), self.base.get((*key, 0))
        row["speedup_vs_uncompressed"] = round(row["samples_per_s"] / same, 3) if same else ""
        row["speedup_vs_serial_uncompressed"] = round(row["samples_per_s"] / serial, 3) if serial else ""
        return row


# ---------------------------------------------------------------------- models


def _tiny(arch: str) -> BenchModel:
    """A random tiny checkpoint of ``arch`` (written to a temporary folder), loaded like any checkpoint."""

    from llava.families_index import load_video_llm, tiny_builders

    builders = tiny_builders()
    if arch not in builders:
        raise ValueError(f"unknown tiny model tiny_{arch}; valid: {', '.join('tiny_' + a for a in builders)}")

    def build(device: str, dtype: str, attn: str) -> VideoLLM:
        with tempfile.TemporaryDirectory(prefix=f"vidcom2_stream_tiny_{arch}_") as out:  # loaded into memory
            builders[arch](Path(out), seed=0)
            return load_video_llm(out, device=device, dtype=dtype, attn_implementation=attn)

    return BenchModel(f"tiny_{arch}", build, lambda frames: FrameSampling(num_frames=frames))


def stream_model(name: str) -> BenchModel:
    """A full-size benchmark model (llava.bench.models) or ``tiny_<arch>``."""
    if name.startswith("tiny_"):
        return _tiny(name[len("tiny_") :])
    return get_bench_model(name)


# ---------------------------------------------------------------------- the command


def run_stream_command(
    args: argparse.Namespace,
    *,
    models: list[BenchModel],
    compressors: list[str],
    attn: str,
    label: dict[str, str],
    command: str,
    vidcom2_options: dict[str, Any],
    method_options: dict[str, Any],
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every model's streams; each row is written to ``args.out`` as soon as it is measured (a run cut
    short keeps the rows it finished)."""
    from tqdm import tqdm

    samples_per_length = check_stream_arguments(args)
    cases = stream_cases(
        compressors,
        args.retentions,
        args.frames,
        args.batch_sizes,
        list(samples_per_length),
        args.prefetch_workers,
        serial_baseline=args.serial_baseline,
    )
    append = args.append
    speedups = Speedups()
    all_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vidcom2_stream_") as work:
        videos = {
            n: write_stream_videos(Path(work), args.distinct_videos, args.video_frames or n, args.video_size)
            for n in sorted({c.frames for c in cases})
        }
        for model in models:
            llm, env = build_bench_llm(
                model,
                args.device,
                args.dtype,
                attn,
                decode_mode=args.decode_mode,
                preprocess_device=args.preprocess_device,
                placement=getattr(args, "placement", None),
            )
            for case in cases:
                options = case_options(case, vidcom2_options, method_options)  # type: ignore[arg-type]
                spec = CompressionSpec(case.compressor, case.retention, options)
                samples = stream_samples(videos[case.frames], samples_per_length[case.max_new_tokens])
                desc = f"{model.name} {case.compressor}@{case.retention:g} tok={case.max_new_tokens} w={case.workers}"
                with tqdm(total=len(samples), unit="sample", desc=desc, disable=args.no_progress, leave=False) as bar:
                    stats = run_stream(
                        llm,
                        samples,
                        case,
                        model.sampling(case.frames),
                        compression=spec,
                        warmup=args.warmup,
                        depth=args.prefetch_depth,
                        decode_mode=args.decode_mode,
                        progress=bar,
                    )
                _release_case_state(llm)
                row = speedups.fill(stream_row(model.name, case, stats, options, args.prefetch_depth))
                row.update(env)
                used = stats.first.extra.get("decode_mode")
                if used and used != args.decode_mode:  # auto: the mode it resolved to
                    row["decode_mode"] = f"{args.decode_mode}:{used}"
                row.update(
                    video_frames=args.video_frames or case.frames,
                    video_size=args.video_size,
                    distinct_videos=args.distinct_videos,
                    warmup=args.warmup,
                    command=command,
                    **label,
                )
                write_rows([row], args.out, append=append)
                append = True
                all_rows.append(row)
                log(
                    f"{desc} b={case.batch} f={case.frames}: {row['samples_per_s']:.2f} samples/s "
                    f"(x{row['speedup_vs_uncompressed'] or 1:.2f} vs uncompressed), latency mean "
                    f"{row['latency_mean_ms']:.1f} p90 {row['latency_p90_ms']:.1f} ms, GPU busy "
                    f"{row['gpu_busy_fraction']:.2f}, reader wait {row['reader_wait_fraction']:.2f}, "
                    f"kept {row['visual_tokens_after']}/{row['visual_tokens_before']}"
                )
            del llm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return all_rows
