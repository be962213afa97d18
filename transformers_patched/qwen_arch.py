"""The three Qwen video architectures we support and how to load or build each one.

An :class:`QwenArch` says only what differs between Qwen2-VL, Qwen2.5-VL and Qwen3-VL for our
integration: the transformers class, whether the rope index wants ``second_per_grid_ts`` (absolute
time, Qwen2.5-VL), whether the LM takes DeepStack features (Qwen3-VL), whether the vision tower attends
in windows (Qwen2.5-VL), and the per-frame pixel budget semantics of its video processor. Everything
else goes through the public transformers classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from llava.placement import Placement, dispatch, plan_device_map
from llava.runtime import resolve_dtype
from transformers_patched.vision_attention import SDPA_VARLEN, use_packed_vision_attention

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# sdpa_varlen: the LM on sdpa, the vision tower on PyTorch's packed flash kernel (vision_attention.py)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", SDPA_VARLEN)


@dataclass(frozen=True)
class QwenArch:
    """What our integration needs to know about one Qwen video architecture.

    name: family / ``--arch`` name, also config.json ``model_type``.
    model_class: transformers class name (public, from ``transformers``).
    hub_id: the instruct checkpoint the full-size config describes.
    timed_rope: get_rope_index takes ``second_per_grid_ts`` (temporal positions in absolute time).
    deepstack: the LM adds vision features of early ViT layers at visual positions (DeepStack).
    total_pixel_budget: the video processor's size is a budget for ALL frames (Qwen3-VL), not per frame.
    windowed_vision: the vision tower attends within windows in most layers and reorders its tokens by a
        window index (Qwen2.5-VL).
    """

    name: str
    model_class: str
    hub_id: str
    timed_rope: bool = False
    deepstack: bool = False
    total_pixel_budget: bool = False
    windowed_vision: bool = False

    def transformers_class(self) -> type[PreTrainedModel]:
        import transformers

        return getattr(transformers, self.model_class)


ARCHS: dict[str, QwenArch] = {
    "qwen2_vl": QwenArch("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen/Qwen2-VL-7B-Instruct"),
    "qwen2_5_vl": QwenArch(
        "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen/Qwen2.5-VL-7B-Instruct",
        timed_rope=True,
        windowed_vision=True,
    ),
    "qwen3_vl": QwenArch(
        "qwen3_vl",
        "Qwen3VLForConditionalGeneration",
        "Qwen/Qwen3-VL-8B-Instruct",
        deepstack=True,
        total_pixel_budget=True,
    ),
}


def get_arch(name: str) -> QwenArch:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown Qwen architecture {name!r}; valid: {', '.join(ARCHS)}") from None


def arch_of_config(config: PretrainedConfig | dict[str, Any]) -> QwenArch:
    """The architecture of a config (object or config.json dict), by ``model_type``."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(f"model_type {model_type!r} is not a supported Qwen video model; valid: {', '.join(ARCHS)}")
    return ARCHS[model_type]


def check_attn_implementation(attn_implementation: str) -> str:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attn_implementation {attn_implementation!r}; valid: {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA GPU")
    return attn_implementation


def _transformers_attention(attn_implementation: str) -> str:
    """The implementation transformers builds the model with: sdpa_varlen builds as sdpa (its tower is
    switched afterwards by :func:`_with_vision_attention`)."""
    return "sdpa" if check_attn_implementation(attn_implementation) == SDPA_VARLEN else attn_implementation


def _with_vision_attention(model: PreTrainedModel, attn_implementation: str) -> PreTrainedModel:
    """Switch the vision tower to packed attention when sdpa_varlen was asked for."""
    return use_packed_vision_attention(model) if attn_implementation == SDPA_VARLEN else model


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    placement: Placement | None = None,
) -> PreTrainedModel:
    """A pretrained Qwen video model (hub id or local directory), in eval mode on ``device``.

    A split ``placement`` (llava.placement) plans the device map on a meta-built copy (our split rules,
    :func:`split_rules`) and lets transformers read each tensor straight onto its device through it, so
    the checkpoint never sits whole in host memory."""
    config = AutoConfig.from_pretrained(str(path))
    arch = arch_of_config(config)
    cls, torch_type = arch.transformers_class(), resolve_dtype(dtype)
    attn = _transformers_attention(attn_implementation)
    split: dict[str, Any] = {}
    if placement is not None and placement.split:
        with torch.device("meta"):
            skeleton = cls._from_config(config, dtype=torch_type, attn_implementation=attn)
        no_split, entry = split_rules(skeleton)
        device_map = plan_device_map(skeleton, placement, no_split=no_split, entry=entry, dtype=torch_type)
        split = {"device_map": device_map, "offload_folder": placement.offload_dir}
    model = cls.from_pretrained(str(path), dtype=torch_type, attn_implementation=attn, **split)
    model = _with_vision_attention(model, attn_implementation).eval()
    if split:
        return model
    return model.to(placement.device if placement is not None else device)


def split_rules(model: PreTrainedModel) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(classes never cut across devices, modules that share the entry device) of a Qwen VL model: the
    text decoder layer and the whole vision tower (DeepStack mergers and window index included) stay in
    one piece; the tower and the token embedding build the LM input together."""
    text = model.model.language_model
    no_split = (type(text.layers[0]).__name__, type(model.model.visual).__name__)
    return no_split, ("model.visual", "model.language_model.embed_tokens")


def place_split(model: PreTrainedModel, placement: Placement) -> PreTrainedModel:
    """``model`` (loaded on the CPU) dispatched over the placement's device map."""
    no_split, entry = split_rules(model)
    device_map = plan_device_map(model, placement, no_split=no_split, entry=entry, dtype=model.dtype)
    return dispatch(model, device_map, placement.offload_dir)


def full_size_config(arch: str) -> PretrainedConfig:
    """The published config of the architecture's instruct checkpoint (stored here: no network needed)."""
    get_arch(arch)
    data = json.loads((CONFIG_DIR / f"{arch}.json").read_text())
    return AutoConfig.for_model(**{k: v for k, v in data.items() if not k.startswith("_")})


def build_random_model(
    config: str | Path | dict[str, Any] | PretrainedConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "bfloat16",
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> PreTrainedModel:
    """The full architecture with random weights, allocated directly on ``device`` (for speed benchmarks).

    ``config`` is an architecture name (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``: the stored full-size
    config), a config object or dict, or a checkpoint directory / cached hub id whose config.json is read.
    """
    if isinstance(config, str) and config in ARCHS:
        config = full_size_config(config)
    elif isinstance(config, dict):
        config = AutoConfig.for_model(**config)
    elif not isinstance(config, PretrainedConfig):
        config = AutoConfig.from_pretrained(str(config))
    arch = arch_of_config(config)
    attn = _transformers_attention(attn_implementation)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        model = arch.transformers_class()._from_config(config, dtype=resolve_dtype(dtype), attn_implementation=attn)
    return _with_vision_attention(model, attn_implementation).eval()
