"""Where the LLaVA compress STAGE spends its time inside the pipeline (a GPU investigation, not a test).

    python scripts/profile_compress_stage.py [--model llava_ov_7b --frames 32 --out DIR]

The selection op alone (scripts/bench_compress_op.py) runs on an idle GPU; in the pipeline it runs
right after the vision tower, timed by the StageTimer's CUDA events. This script builds the
full-size model with random weights and prints, per execution mode and compressor:
- the stage as the pipeline times it (events around compress_video, vision queued before it),
- the same call on an idle GPU,
- a split: selection only / selection + layout / whole stage,
- whether the GPU was still busy when the stage began (is the host ahead of the device?),
and writes a torch-profiler trace of a few pipeline iterations (``compress_trace.json``) plus the
CPU-side op table of the stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from llava.bench.models import get_bench_model
from llava.bench.timing import time_call_ms
from llava.model.compression import CompressionSpec
from llava.model.layout import build_layout
from llava.runtime import StageTimer


def pipeline_ms(model, pixels, stage, repeats: int = 20) -> tuple[float, float, float]:
    """Median event-timed ms of ``stage(features)`` queued right after the vision tower, the median
    host-side ms of the call, and the fraction of calls that began while the GPU was still busy."""
    times, host, busy = [], [], 0
    for _ in range(repeats):
        timer = StageTimer(model.device)
        with timer.stage("vision"):
            features = model.encode_video(pixels)
        busy += not torch.cuda.current_stream().query()
        t0 = time.perf_counter()
        with timer.stage("compress"):
            stage(features)
        host.append((time.perf_counter() - t0) * 1e3)
        times.append(timer.seconds["compress"] * 1e3)
    return statistics.median(times), statistics.median(host), busy / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llava_ov_7b")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    llm = get_bench_model(args.model).build("cuda", "bfloat16", "sdpa")
    model = llm.model
    side = model.spec.image_size
    pixels = torch.randn(args.frames, 3, side, side, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        features = model.encode_video(pixels)
        frames, h, w, dim = features.shape
        print(f"features {tuple(features.shape)} contiguous={features.is_contiguous()} "
              f"newline={model.spec.newline_position}")
        specs = {
            "none": CompressionSpec(),
            "uniform@0.25": CompressionSpec("uniform", 0.25),
        }
        for execution in ("compiled", "compiled_graph", "cuda_graph", "eager"):
            specs[f"vidcom2@0.25[{execution}]"] = CompressionSpec("vidcom2", 0.25, {"execution": execution})
        for name, spec in specs.items():

            def select(f, spec=spec):
                flat = f.reshape(frames, h * w, dim)
                if spec.is_identity:
                    return torch.arange(flat.shape[0] * flat.shape[1], device=f.device)
                return spec.keep_indices(flat)

            def select_layout(f, select=select):
                return build_layout(select(f), frames, h, w, model.spec.newline_position, llm.grid_newlines)

            def whole(f, spec=spec):
                return model.compress_video(f, spec, llm.grid_newlines)

            for _ in range(5):
                whole(features)
            idle = statistics.median(time_call_ms(lambda w=whole: w(features), "cuda") for _ in range(30))
            parts = {label: pipeline_ms(model, pixels, fn) for label, fn in
                     (("select", select), ("select+layout", select_layout), ("whole", whole))}
            print(f"{name:28s} idle {idle:6.3f} ms | in pipeline: " + " | ".join(
                f"{label} {ms:6.3f} ms (host {host:6.3f}, gpu busy at start {b:.0%})"
                for label, (ms, host, b) in parts.items()))

        spec = specs["vidcom2@0.25[compiled]"]  # the default
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                with record_function("vision"):
                    f = model.encode_video(pixels)
                with record_function("compress"):
                    model.compress_video(f, spec, llm.grid_newlines)
            torch.cuda.synchronize()
    args.out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(args.out / "compress_trace.json"))
    # CPU-side ops of compress_video alone (idle GPU), by self CPU time
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof2:
        for _ in range(20):
            model.compress_video(features, spec, llm.grid_newlines)
        torch.cuda.synchronize()
    table = prof2.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    print(table)
    (args.out / "compress_ops.txt").write_text(table)
    summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    (args.out / "compress_env.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
