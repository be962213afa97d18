"""Which allocations grow reserved GPU memory in one steady-state request (a GPU investigation, not a test).

    python scripts/trace_reserved_memory.py [--model qwen2_vl_7b --frames 8 --compressors none,vidcom2,random]

Builds the full-size model with random weights (as `vidcom2 bench` does, Qwen with the fast settings),
runs two warm-up requests per compressor, empties the allocator's cache, and records the allocator's
history of one more request. Prints every new memory segment (size, running reserved total, and the
Python frames that asked for it): where a compressed run reserves more than the uncompressed one.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from llava.bench.efficiency import build_bench_llm, write_bench_video
from llava.bench.models import get_bench_model
from llava.model.compression import CompressionSpec
from llava.model.vidcom2 import release_selection_graphs
from llava.runtime import GenerationOptions


def python_frames(frames: list[dict]) -> list[str]:
    ours = [f for f in frames if f["filename"].endswith(".py") and "/torch/" not in f["filename"]]
    return [f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in ours[:4]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2_vl_7b")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--retention", type=float, default=0.25)
    parser.add_argument("--compressors", default="none,vidcom2,random")
    args = parser.parse_args()
    model = get_bench_model(args.model)
    fast = args.model.startswith("qwen")
    attn, preprocess = ("sdpa_varlen", "cuda") if fast else ("sdpa", None)
    llm, _ = build_bench_llm(model, "cuda", "bfloat16", attn, preprocess_device=preprocess)
    video = write_bench_video(Path(tempfile.mkdtemp()) / f"bench_{args.frames}f.mp4", args.frames)
    generation = GenerationOptions(max_new_tokens=16, ignore_eos=True)

    def request(spec: CompressionSpec) -> None:
        with torch.inference_mode():
            llm.answer_batch(
                [video], ["Describe the video."], compression=spec, generation=generation,
                sampling=model.sampling(args.frames),
            )

    for name in args.compressors.split(","):
        release_selection_graphs()  # an earlier compressor's captured graphs are not this one's to hold
        spec = CompressionSpec(name, 1.0 if name == "none" else args.retention)
        request(spec)
        request(spec)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        level = torch.cuda.memory_reserved()
        print(f"== {name}: {level / 2**20:.0f} MiB reserved at the start (held between requests)")
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
        request(spec)
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        for trace in snapshot["device_traces"]:
            for event in trace:
                if event["action"] in ("segment_alloc", "segment_map"):
                    level += event["size"]
                    print(f"  new segment {event['size'] / 2**20:6.1f} MiB -> {level / 2**20:8.0f} MiB  "
                          f"{python_frames(event.get('frames', []))}")
        print(f"   peak reserved {torch.cuda.max_memory_reserved() / 2**20:.0f} MiB, "
              f"peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
