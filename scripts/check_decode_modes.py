"""Decode modes on a full-size random-weight model: ms per token and agreement with eager (GPU check).

    python scripts/check_decode_modes.py [llava_ov_7b | qwen2_vl_7b | ...] [--tokens 64]

Prints, per decode_mode (eager, static, compiled): the best decode ms/token of 3 timed requests after
one untimed (compiling) request, the prefill time (must not move), and how many leading greedy ids
equal eager's (random weights give near-tied logits, so bf16 rounding differences may flip a late one).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from llava.bench.efficiency import write_bench_video
from llava.bench.models import get_bench_model
from llava.model.compression import CompressionSpec
from llava.runtime import GenerationOptions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="llava_ov_7b")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--frames", type=int, default=32)
    args = parser.parse_args()
    bench = get_bench_model(args.model)
    llm = bench.build("cuda", "bfloat16", "sdpa")
    video = write_bench_video(Path(tempfile.mkdtemp()) / "v.mp4", args.frames)
    spec, sampling, tokens = CompressionSpec("vidcom2", 0.25), bench.sampling(args.frames), args.tokens
    reference = None
    for mode in ("eager", "static", "compiled"):
        generation = GenerationOptions(max_new_tokens=tokens, ignore_eos=True, decode_mode=mode)
        runs = [
            llm.answer_batch([video], ["Describe the video."], compression=spec, generation=generation,
                             sampling=sampling)[0]
            for _ in range(4)
        ]
        ms = min(r.timings["decode"] for r in runs[1:]) * 1e3 / (tokens - 1)
        ids = runs[-1].output_ids
        reference = ids if reference is None else reference
        pairs = enumerate(zip(ids, reference, strict=False))
        same = next((i for i, (a, b) in pairs if a != b), min(len(ids), len(reference)))
        print(
            f"{args.model} {mode}: decode {ms:.2f} ms/token, prefill {runs[-1].timings['prefill'] * 1e3:.1f} ms, "
            f"first {same}/{len(reference)} ids equal to eager, first (compiling) request decode "
            f"{runs[0].timings['decode']:.1f} s"
        )


if __name__ == "__main__":
    main()
