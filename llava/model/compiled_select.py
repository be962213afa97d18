"""A method's static-shape selection compiled by torch.compile, for CUDA, with a bound on recompiles.

Why: a selection of ~100 small eager kernels costs ~5 us of GPU time each even when the host has
queued them behind the vision tower; torch.compile fuses them into a few dozen. Compiled once per input
shape (and per Python int argument, e.g. a per-frame count), so a process that meets ever-new shapes
gets a clear error after ``MAX_SHAPES`` compilations instead of compiling forever or quietly falling back.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

MAX_SHAPES = 1024
_CACHE: dict[Hashable, Callable[..., Any]] = {}


def compiled(
    fn: Callable[..., Any],
    owner: str,
    *,
    key: Hashable | None = None,
    execution: str = "compiled",
    alternatives: str = "execution=eager",
) -> Callable[..., Any]:
    """``fn`` compiled (fullgraph, static shapes); raises when Triton is missing or the shapes never settle.

    ``key``: what the compiled function is cached under (default ``fn`` itself; e.g. a config when ``fn``
    is a fresh partial). ``owner`` / ``execution`` / ``alternatives`` word the errors: the method, the
    execution that compiles, and the options that do not."""
    key = fn if key is None else key
    if key not in _CACHE:
        from torch.utils._triton import has_triton

        if not has_triton():  # torch.compile's GPU kernels are Triton's
            raise RuntimeError(
                f"{owner} execution={execution!r} needs Triton for torch.compile, and it is not importable here; "
                f"install triton or pass {alternatives}"
            )
        _CACHE[key] = torch.compile(fn, dynamic=False, fullgraph=True)
    compiled_fn = _CACHE[key]

    def run(*args: Any) -> Any:
        limits = {"recompile_limit": MAX_SHAPES, "accumulated_recompile_limit": MAX_SHAPES}
        try:
            with torch._dynamo.config.patch(**limits, fail_on_recompile_limit_hit=True):
                return compiled_fn(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit as error:
            raise RuntimeError(
                f"{owner} execution={execution!r} has compiled its selection for {MAX_SHAPES} input shapes in "
                f"this process; for inputs of ever-changing shape pass {alternatives}"
            ) from error

    return run
