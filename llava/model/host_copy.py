"""A small device tensor read on the host without waiting for the work queued after it.

A selection that needs a few data-dependent integers on the host (segment counts, budgets) starts their
copy as soon as they are computed, queues the heavy work that does not need them, and only then waits:
on CUDA the copy goes into pinned memory behind the work queued before it, and an event marks it, so the
host waits for the GPU to reach the copy, not to finish everything queued since. What the host launches
after the read then overlaps the GPU's backlog instead of waiting on an idle GPU. On the CPU (and other
devices) it is a plain read at :meth:`HostCopy.tolist`.
"""

from __future__ import annotations

import torch


class HostCopy:
    """Start copying ``tensor`` (small, any shape) to the host; :meth:`tolist` waits for it and reads it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event = None
        self._host = tensor
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(tensor.device))

    def tolist(self) -> list:
        """The values as (nested) Python lists; waits for the copy only (CUDA), not for later work."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
