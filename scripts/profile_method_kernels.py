"""Each method's selection kernel by kernel on one GPU: where its compress stage goes (an investigation).

The compress stage is queued behind the vision tower, so what it costs is the GPU time of its kernels
plus whatever the host launches after its first synchronisation. This script queues a stand-in for the
tower, runs the selection under torch.profiler and prints, per method: kernels launched, their summed
GPU time, the host time of the call, and the kernels that take the most GPU time. Random features and
signals of LLaVA-OV's shape by default; ``--stage MODEL`` profiles the LLaVA adapter's whole compress
stage instead (selection, table and layout), queued behind that full-size model's own vision tower
(random weights) on ``--frames`` random frames, with the stage's median event-timed ms:

    python scripts/profile_method_kernels.py --methods visionzip,fastvid,holitom --shape 32,196,3584
    python scripts/profile_method_kernels.py --stage llava_ov_7b --frames 32 --methods vidcom2,visionzip,dycoke
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_methods_gpu import add_selection_arguments, busy, random_video  # noqa: E402

from llava.model.compression import CompressionSpec  # noqa: E402


def method_spec(entry: str, retention: float) -> CompressionSpec:
    """``name`` or ``name@key=value;key=value`` (that method's options) -> its spec."""
    name, _, options = entry.partition("@")
    pairs = dict(item.split("=", 1) for item in options.split(";")) if options else {}
    return CompressionSpec(name, retention, {f"{name}.{k}": v for k, v in pairs.items()})


def report(name: str, prof: profile, host_ms: float, top: int, note: str, gap_count: int = 5) -> None:
    """Print the kernels the profiler saw: count, summed GPU time, span, the GPU's idle time between them
    (launch-bound stretches; its largest gaps and their neighbours) and the costliest names."""
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    total = sum(e.device_time for e in kernels) / 1e3
    first = min(e.time_range.start for e in kernels)
    last = max(e.time_range.end for e in kernels)
    print(f"\n== {name}: {len(kernels)} kernels, {total:.3f} ms GPU summed, span {(last - first) / 1e3:.3f} ms, "
          f"host call {host_ms:.3f} ms ({note})")
    ordered = sorted(kernels, key=lambda e: e.time_range.start)
    gaps = [(b.time_range.start - a.time_range.end, a.name[:40], b.name[:40]) for a, b in itertools.pairwise(ordered)]
    idle = sum(max(0.0, g) for g, _, _ in gaps) / 1e3
    print(f"  GPU idle between them {idle:.3f} ms; largest gaps:")
    for gap, before, after in sorted(gaps, reverse=True)[:gap_count]:
        print(f"  {gap / 1e3:7.3f} ms  after {before} / before {after}")
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time / 1e3)
    for kernel, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"  {sum(times):7.3f} ms  x{len(times):3d}  {kernel}")


def profile_stage(args: argparse.Namespace) -> None:
    """The LLaVA adapter's compress stage of each method behind the model's own vision tower."""
    from llava.bench.models import get_bench_model
    from llava.runtime import StageTimer

    llm = get_bench_model(args.stage).build("cuda", "bfloat16", "sdpa")
    model = llm.model
    side = model.spec.image_size
    pixels = torch.randn(args.frames, 3, side, side, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for entry in args.methods.split(","):
            spec, name = method_spec(entry, args.retention), entry

            def stage(spec: CompressionSpec = spec) -> tuple[Callable[[], object], StageTimer]:
                timer = StageTimer(model.device)
                with timer.stage("vision"):
                    features, sig = model.encode_video_with_signals(pixels, spec.tower_signals)
                return (lambda: model.compress_videos([features], spec, llm.grid_newlines, [sig])), timer

            for _ in range(3):
                compress, _ = stage()
                compress()
            times = []
            for _ in range(args.repeats):
                compress, timer = stage()
                with timer.stage("compress"):
                    compress()
                times.append(timer.seconds["compress"] * 1e3)
            compress, _ = stage()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                compress()
                host_ms = (time.perf_counter() - t0) * 1e3
                torch.cuda.synchronize()
            print(f"\n{name}@{args.retention:g}: compress stage {statistics.median(times):.3f} ms (median of "
                  f"{args.repeats}, CUDA events, behind the tower)")
            report(name, prof, host_ms, args.top, "the tower queued before", args.gaps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_selection_arguments(p)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--gaps", type=int, default=5, help="the largest idle gaps between kernels to list")
    p.add_argument("--stage", default=None, help="a bench model (e.g. llava_ov_7b): profile its compress stage")
    p.add_argument("--frames", type=int, default=32, help="with --stage")
    p.add_argument("--repeats", type=int, default=10, help="with --stage: timed stages")
    args = p.parse_args()
    if args.stage:
        profile_stage(args)
        return
    device = torch.device("cuda")
    video = random_video(args.shape, args.family, device)
    for name in args.methods.split(","):
        spec = method_spec(name, args.retention)
        for _ in range(3):
            spec.select_videos([video])[0].mask.sum().item()
        torch.cuda.synchronize()
        busy(30.0, device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            [choice] = spec.select_videos([video])
            int(choice.mask.sum())
            host_ms = (time.perf_counter() - t0) * 1e3
            torch.cuda.synchronize()
        report(name, prof, host_ms, args.top, "30 ms of busy work queued before", args.gaps)


if __name__ == "__main__":
    main()
