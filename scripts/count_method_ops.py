"""Count a method's dispatched ops and the host synchronisations among them, on the CPU.

The compress stage is queued behind the vision tower on the GPU: until the first host read its kernels
cost only GPU time; after it, every launch is exposed unless the GPU still has queued work to do (the
methods that read early, FastVID and HoliTom, queue their heavy work before they wait). So the counts
that matter are the syncs, the kernels before the first read (GPU time) and the ops after it (host
launches). Run on the CPU (no GPU needed), with random signals of the right shapes:

    python scripts/count_method_ops.py --methods vidcom2,visionzip,dycoke,fastvid,holitom --shape 32,196,3584

Columns: all aten ops, host reads (syncs), ops after the first read, kernels (aten ops that launch work,
views excluded) before and after it, and the CPU time of one selection (median of ``--repeats``).
``--global-spread S`` draws the frame globals near one direction (spread S) instead of independently, so
that FastVID's DySeg finds multi-frame segments (independent globals cut at every frame). HoliTom counts
its device formulation of the static means (``holitom.GROUPED_CPU_MEANS`` off: the CPU-only grouping
reads the windows on the host, free there but not what CUDA runs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from llava.model import holitom
from llava.model.compression import CompressionSpec
from llava.model.method_api import FRAME_GLOBAL, FRAME_SALIENCE, VIT_KEYS, VIT_RECEIVED_ATTENTION, VideoTokens

SYNC_OPS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "item", "equal")
VIEW_OPS = frozenset({
    "view", "_unsafe_view", "slice", "select", "unsqueeze", "squeeze", "expand", "transpose", "t", "permute",
    "alias", "as_strided", "lift_fresh", "detach", "split_with_sizes", "split", "unbind", "_reshape_alias",
    "narrow", "diagonal", "unfold", "view_as", "expand_as", "scalar_tensor",
})  # no kernel of their own (scalar_tensor: a host scalar)


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


def kernels(ops: list[str]) -> int:
    """The ops among ``ops`` that launch work (views, host scalars and host reads excluded)."""
    return sum(1 for op in ops if op.split(".")[0] not in VIEW_OPS and not op.startswith("host_read"))


def signals(
    frames: int, per_frame: int, generator: torch.Generator, spread: float | None = None
) -> dict[str, torch.Tensor]:
    """Random signals of one video; ``spread``: frame globals near one direction (None: independent)."""
    sig = {
        VIT_RECEIVED_ATTENTION: torch.rand(frames, per_frame, generator=generator),
        VIT_KEYS: torch.randn(frames, per_frame, 72, generator=generator),
        FRAME_SALIENCE: torch.rand(frames, per_frame, generator=generator),
        FRAME_GLOBAL: torch.randn(frames, 1152, generator=generator),
    }
    if spread is not None:
        sig[FRAME_GLOBAL] = torch.randn(1, 1152, generator=generator) + spread * sig[FRAME_GLOBAL]
    return sig


def method_options(name: str, options: str) -> dict[str, str]:
    """``method.key=value,...`` -> the options of method ``name`` (the others' are dropped)."""
    out = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        method, _, knob = key.partition(".")
        if method == name:
            out[knob] = value
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="vidcom2,visionzip,dycoke,fastvid,holitom")
    p.add_argument("--shape", default="32,196,3584", help="F,P,D")
    p.add_argument("--retention", type=float, default=0.35)
    p.add_argument("--family", default="llava_onevision")
    p.add_argument("--global-spread", type=float, default=None, help="frame globals near one direction")
    p.add_argument("--options", default="", help="method.key=value,... (e.g. fastvid.variant=qwen)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    holitom.GROUPED_CPU_MEANS = False  # count the formulation CUDA runs
    frames, per_frame, dim = (int(v) for v in args.shape.split(","))
    side = int(per_frame**0.5)
    g = torch.Generator().manual_seed(0)
    scene = torch.randn(1, per_frame, dim, generator=g)
    features = (scene + 0.5 * torch.randn(frames, per_frame, dim, generator=g)).to(torch.bfloat16)
    sig = signals(frames, per_frame, g, args.global_spread)
    video = VideoTokens(features, (frames, side, per_frame // side), sig, args.family)
    print(f"{'method':10} {'ops':>5} {'syncs':>5} {'ops after':>9} {'kernels before':>14} {'kernels after':>13} "
          f"{'cpu ms':>8}")
    for name in args.methods.split(","):
        options = method_options(name, args.options)
        if name == "vidcom2":
            options.setdefault("execution", "eager")
        spec = CompressionSpec(name, args.retention, options)
        spec.select_videos([video])  # warm-up
        counter = Counter()
        with counter, HostReads(counter):
            [choice] = spec.select_videos([video])
            choice.mask.sum().item()  # the adapters' one count read
        first = counter.syncs[0] if counter.syncs else len(counter.ops)
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            [choice] = spec.select_videos([video])
            choice.mask.sum().item()
            seconds.append(time.perf_counter() - start)
        print(f"{name:10} {len(counter.ops):5d} {len(counter.syncs):5d} {len(counter.ops) - first:9d} "
              f"{kernels(counter.ops[:first]):14d} {kernels(counter.ops[first:]):13d} "
              f"{1e3 * statistics.median(seconds):8.1f}")


if __name__ == "__main__":
    main()
