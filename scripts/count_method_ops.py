"""Count a method's dispatched ops and the host synchronisations among them, on the CPU.

The compress stage is queued behind the vision tower on the GPU: until the first host synchronisation its
kernels cost only GPU time; after it, every launch is exposed. So the counts that matter are the syncs and
the ops after the first one. Run on the CPU (no GPU needed), with random signals of the right shapes:

    python scripts/count_method_ops.py --methods vidcom2,visionzip,dycoke,fastvid,holitom --shape 32,196,3584
"""

from __future__ import annotations

import argparse

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from llava.model.compression import CompressionSpec
from llava.model.method_api import FRAME_GLOBAL, FRAME_SALIENCE, VIT_KEYS, VIT_RECEIVED_ATTENTION, VideoTokens

SYNC_OPS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "item", "equal")


class Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.syncs: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        self.ops.append(name)
        bool_index = name.startswith("index") and any(
            isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in a)
            for a in args
        )
        if bool_index or any(s in name for s in SYNC_OPS) or (name.startswith("repeat_interleave") and not kwargs):
            self.syncs.append(len(self.ops) - 1)
        return func(*args, **(kwargs or {}))


class HostReads(TorchFunctionMode):
    """Tensor.tolist() / .cpu() / .numpy() read device data without an aten op the dispatch mode sees."""

    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("tolist", "cpu", "numpy"):
            self.counter.ops.append(f"host_read.{func.__name__}")
            self.counter.syncs.append(len(self.counter.ops) - 1)
        return func(*args, **(kwargs or {}))


def signals(frames: int, per_frame: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        VIT_RECEIVED_ATTENTION: torch.rand(frames, per_frame, generator=generator),
        VIT_KEYS: torch.randn(frames, per_frame, 72, generator=generator),
        FRAME_SALIENCE: torch.rand(frames, per_frame, generator=generator),
        FRAME_GLOBAL: torch.randn(frames, 1152, generator=generator),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="vidcom2,visionzip,dycoke,fastvid,holitom")
    p.add_argument("--shape", default="32,196,3584", help="F,P,D")
    p.add_argument("--retention", type=float, default=0.35)
    p.add_argument("--family", default="llava_onevision")
    args = p.parse_args()
    frames, per_frame, dim = (int(v) for v in args.shape.split(","))
    side = int(per_frame**0.5)
    g = torch.Generator().manual_seed(0)
    scene = torch.randn(1, per_frame, dim, generator=g)
    features = (scene + 0.5 * torch.randn(frames, per_frame, dim, generator=g)).to(torch.bfloat16)
    video = VideoTokens(features, (frames, side, per_frame // side), signals(frames, per_frame, g), args.family)
    print(f"{'method':10} {'ops':>6} {'syncs':>6} {'ops after first sync':>21}")
    for name in args.methods.split(","):
        spec = CompressionSpec(name, args.retention, {"execution": "eager"} if name == "vidcom2" else {})
        counter = Counter()
        with counter, HostReads(counter):
            [choice] = spec.select_videos([video])
            choice.mask.sum().item()  # the adapters' one count read
        first = counter.syncs[0] if counter.syncs else len(counter.ops)
        print(f"{name:10} {len(counter.ops):6d} {len(counter.syncs):6d} {len(counter.ops) - first:21d}")


if __name__ == "__main__":
    main()
