"""Where a short compressed prefill loses time against its ideal (a GPU investigation, not a test).

    python scripts/profile_prefill_gap.py --models llava_ov_7b,qwen2_vl_7b --frames 8 [--out DIR]

A prefill of a few hundred tokens is launch-bound, so host work between the selection's sync and the
first layer's launch adds to TTFT one for one. Per model and method (none, vidcom2 at R = 0.25) this prints
the median over timed requests of: the pipeline's prefill stage (CUDA events), the host seconds of
building the LM inputs and of the driver's prefill (its launches), whether the GPU was idle when each began,
then the driver alone on random embeddings of the same length and the bare LM (the bench's ideal), and
the CPU op table of one request's prefill stage.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from llava.bench.efficiency import ideal_prefill_seconds, prompt_tokens, write_bench_video
from llava.bench.models import get_bench_model, hidden_size
from llava.bench.timing import time_call_ms
from llava.model import lm_driver
from llava.model.compression import CompressionSpec
from llava.runtime import GenerationOptions

HOST: dict[str, list[float]] = defaultdict(list)
IDLE: dict[str, list[bool]] = defaultdict(list)


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` recording its host seconds (no sync) and whether the GPU was idle when it was called."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        IDLE[name].append(torch.cuda.current_stream().query())
        start = time.perf_counter()
        with record_function(name):
            out = fn(*args, **kwargs)
        HOST[name].append((time.perf_counter() - start) * 1e3)
        return out

    return wrapper


def patch(llm: Any) -> tuple[Any, Callable[[], Any]]:
    """Wrap the family's input builders and the driver's prefill; returns (decoder stack, undo)."""
    undo: list[Callable[[], None]] = []

    def swap(owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        setattr(owner, attr, timed(name, original))
        undo.append(lambda: setattr(owner, attr, original))

    swap(lm_driver, "prefill", "driver_prefill")
    if hasattr(llm, "processor"):
        from transformers_patched import qwen_stages

        swap(qwen_stages, "build_prefill", "build_prefill")
        swap(qwen_stages, "lm_inputs", "lm_inputs")
        stack = qwen_stages.qwen_stack(llm.model)
    else:
        from llava.model.generate import llava_stack

        swap(llm.model, "build_inputs", "build_inputs")
        stack = llava_stack(llm.model.language_model)
    return stack, lambda: [u() for u in reversed(undo)]


def random_inputs(llm: Any, stack: Any, length: int) -> lm_driver.LMInputs:
    device = torch.device(llm.device)
    dtype = next(llm.model.parameters()).dtype
    rows = stack.rope_rows
    positions = torch.arange(length, device=device)[None, None].expand(rows, 1, -1).contiguous()
    return lm_driver.LMInputs(
        embeds=torch.randn(1, length, hidden_size(llm), device=device, dtype=dtype) * 0.02,
        valid=torch.ones(1, length, dtype=torch.bool, device=device),
        positions=positions,
        next_position=torch.full((rows, 1), length, device=device),
        visual=torch.zeros(1, length, dtype=torch.bool, device=device),
        lengths=(length,),
        visual_counts=(0,),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="llava_ov_7b,qwen2_vl_7b")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    video = write_bench_video(Path(tempfile.mkdtemp()) / "v.mp4", args.frames)
    for name in args.models.split(","):
        profile_model(name, args, video)
        torch.cuda.empty_cache()


def profile_model(name: str, args: argparse.Namespace, video: Path) -> None:
    """Print the figures of the module docstring for ``name`` and write its op tables under ``args.out``."""
    generation = GenerationOptions(max_new_tokens=1, ignore_eos=True)
    bench = get_bench_model(name)
    llm = bench.build("cuda", "bfloat16", args.attn)
    sampling = bench.sampling(args.frames)
    stack, undo = patch(llm)
    for spec in (CompressionSpec("none", 1.0), CompressionSpec("vidcom2", 0.25)):

        def request(spec: CompressionSpec = spec) -> Any:
            return llm.answer_batch(
                [video], ["Describe the video."], compression=spec, generation=generation, sampling=sampling
            )[0]

        for _ in range(3):
            request()
        HOST.clear()
        IDLE.clear()
        results = [request() for _ in range(args.repeats)]
        stage = {s: statistics.median(r.timings[s] for r in results) * 1e3 for s in ("compress", "prefill")}
        length = prompt_tokens(results[-1])
        host = {k: statistics.median(v) for k, v in HOST.items()}
        idle = {k: sum(v) / len(v) for k, v in IDLE.items()}
        inputs = random_inputs(llm, stack, length)

        def driver_once(inputs: lm_driver.LMInputs = inputs) -> Any:
            return lm_driver.prefill(stack, inputs, room=1)

        with torch.inference_mode():
            for _ in range(3):
                driver_once()
            driver = statistics.median(time_call_ms(driver_once, llm.device) for _ in range(15))
        ideal = ideal_prefill_seconds(llm, length, 1, repeats=15, warmup=3) * 1e3
        print(
            f"{name} {spec.compressor} L={length}: compress {stage['compress']:.2f} ms, prefill stage "
            f"{stage['prefill']:.2f} ms; host ms {', '.join(f'{k} {v:.2f}' for k, v in host.items())}; "
            f"GPU idle at start {', '.join(f'{k} {v:.0%}' for k, v in idle.items())}; driver alone "
            f"{driver:.2f} ms; bare LM (ideal) {ideal:.2f} ms",
            flush=True,
        )
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            request()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (args.out / f"prefill_ops_{name}_{spec.compressor}.txt").write_text(table)
    undo()


if __name__ == "__main__":
    main()
