"""Checks shared by the static-shape executions' CUDA tests (FastVID, HoliTom)."""

from __future__ import annotations

import pytest
import torch

from llava.model import compiled_select
from llava.model.method_api import VideoSelection


def compile_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh compile cache that allows one shape: a second input of the same shape must not recompile."""
    torch._dynamo.reset()  # dynamo counts compilations per code object, across configurations
    monkeypatch.setattr(compiled_select, "_CACHE", {})
    monkeypatch.setattr(compiled_select, "MAX_SHAPES", 1)


def assert_matches_cpu(got: dict[str | None, VideoSelection], cpu: VideoSelection) -> None:
    """Each execution's CUDA selection has the CPU's sources exactly and its features to float32 rounding."""
    for execution, selection in got.items():
        source = selection.source.cpu()
        differ = len(set(source.tolist()) ^ set(cpu.source.tolist()))
        assert torch.equal(source, cpu.source), f"{execution}: {differ} sources differ of {len(cpu.source)}"
        torch.testing.assert_close(selection.features.cpu(), cpu.features, atol=1e-4, rtol=1e-4)
