"""Every model family, and the one loader the CLI, the lmms-eval wrappers and the benchmark use.

The top of the model stack: it lists the family modules (each exporting ``FAMILIES`` and
``TINY_BUILDERS``) and nothing imports it from below, so there is no import circle through
llava.runtime. Adding a family is one module and one line in :func:`_family_modules`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from llava.placement import Placement
from llava.runtime import ModelFamily, VideoLLM

TinyBuilder = Callable[..., Path]  # (out_dir, *, seed, fmt) -> out_dir


@cache
def _family_modules() -> tuple[Any, ...]:
    """The modules that define families (imported on first use: they pull in transformers)."""
    import llava.model.families
    import transformers_patched.families

    return (llava.model.families, transformers_patched.families)


def families() -> dict[str, ModelFamily]:
    out: dict[str, ModelFamily] = {}
    for module in _family_modules():
        for family in module.FAMILIES:
            if family.name in out:
                raise ValueError(f"model family {family.name!r} is defined twice")
            out[family.name] = family
    return out


def tiny_builders() -> dict[str, TinyBuilder]:
    """``vidcom2 make-tiny --arch ARCH`` builders: each writes a random-init tiny checkpoint to a directory."""
    out: dict[str, TinyBuilder] = {}
    for module in _family_modules():
        out.update(module.TINY_BUILDERS)
    return dict(sorted(out.items()))


def available_families() -> list[str]:
    return sorted(families())


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """config.json of a local checkpoint directory, or of a hub id already in the local cache."""
    local = Path(path)
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in model directory {local}")
    else:
        from huggingface_hub import hf_hub_download

        try:
            config_file = Path(hf_hub_download(str(path), "config.json"))
        except Exception as exc:  # network errors, missing repos, offline mode
            raise FileNotFoundError(f"cannot find model {path!r} locally or on the hub: {exc}") from exc
    return json.loads(config_file.read_text())


def detect_family(path: str | Path, family: str | None = None) -> ModelFamily:
    known = families()
    if family is not None:
        if family not in known:
            raise ValueError(f"unknown model family {family!r}; valid: {', '.join(sorted(known))}")
        return known[family]
    config = read_checkpoint_config(path)
    matches = [f for f in known.values() if f.detect(config)]
    if len(matches) != 1:
        names = [f.name for f in matches] or "none"
        raise ValueError(
            f"cannot tell the model family of {path} (model_type={config.get('model_type')!r}, "
            f"matches: {names}); pass the family explicitly, one of {', '.join(sorted(known))}"
        )
    return matches[0]


def load_video_llm(
    path: str | Path,
    *,
    family: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    placement: Placement | None = None,
) -> VideoLLM:
    """Load any supported checkpoint (hub id or local directory) by its detected family.

    ``placement`` (llava.placement.make_placement) splits the weights over a device map; without one the
    model goes whole to ``device``."""
    return detect_family(path, family).load(
        path, device=device, dtype=dtype, attn_implementation=attn_implementation, placement=placement
    )


def place_adapter(llm: Any, placement: Placement) -> Any:
    """An adapter whose model was built whole on the CPU (the benchmark's random weights), its model
    dispatched over ``placement``'s device map by its family's rules (llava.placement)."""
    family = families().get(llm.family)
    if family is None or family.place is None:
        raise ValueError(f"model family {llm.family!r} cannot be split over devices (device_map)")
    llm.model = family.place(llm.model, placement)
    return llm
