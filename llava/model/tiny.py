"""Tiny random-init LLaVA-OneVision / LLaVA-Video checkpoints, in either storage format.

``vidcom2 make-tiny --arch {llava_ov,llava_vid} --format {lmms-lab,hf} --seed S --out DIR``. The
architecture is the real one at toy size: SigLIP 98px / patch 14 (a 7x7 grid: odd like the real
27x27, so bilinear pooling rounds up to 4x4 and average pooling down to 3x3), 3 tower layers with
the last dropped (mm_vision_select_layer -2), Qwen2 hidden 64 / 16 layers, a char-level tokenizer.
The weights depend only on the seed and the arch, so the two formats of one seed hold the same
numbers under different names (the format-equivalence tests rely on it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llava.model.llava_config import parse_spec
from llava.model.loading import build_random
from llava.tiny_tokenizer import build_char_tokenizer

TINY_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 98,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 16,  # FastV 2 and PDrop 2-6-15 fit; SparseVLM's 2-6-15 need 17 (lm_layers, train-tiny)
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ARCHS = {
    "llava_ov": {"mm_spatial_pool_mode": "bilinear", "mm_newline_position": "one_token"},
    "llava_vid": {"mm_spatial_pool_mode": "average", "mm_newline_position": "grid"},
}


def tiny_lmms_lab_config(
    arch: str, image_size: int = TINY_VISION["image_size"], lm_layers: int = TINY_TEXT["num_hidden_layers"]
) -> dict[str, Any]:
    """config.json of a tiny lmms-lab checkpoint. The tower is named by its real hub id but described
    by ``mm_vision_tower_config``, so loading never looks it up. ``image_size``: the tower's input side
    (a multiple of the 14-pixel patch; 98 -> a 7x7 patch grid, 196 -> 14x14). ``lm_layers``: the Qwen2
    depth (the trained event checkpoint uses one more than the random ones, so SparseVLM's default
    layers 2, 6, 15 fit)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown LLaVA arch {arch!r}; valid: {', '.join(ARCHS)}")
    if lm_layers < 1:
        raise ValueError(f"lm_layers must be >= 1, got {lm_layers}")
    patch = TINY_VISION["patch_size"]
    if image_size < patch or image_size % patch:
        raise ValueError(f"image_size must be a positive multiple of the patch size {patch}, got {image_size}")
    return {
        "model_type": "llava",
        "architectures": ["LlavaQwenForCausalLM"],
        **TINY_TEXT,
        "num_hidden_layers": lm_layers,
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "mm_vision_tower_config": {**TINY_VISION, "image_size": image_size},
        "mm_hidden_size": TINY_VISION["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres_max_9",
        "mm_spatial_pool_stride": 2,
        **ARCHS[arch],
    }


def _lmms_lab_name(name: str) -> str:
    for ours, theirs in (
        ("vision.", "model.vision_tower.vision_tower.vision_model."),
        ("projector.", "model.mm_projector."),
        ("image_newline", "model.image_newline"),
        ("language_model.lm_head.", "lm_head."),
        ("language_model.model.", "model."),
    ):
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise KeyError(name)


def _hf_name(name: str) -> str:
    """Our names -> the transformers port as stored on the hub."""
    for ours, theirs in (
        ("vision.", "vision_tower.vision_model."),
        ("projector.0.", "multi_modal_projector.linear_1."),
        ("projector.2.", "multi_modal_projector.linear_2."),
        ("image_newline", "image_newline"),
        ("language_model.", "language_model."),
    ):
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise KeyError(name)


def _hf_config(tokenizer: Any, lmms_config: dict[str, Any]) -> dict[str, Any]:
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    tower = lmms_config["mm_vision_tower_config"]
    vision = {**tower, "num_hidden_layers": tower["num_hidden_layers"] - 1, "vision_use_head": False}
    size = tower["image_size"]
    config = LlavaOnevisionConfig(
        text_config=Qwen2Config(**TINY_TEXT).to_dict(),
        vision_config=SiglipVisionConfig(**vision).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=[[size, size]],
        tie_word_embeddings=False,
    )
    data = config.to_dict()
    data["architectures"] = ["LlavaOnevisionForConditionalGeneration"]
    return data


def tiny_tokenizer() -> Any:
    """The char-level tokenizer every tiny LLaVA checkpoint holds."""
    return build_char_tokenizer(
        SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


def write_tiny_llava(out_dir: str | Path, *, arch: str, seed: int = 0, fmt: str = "lmms-lab") -> Path:
    """Write a tiny random checkpoint (weights, config, tokenizer, preprocessor config); returns the dir."""
    if fmt not in ("lmms-lab", "hf"):
        raise ValueError(f"unknown --format {fmt!r}; valid: lmms-lab, hf")
    lmms_config = tiny_lmms_lab_config(arch)
    model = build_random(parse_spec(lmms_config), seed=seed)
    return save_llava_checkpoint(model, lmms_config, out_dir, fmt=fmt)


def save_llava_checkpoint(
    model: torch.nn.Module, lmms_config: dict[str, Any], out_dir: str | Path, *, fmt: str
) -> Path:
    """Save a tiny LlavaVideoModel (random or trained) with the tiny tokenizer and its preprocessor config,
    in either storage format; ``lmms_config`` is the config it was built from. Returns the directory."""
    arch = next((a for a, v in ARCHS.items() if lmms_config["mm_spatial_pool_mode"] == v["mm_spatial_pool_mode"]), "")
    if fmt == "hf" and arch != "llava_ov":
        raise ValueError(
            f"--format hf is only for llava_ov: transformers' LlavaOnevision cannot express {arch}'s grid "
            "newline layout; use --format lmms-lab"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    rename = _lmms_lab_name if fmt == "lmms-lab" else _hf_name
    state = {rename(k): v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = lmms_config if fmt == "lmms-lab" else _hf_config(tokenizer, lmms_config)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out))
    size = lmms_config["mm_vision_tower_config"]["image_size"]
    preprocessor = {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out


def tiny_builder(arch: str):  # noqa: ANN201 - a TinyBuilder
    def build(out_dir: Path, *, seed: int = 0, fmt: str = "lmms-lab") -> Path:
        return write_tiny_llava(out_dir, arch=arch, seed=seed, fmt=fmt)

    return build


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when two models hold identical tensors under the same names (used by tests)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
