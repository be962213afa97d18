"""Each method's selection on one GPU, timed as the compress stage sees it: queued behind busy GPU work.

The pipelines queue the selection right behind the vision tower, so until its first host sync it costs
only GPU time. Here a stand-in for the tower (a run of bf16 matrix products, ~30 ms) is queued first,
then the selection and the adapters' count read; CUDA events bracket the selection as the stage timer
does. Also reports the selection alone on an idle GPU (host-bound). Random features and signals of
LLaVA-OV's shape by default. Writes one CSV row per method:

    python scripts/profile_methods_gpu.py --methods vidcom2,visionzip,dycoke,fastvid,holitom --out ops.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from count_method_ops import signals  # noqa: E402

from llava.model.compression import CompressionSpec  # noqa: E402
from llava.model.method_api import VideoTokens  # noqa: E402


def busy(ms: float, device: torch.device) -> None:
    """Queue about ``ms`` of matrix products (the vision tower's stand-in)."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    for _ in range(max(1, int(ms / 0.18))):
        a = a @ a
        a = a / a.norm()


def random_video(shape: str, family: str, device: torch.device) -> VideoTokens:
    """"F,P,D" -> one bf16 video on ``device``: a shared scene plus per-frame noise, random signals (seed 0)."""
    frames, per_frame, dim = (int(v) for v in shape.split(","))
    side = int(per_frame**0.5)
    g = torch.Generator().manual_seed(0)
    scene = torch.randn(1, per_frame, dim, generator=g)
    features = (scene + 0.5 * torch.randn(frames, per_frame, dim, generator=g)).to(device, torch.bfloat16)
    sig = {k: v.to(device) for k, v in signals(frames, per_frame, g).items()}
    return VideoTokens(features, (frames, side, per_frame // side), sig, family)


def time_selection(spec: CompressionSpec, video: VideoTokens, behind_ms: float) -> float:
    device = video.features.device
    if behind_ms:
        busy(behind_ms, device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    [choice] = spec.select_videos([video])
    count = int(choice.mask.sum())  # the adapters' one count read
    end.record()
    end.synchronize()
    assert count > 0
    return start.elapsed_time(end)


def add_selection_arguments(p: argparse.ArgumentParser) -> None:
    """What both method profilers take: the methods, the random video's shape and family, R."""
    p.add_argument("--methods", default="vidcom2,visionzip,dycoke,fastvid,holitom")
    p.add_argument("--shape", default="32,196,3584", help="F,P,D")
    p.add_argument("--retention", type=float, default=0.35, help="0.35: above DyCoke's floor at 32 frames")
    p.add_argument("--family", default="llava_onevision")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_selection_arguments(p)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    video = random_video(args.shape, args.family, device)
    features, sig = video.features, video.signals
    rows = []
    for name in args.methods.split(","):
        spec = CompressionSpec(name, args.retention)
        for _ in range(3):  # warm-up (compilation, caches)
            time_selection(spec, video, 0)
        cpu_video = VideoTokens(features.cpu().float(), video.grid, {k: v.cpu() for k, v in sig.items()}, args.family)
        gpu_float = VideoTokens(features.float(), video.grid, sig, args.family)
        same = torch.equal(spec.select_videos([cpu_video])[0].mask, spec.select_videos([gpu_float])[0].mask.cpu())
        behind = statistics.median(time_selection(spec, video, 30.0) for _ in range(args.repeats))
        idle = statistics.median(time_selection(spec, video, 0.0) for _ in range(args.repeats))
        rows.append(
            {
                "method": name,
                "shape": args.shape,
                "retention": args.retention,
                "behind_tower_ms": round(behind, 3),
                "idle_gpu_ms": round(idle, 3),
                "float32_sources_equal_cpu": same,
                "gpu": torch.cuda.get_device_name(device),
                "torch": torch.__version__,
                "command": "python scripts/profile_methods_gpu.py " + " ".join(sys.argv[1:]),
            }
        )
        print(f"{name:10} behind the tower {behind:7.3f} ms   idle GPU {idle:7.3f} ms   float32 = CPU: {same}")
    if args.out is not None:
        with args.out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
