"""Loading LLaVA-OneVision / LLaVA-Video weights from either format into :class:`LlavaVideoModel`.

Checkpoint key names are mapped onto ours (``vision.*``, ``projector.N.*``, ``image_newline``,
``language_model.*``):

- lmms-lab: ``model.vision_tower.vision_tower.vision_model.*``, ``model.mm_projector.{0,2}.*``,
  ``model.image_newline``, ``model.*`` (Qwen2), ``lm_head.*``;
- transformers port, as on the hub (``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}``,
  ``language_model.model.*``, ``language_model.lm_head``, ``image_newline``) or as transformers 5 names
  them in memory (``model.vision_tower.*``, ``model.language_model.*``, ``lm_head``).

SigLIP layers past the ones used, its ``head`` and ``post_layernorm`` are not needed and skipped.
The model is built on the meta device and the tensors are assigned, so nothing is initialised twice.
A local directory never touches the network; a hub id is resolved with huggingface_hub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from llava.model.llava_arch import LlavaVideoModel
from llava.model.llava_config import LlavaSpec, parse_spec
from llava.placement import Placement, dispatch, load_device, plan_device_map
from llava.runtime import resolve_dtype

# Never cut across devices: a decoder layer (its attention and MLP share the residual), the vision tower
# (its signals for VisionZip / HoliTom are read within one device).
NO_SPLIT = ("Qwen2DecoderLayer", "SiglipVisionModel")
# Built and combined on one device: features, newlines and the text embedding form the LM input.
ENTRY = ("vision", "projector", "image_newline", "language_model.model.embed_tokens")

_LMMS_LAB_RULES = [
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision."),
    (r"^model\.mm_projector\.", "projector."),
    (r"^model\.image_newline$", "image_newline"),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.", "language_model.model."),
]
_HF_RULES = [
    (r"^(model\.)?vision_tower\.(vision_model\.)?", "vision."),
    (r"^(model\.)?multi_modal_projector\.linear_1\.", "projector.0."),
    (r"^(model\.)?multi_modal_projector\.linear_2\.", "projector.2."),
    (r"^(model\.)?image_newline$", "image_newline"),
    (r"^(language_model\.)?lm_head\.", "language_model.lm_head."),
    (r"^(language_model\.model\.|model\.language_model\.)", "language_model.model."),
]


def map_key(key: str, source_format: str) -> str | None:
    """Checkpoint key -> our parameter name, or None for a key we do not use."""
    for pattern, repl in _LMMS_LAB_RULES if source_format == "lmms-lab" else _HF_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A local directory as is; a hub id downloaded (configs, tokenizer, safetensors) or taken from cache."""
    local = Path(path)
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(str(path), allow_patterns=patterns, local_files_only=True))
    except Exception:
        try:
            return Path(snapshot_download(str(path), allow_patterns=patterns))
        except Exception as exc:
            raise FileNotFoundError(f"cannot find model {path!r} locally or on the hub: {exc}") from exc


def _safetensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    return files


def load_weights(
    model: LlavaVideoModel,
    directory: Path,
    device: torch.device,
    dtype: torch.dtype,
    device_map: dict[str, str] | None = None,
) -> None:
    """Read every used tensor (mapped names) and assign it; missing parameters raise, naming them.

    With a ``device_map`` each tensor goes straight to its GPU (host memory for cpu / disk modules), so a
    checkpoint larger than host memory never sits there whole."""
    wanted = dict(model.state_dict(keep_vars=True))
    state: dict[str, torch.Tensor] = {}
    fmt = model.spec.source_format
    for file in _safetensor_files(directory):
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for key in reader.keys():
                name = map_key(key, fmt)
                if name is not None and name in wanted:
                    where = load_device(name, device_map) if device_map is not None else device
                    state[name] = reader.get_tensor(key).to(device=where, dtype=dtype)
    tied = bool(getattr(model.spec.text_config, "tie_word_embeddings", False))
    if "language_model.lm_head.weight" not in state and tied:
        state["language_model.lm_head.weight"] = state.get("language_model.model.embed_tokens.weight")
    optional = {"vision.post_layernorm.weight", "vision.post_layernorm.bias"}
    missing = sorted(set(wanted) - set(state) - optional)
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint {directory} ({fmt} format) lacks weights: {shown}")
    for name in optional - set(state):
        where = load_device(name, device_map) if device_map is not None else device
        state[name] = torch.zeros(wanted[name].shape, device=where, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.language_model.tie_weights()


def load_llava(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    placement: Placement | None = None,
) -> tuple[LlavaVideoModel, object, Path]:
    """(model in eval mode, tokenizer, checkpoint directory) from a local directory or hub id.

    A split ``placement`` (llava.placement) plans the device map on the meta-built model, reads each tensor
    onto its mapped device and dispatches the model with accelerate (``device`` is then unused)."""
    from transformers import AutoTokenizer

    directory = resolve_checkpoint(path)
    config = json.loads((directory / "config.json").read_text())
    spec = parse_spec(config, directory)
    split = placement is not None and placement.split
    torch_device = torch.device("cpu" if split else (placement.device if placement else device))
    torch_type = resolve_dtype(dtype)
    with torch.device("meta"):
        model = LlavaVideoModel(spec, attn_implementation=attn_implementation)
    device_map = plan_device_map(model, placement, no_split=NO_SPLIT, entry=ENTRY, dtype=torch_type) if split else None
    load_weights(model, directory, torch_device, torch_type, device_map)
    _rebuild_buffers(model, torch_device)  # computed buffers: on the host, dispatch moves them
    if device_map is not None:  # planned before the weights are read: a bad map fails without reading them
        model = dispatch(model, device_map, placement.offload_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), padding_side="left")
    return model.eval(), tokenizer, directory


def place_split(model: LlavaVideoModel, placement: Placement) -> LlavaVideoModel:
    """A model built whole on the CPU (the benchmark's random weights) dispatched over the placement's map."""
    device_map = plan_device_map(model, placement, no_split=NO_SPLIT, entry=ENTRY, dtype=model.dtype)
    return dispatch(model, device_map, placement.offload_dir)


def _rebuild_buffers(model: LlavaVideoModel, device: torch.device) -> None:
    """Non-persistent buffers (rotary inv_freq, SigLIP position ids) were made on meta: rebuild the owning
    module from its config on the device and take its buffers (they are computed, never trained)."""
    for module in model.modules():
        meta = [name for name, buf in module.named_buffers(recurse=False) if buf is not None and buf.is_meta]
        if not meta:
            continue
        if not hasattr(module, "config"):
            raise ValueError(f"cannot rebuild buffers {meta} of {type(module).__name__} after meta construction")
        with torch.device(device):
            fresh = type(module)(module.config)
        fresh_buffers = dict(fresh.named_buffers(recurse=False))
        for name in meta:
            setattr(module, name, fresh_buffers[name])


def build_random(
    spec_or_config: LlavaSpec | dict,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> LlavaVideoModel:
    """The architecture with random weights, built directly on ``device`` (benchmarks of full-size models).

    Pass a config.json dict (e.g. :func:`llava.model.llava_config.reference_config`) or a LlavaSpec.
    """
    spec = spec_or_config if isinstance(spec_or_config, LlavaSpec) else parse_spec(spec_or_config)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(resolve_dtype(dtype))
    try:
        with torch.device(device):
            model = LlavaVideoModel(spec, attn_implementation=attn_implementation)
            torch.nn.init.normal_(model.image_newline, std=spec.text_config.hidden_size**-0.5)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
