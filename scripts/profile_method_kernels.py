"""Each method's selection kernel by kernel on one GPU: where its compress stage goes (an investigation).

The compress stage is queued behind the vision tower, so what it costs is the GPU time of its kernels
plus whatever the host launches after its first synchronisation. This script queues a stand-in for the
tower, runs the selection under torch.profiler and prints, per method: kernels launched, their summed
GPU time, the host time of the call, and the kernels that take the most GPU time. Random features and
signals of LLaVA-OV's shape by default:

    python scripts/profile_method_kernels.py --methods visionzip,fastvid,holitom --shape 32,196,3584
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from count_method_ops import signals  # noqa: E402
from profile_methods_gpu import busy  # noqa: E402

from llava.model.compression import CompressionSpec  # noqa: E402
from llava.model.method_api import VideoTokens  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="vidcom2,visionzip,dycoke,fastvid,holitom")
    p.add_argument("--shape", default="32,196,3584", help="F,P,D")
    p.add_argument("--retention", type=float, default=0.35, help="0.35: above DyCoke's floor at 32 frames")
    p.add_argument("--family", default="llava_onevision")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    device = torch.device("cuda")
    frames, per_frame, dim = (int(v) for v in args.shape.split(","))
    side = int(per_frame**0.5)
    g = torch.Generator().manual_seed(0)
    scene = torch.randn(1, per_frame, dim, generator=g)
    features = (scene + 0.5 * torch.randn(frames, per_frame, dim, generator=g)).to(device, torch.bfloat16)
    sig = {k: v.to(device) for k, v in signals(frames, per_frame, g).items()}
    video = VideoTokens(features, (frames, side, per_frame // side), sig, args.family)
    for name in args.methods.split(","):
        spec = CompressionSpec(name, args.retention)
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
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        total = sum(e.device_time for e in kernels) / 1e3
        first = min(e.time_range.start for e in kernels)
        last = max(e.time_range.end for e in kernels)
        print(f"\n== {name}: {len(kernels)} kernels, {total:.3f} ms GPU summed, span {(last - first) / 1e3:.3f} ms, "
              f"host call {host_ms:.3f} ms (30 ms of busy work queued before)")
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e.name[:90], []).append(e.device_time / 1e3)
        ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[: args.top]
        for kernel, times in ranked:
            print(f"  {sum(times):7.3f} ms  x{len(times):3d}  {kernel}")


if __name__ == "__main__":
    main()
