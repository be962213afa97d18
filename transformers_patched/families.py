"""The Qwen2-VL, Qwen2.5-VL and Qwen3-VL families and their tiny checkpoint builders.

Listed by :mod:`llava.families_index`; detection is by config.json ``model_type``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from llava.placement import Placement
from llava.runtime import ModelFamily
from transformers_patched.qwen_arch import ARCHS, place_split
from transformers_patched.qwen_tiny import build_tiny_qwen


def _load(
    arch: str,
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    placement: Placement | None = None,
) -> Any:
    from transformers_patched.qwen_adapter import QwenVideoLLM

    llm = QwenVideoLLM.from_pretrained(
        path, device=device, dtype=dtype, attn_implementation=attn_implementation, placement=placement
    )
    if llm.arch.name != arch:
        raise ValueError(f"{path} is a {llm.arch.name} checkpoint, not {arch}")
    return llm


def _detect(arch: str, config: dict[str, Any]) -> bool:
    return config.get("model_type") == arch


def _tiny(arch: str, out_dir: Path, *, seed: int = 0, fmt: str | None = None) -> Path:
    return build_tiny_qwen(arch, out_dir, seed=seed, fmt=fmt)


FAMILIES = tuple(
    ModelFamily(name=a, detect=partial(_detect, a), load=partial(_load, a), place=place_split) for a in ARCHS
)
TINY_BUILDERS = {a: partial(_tiny, a) for a in ARCHS}
