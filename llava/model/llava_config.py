"""One description of a LLaVA-OneVision / LLaVA-Video checkpoint, whatever format it is stored in.

Two formats exist: the original LLaVA-NeXT ("lmms-lab") one - a Qwen2 config with ``mm_*`` fields,
the vision tower named only by a hub id - and the transformers port (``model_type`` llava_onevision,
nested ``vision_config`` / ``text_config``). Both are parsed into :class:`LlavaSpec`, which is all
the model code reads.

The vision tower of an lmms-lab checkpoint is described by (in order): an embedded
``mm_vision_tower_config`` dict (our tiny checkpoints write one), a ``config.json`` in a local
directory named by ``mm_vision_tower``, or the built-in table :data:`KNOWN_VISION_TOWERS`. It is never
downloaded: the weights are in the checkpoint. ``mm_vision_select_layer = -2`` on a 27-layer SigLIP
means the tower is built with 26 layers and its encoder output (before ``post_layernorm``) is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import Qwen2Config, SiglipVisionConfig

SIGLIP_SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {"google/siglip-so400m-patch14-384": SIGLIP_SO400M}

# Full-size Qwen2-7B language model (LLaVA-OV-7B, LLaVA-Video-7B), for build_random.
QWEN2_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}

FAMILY_OV, FAMILY_VIDEO = "llava_onevision", "llava_video"
POOL_MODES = ("bilinear", "average", "max")
NEWLINE_POSITIONS = ("one_token", "grid", "frame", "no_token")


@dataclass
class LlavaSpec:
    """Everything the model code needs to know about a checkpoint (format independent).

    vision_layers: how many SigLIP layers run; their output (no post_layernorm) is the feature.
    pool_mode / pool_stride: the 2x2 pooling of the projected (h, w) patch grid per frame.
    newline_position: one_token (OV: one newline after the video), grid (LLaVA-Video: one after every
        row of every frame), frame (one after every frame), no_token.
    image_mean / image_std / image_size: SigLIP preprocessing (resize to a square, rescale, normalise).
    """

    family: str
    source_format: str  # "lmms-lab" or "hf"
    vision_config: SiglipVisionConfig
    text_config: Qwen2Config
    vision_layers: int
    projector_type: str = "mlp2x_gelu"
    pool_mode: str = "bilinear"
    pool_stride: int = 2
    newline_position: str = "one_token"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_size: int = 384
    placeholder: str = "<image>"
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def grid_size(self) -> int:
        """Patches per side before pooling (27 for SigLIP-384/14)."""
        return self.image_size // self.vision_config.patch_size


def is_lmms_lab_config(config: dict[str, Any]) -> bool:
    return config.get("model_type") in ("llava", "llava_qwen") and "mm_vision_tower" in config


def lmms_lab_family(config: dict[str, Any]) -> str:
    """LLaVA-Video checkpoints say grid newlines or average pooling; LLaVA-OV says neither."""
    if config.get("mm_newline_position") == "grid" or config.get("mm_spatial_pool_mode") == "average":
        return FAMILY_VIDEO
    return FAMILY_OV


def _known_keys(cls: type) -> set[str]:
    return set(cls().to_dict()) | {"rope_theta", "rope_scaling"}


def text_config_from_dict(config: dict[str, Any]) -> Qwen2Config:
    """Qwen2Config from the Qwen2 fields of a (possibly lmms-lab) config dict, ignoring mm_* fields."""
    keep = _known_keys(Qwen2Config) - {"architectures", "model_type", "transformers_version", "_name_or_path"}
    return Qwen2Config(**{k: v for k, v in config.items() if k in keep})


def vision_config_from_dict(config: dict[str, Any], layers: int | None = None) -> SiglipVisionConfig:
    keep = _known_keys(SiglipVisionConfig) - {"architectures", "model_type", "transformers_version", "_name_or_path"}
    values = {k: v for k, v in config.items() if k in keep}
    if layers is not None:
        values["num_hidden_layers"] = layers
    return SiglipVisionConfig(**values, vision_use_head=False)


def _layers_used(total: int, select_layer: int) -> int:
    """hidden_states[select_layer] of a total-layer tower = the output after this many layers."""
    used = total + 1 + select_layer if select_layer < 0 else select_layer
    if not 1 <= used <= total:
        raise ValueError(f"vision select layer {select_layer} is out of range for a {total}-layer tower")
    return used


def _lmms_lab_tower(config: dict[str, Any], checkpoint_dir: Path | None) -> dict[str, Any]:
    if isinstance(config.get("mm_vision_tower_config"), dict):
        return dict(config["mm_vision_tower_config"])
    tower = str(config.get("mm_vision_tower", ""))
    local = Path(tower) / "config.json"
    if tower and local.is_file():
        data = json.loads(local.read_text())
        return data.get("vision_config", data)
    if tower in KNOWN_VISION_TOWERS:
        return dict(KNOWN_VISION_TOWERS[tower])
    where = f" of {checkpoint_dir}" if checkpoint_dir else ""
    raise ValueError(
        f"unknown vision tower mm_vision_tower={tower!r} in config.json{where}; known: "
        f"{', '.join(KNOWN_VISION_TOWERS)} (or add mm_vision_tower_config)"
    )


def _preprocessing(checkpoint_dir: Path | None, image_size: int) -> dict[str, Any]:
    """image_mean/std/size from preprocessor_config.json when the checkpoint has one."""
    out: dict[str, Any] = {"image_size": image_size}
    if checkpoint_dir is None or not (checkpoint_dir / "preprocessor_config.json").is_file():
        return out
    data = json.loads((checkpoint_dir / "preprocessor_config.json").read_text())
    if "image_mean" in data:
        out["image_mean"] = tuple(float(x) for x in data["image_mean"])
    if "image_std" in data:
        out["image_std"] = tuple(float(x) for x in data["image_std"])
    return out


def spec_from_lmms_lab(config: dict[str, Any], checkpoint_dir: Path | None = None) -> LlavaSpec:
    tower = _lmms_lab_tower(config, checkpoint_dir)
    layers = _layers_used(int(tower["num_hidden_layers"]), int(config.get("mm_vision_select_layer", -2)))
    if config.get("mm_vision_select_feature", "patch") not in ("patch", "full"):
        raise ValueError(f"mm_vision_select_feature={config['mm_vision_select_feature']!r} is not supported")
    family = lmms_lab_family(config)
    pool_mode = config.get("mm_spatial_pool_mode", "bilinear")
    newline = config.get("mm_newline_position", "one_token")
    if pool_mode not in POOL_MODES:
        raise ValueError(f"mm_spatial_pool_mode={pool_mode!r} is not one of {', '.join(POOL_MODES)}")
    if newline not in NEWLINE_POSITIONS:
        raise ValueError(f"mm_newline_position={newline!r} is not one of {', '.join(NEWLINE_POSITIONS)}")
    vision = vision_config_from_dict(tower, layers)
    return LlavaSpec(
        family=family,
        source_format="lmms-lab",
        vision_config=vision,
        text_config=text_config_from_dict(config),
        vision_layers=layers,
        projector_type=config.get("mm_projector_type", "mlp2x_gelu"),
        pool_mode=pool_mode,
        pool_stride=int(config.get("mm_spatial_pool_stride", 2)),
        newline_position=newline,
        placeholder="<image>",
        raw=config,
        **_preprocessing(checkpoint_dir, vision.image_size),
    )


def spec_from_hf(config: dict[str, Any], checkpoint_dir: Path | None = None) -> LlavaSpec:
    """The transformers LlavaOnevision port: bilinear pooling, one newline per video (OV)."""
    vision_dict = dict(config.get("vision_config") or {})
    text_dict = dict(config.get("text_config") or {})
    total = int(vision_dict.get("num_hidden_layers", SiglipVisionConfig().num_hidden_layers))
    layer = config.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: only a single layer is supported")
    layers = _layers_used(total, layer)
    if config.get("vision_feature_select_strategy", "full") not in ("full", "default"):
        raise ValueError(f"vision_feature_select_strategy={config['vision_feature_select_strategy']!r} unsupported")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"projector_hidden_act={config['projector_hidden_act']!r} unsupported (expected gelu)")
    vision = vision_config_from_dict(vision_dict, layers)
    return LlavaSpec(
        family=FAMILY_OV,
        source_format="hf",
        vision_config=vision,
        text_config=text_config_from_dict(text_dict),
        vision_layers=layers,
        projector_type="mlp2x_gelu",
        pool_mode="bilinear",
        pool_stride=2,
        newline_position="one_token",
        placeholder="<video>",
        raw=config,
        **_preprocessing(checkpoint_dir, vision.image_size),
    )


def parse_spec(config: dict[str, Any], checkpoint_dir: str | Path | None = None) -> LlavaSpec:
    """config.json dict (either format) -> LlavaSpec; a clear error for anything else."""
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if config.get("model_type") == "llava_onevision":
        return spec_from_hf(config, directory)
    if is_lmms_lab_config(config):
        return spec_from_lmms_lab(config, directory)
    raise ValueError(
        f"not a LLaVA-OneVision/LLaVA-Video config (model_type={config.get('model_type')!r}"
        + (f", {directory}" if directory else "")
        + ")"
    )


def reference_config(name: str) -> dict[str, Any]:
    """lmms-lab style config.json of the full-size 7B models, for building random weights (benchmarks)."""
    base = {
        "model_type": "llava",
        "architectures": ["LlavaQwenForCausalLM"],
        **QWEN2_7B,
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": 1152,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres_max_9",
        "mm_spatial_pool_stride": 2,
    }
    if name in ("llava_ov_7b", "llava-onevision-qwen2-7b-ov"):
        return {**base, "mm_spatial_pool_mode": "bilinear", "mm_newline_position": "one_token"}
    if name in ("llava_vid_7b", "LLaVA-Video-7B-Qwen2"):
        return {**base, "mm_spatial_pool_mode": "average", "mm_newline_position": "grid"}
    raise ValueError(f"unknown reference config {name!r}; valid: llava_ov_7b, llava_vid_7b")
