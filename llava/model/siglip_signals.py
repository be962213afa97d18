"""Vision-tower signals of pre-LLM compression methods for LLaVA's SigLIP tower, with SDPA left on.

Upstream VisionZip / HoliTom call the tower with ``output_attentions=True``: every layer runs eager and
all layers' maps are kept (LLaVA-OV, 32 frames: about 14 GB), although only the feature layer's column
means are used. Here the tower runs as usual (SDPA); a forward pre-hook keeps the feature layer's INPUT
hidden states, and that one layer's queries and keys are recomputed from it (its ``layer_norm1`` and
``q_proj`` / ``k_proj``, as the layer applies them). The received attention is then summed over query
chunks, softmax in float32, so at most ``chunk`` query rows of attention exist at a time.

Signals (see :mod:`llava.model.method_api` for the names), per video of F frames of N = side^2 patches:

- ``vit_received_attention`` (F, N): mean over heads and query rows of softmax(q k^T * scale) within
  the frame (:func:`received_attention`);
- ``vit_keys`` (F, N, head_dim): the raw keys averaged over heads (:func:`head_mean_keys`);
- ``frame_salience`` (F, N) and ``frame_global`` (F, C): FastVID's signals from SigLIP's
  attention-pooling (MAP) head applied after ``post_layernorm`` to the encoder output (the features
  LLaVA uses). LLaVA checkpoints do not hold the head; :func:`load_siglip_head` reads it from a SigLIP
  checkpoint (google/siglip-so400m-patch14-384).

All of them are unpooled (per patch); :func:`pool_like_features` maps the per-patch ones onto the
token grid with the model's own pooling function (OV bilinear 27->14, LLaVA-Video 2x2 average 27->13).
In LLaVA's tower only the layers used are kept, so the feature layer is the LAST encoder layer
(:func:`feature_layer`).

Typical use (what :func:`siglip_signals` does)::

    layer = feature_layer(vision)
    with capture_layer_input(layer) as captured:
        hidden = vision.encoder(inputs_embeds=vision.embeddings(pixels)).last_hidden_state
    attention = received_attention(layer, captured.hidden)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava.model.method_api import FRAME_GLOBAL, FRAME_SALIENCE, VIT_KEYS, VIT_RECEIVED_ATTENTION

DEFAULT_CHUNK = 1024
"""Query rows (summed over the frames attended together) per softmax step: the attention held at once
is chunk x heads x keys floats (SigLIP-so400m: 1024 x 16 x 729 x 4 B = 48 MB)."""

SIGLIP_SIGNALS = (VIT_RECEIVED_ATTENTION, VIT_KEYS, FRAME_SALIENCE, FRAME_GLOBAL)
HEAD_PREFIXES = ("vision_model.", "")
"""Where a SigLIP checkpoint keeps the vision tower's weights: under ``vision_model.`` (SiglipModel, as
google/siglip-so400m-patch14-384 is saved) or at the top level (a saved SiglipVisionModel)."""


# ------------------------------------------------------------------------------------ kernel


def received_from_qk(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Column means of softmax(q k^T * scale): (B, H, n, d) queries and keys -> (B, n) float32.

    B independent groups (frames); each key's attention summed over every query row and head, divided by
    H * n. Exact, without the (B, H, n, n) map: queries are taken ``chunk`` rows at a time (whole frames
    when a frame is shorter than ``chunk``, else ``chunk`` rows of one frame), softmax over keys in float32.
    """
    if q.ndim != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (B, H, n, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of query rows, got {chunk}")
    groups, heads, n, _ = q.shape
    q = q.float() * scale
    keys_t = k.float().transpose(-1, -2)
    total = q.new_zeros(groups, heads, n)
    per_step = max(1, chunk // n)  # frames per step when a whole frame fits in a chunk
    rows = min(n, chunk)  # query rows of each of those frames per step
    # a loop over memory-bounded blocks of (frames, query rows): the point is never to hold the whole map
    for g0 in range(0, groups, per_step):
        g1 = min(groups, g0 + per_step)
        for r0 in range(0, n, rows):
            logits = torch.matmul(q[g0:g1, :, r0 : r0 + rows], keys_t[g0:g1])  # (g, H, rows, n)
            total[g0:g1] += logits.softmax(dim=-1).sum(dim=-2)
    return total.sum(dim=1) / (heads * n)


# ------------------------------------------------------------------------------- capture


@dataclass
class LayerInput:
    """The input hidden states of one layer call, set by :func:`capture_layer_input` (None before)."""

    hidden: torch.Tensor | None = None


@contextmanager
def capture_layer_input(layer: nn.Module) -> Iterator[LayerInput]:
    """Keep ``layer``'s input hidden states (its first argument) during a normal forward.

    A forward pre-hook that only stores a reference: the forward itself (SDPA) is unchanged. The last
    call wins when the layer runs several times inside the context.
    """
    captured = LayerInput()

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.hidden = args[0] if args else kwargs["hidden_states"]

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def feature_layer(vision: nn.Module) -> nn.Module:
    """The SigLIP encoder layer whose output LLaVA uses: the last one kept (LLaVA drops the ones after it)."""
    return vision.encoder.layers[-1]


# ------------------------------------------------------------------------------- encoder layer


def _queries_keys(
    layer: nn.Module, hidden: torch.Tensor, with_queries: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(F, N, C) layer input -> queries (or None) and keys (F, H, N, d) in the model dtype, as the layer makes them."""
    if hidden.ndim != 3:
        raise ValueError(f"hidden states must be (F, N, C), got shape {tuple(hidden.shape)}")
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    shape = (*hidden.shape[:2], attn.num_heads, attn.head_dim)
    keys = attn.k_proj(x).view(shape).transpose(1, 2)
    queries = attn.q_proj(x).view(shape).transpose(1, 2) if with_queries else None
    return queries, keys


@torch.no_grad()
def received_attention(layer: nn.Module, hidden: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(F, N) float32: attention each patch receives in ``layer`` (a SiglipEncoderLayer), within its frame.

    ``hidden`` (F, N, C) is the layer's input; the mean is over heads and all N query rows, so each
    frame's row sums to 1. VisionZip's (SigLIP port) dominant score and HoliTom's attention.
    """
    queries, keys = _queries_keys(layer, hidden, True)
    return received_from_qk(queries, keys, layer.self_attn.scale, chunk)


@torch.no_grad()
def head_mean_keys(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(F, N, head_dim) float32: ``layer``'s raw keys (bias included, no scaling) averaged over heads.

    VisionZip's contextual-merge metric.
    """
    _, keys = _queries_keys(layer, hidden, False)
    return keys.float().mean(dim=1)


# ------------------------------------------------------------------------------- MAP head


@torch.no_grad()
def probe_attention(head: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP's attention-pooling head on (F, N, C) post-layernorm features -> ((F, N), (F, C)) float32.

    First: the probe's attention over the frame's patches, head mean, computed from the head's own
    ``nn.MultiheadAttention`` in-projection (one query row per frame, softmax in float32); FastVID's
    salience. Second: the head's output (the frame's pooled vector), FastVID's frame feature.
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden states must be (F, N, C), got shape {tuple(hidden.shape)}")
    mha = head.attention
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        raise ValueError("the pooling head's attention must use one packed in_proj_weight (as SigLIP's does)")
    frames, n, channels = hidden.shape
    heads = mha.num_heads
    head_dim = channels // heads
    w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    b_q, b_k, _ = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    probe = head.probe.reshape(1, channels).to(hidden.dtype)
    q = nn.functional.linear(probe, w_q.to(hidden.dtype), None if b_q is None else b_q.to(hidden.dtype))
    k = nn.functional.linear(hidden, w_k.to(hidden.dtype), None if b_k is None else b_k.to(hidden.dtype))
    q = q.float().view(heads, head_dim)
    k = k.float().view(frames, n, heads, head_dim)
    logits = torch.einsum("hd,fnhd->fhn", q, k) * head_dim**-0.5
    attention = logits.softmax(dim=-1).mean(dim=1)
    return attention, head(hidden).float()


class SiglipHead(nn.Module):
    """SigLIP's ``post_layernorm`` and attention-pooling head, the part of the tower LLaVA leaves out.

    forward: (F, N, C) encoder output (LLaVA's features, before the projector) -> ((F, N) probe attention,
    (F, C) head output), both float32.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

        self.config = config
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = SiglipMultiheadAttentionPoolingHead(config)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.post_layernorm(hidden.to(self.post_layernorm.weight.dtype))
        return probe_attention(self.head, normed)


def _vision_config(config_path: Path) -> Any:
    from transformers import SiglipVisionConfig

    data = json.loads(config_path.read_text())
    vision = data.get("vision_config", data)
    keep = {k: v for k, v in vision.items() if k not in ("architectures", "transformers_version", "model_type")}
    return SiglipVisionConfig(**keep)


def _weight_files(directory: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a checkpoint directory (single file or sharded with an index)."""
    from safetensors import safe_open

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    raise FileNotFoundError(f"{directory} holds neither model.safetensors nor model.safetensors.index.json")


def load_siglip_head(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> SiglipHead:
    """:class:`SiglipHead` from a SigLIP checkpoint directory (config.json + model.safetensors).

    Reads only the ``post_layernorm.*`` and ``head.*`` tensors, under ``vision_model.`` (SiglipModel, the
    layout of google/siglip-so400m-patch14-384) or unprefixed (a saved SiglipVisionModel). The head must
    come from the SigLIP the LLaVA tower was trained from: LLaVA checkpoints do not contain it.
    """
    from safetensors import safe_open

    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}: pass a SigLIP checkpoint directory")
    files = _weight_files(directory)
    config = _vision_config(config_path)
    module = SiglipHead(config)
    wanted = list(module.state_dict())
    for prefix in HEAD_PREFIXES:
        if all(prefix + name in files for name in wanted):
            break
    else:
        source = directory / "model.safetensors"
        if not source.is_file():
            source = directory / "model.safetensors.index.json"
        missing = [name for name in wanted if not any(p + name in files for p in HEAD_PREFIXES)]
        raise ValueError(
            f"{source} holds no SigLIP attention-pooling head: missing {', '.join(missing)} (looked under the "
            f"prefixes {', '.join(repr(p) for p in HEAD_PREFIXES)}). LLaVA checkpoints do not contain the head; "
            "pass the SigLIP checkpoint the tower came from (e.g. google/siglip-so400m-patch14-384)"
        )
    state = {}
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[prefix + name], []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            state.update({name: f.get_tensor(prefix + name) for name in names})
    module.load_state_dict(state, strict=True)
    return module.to(device=device, dtype=dtype).eval()


# ------------------------------------------------------------------------------- pooling, driver


def pool_like_features(
    stat: torch.Tensor, side: int, pool: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Per-patch (F, N) or (F, N, d) statistic -> (F, P) / (F, P, d) on the token grid, float32.

    ``pool`` is the model's own pooling of (F, side, side, D) grids (e.g. ``lambda x: pool_grid(x, mode,
    stride)``), so signals and features land on the same tokens.
    """
    if stat.ndim not in (2, 3) or stat.shape[1] != side * side:
        raise ValueError(f"stat must be (F, {side * side}) or (F, {side * side}, d), got {tuple(stat.shape)}")
    grid = stat.float().reshape(stat.shape[0], side, side, -1)
    pooled = pool(grid)
    pooled = pooled.reshape(pooled.shape[0], pooled.shape[1] * pooled.shape[2], pooled.shape[3])
    return pooled.squeeze(-1) if stat.ndim == 2 else pooled


def check_names(names: Iterable[str], valid: tuple[str, ...], where: str) -> list[str]:
    """``names`` as a list, raising on any name ``where`` cannot supply (listing those it can)."""
    names = list(names)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"{where} cannot supply signal(s) {unknown}; it supplies: {', '.join(valid)}")
    return names


@torch.no_grad()
def siglip_signals(
    vision: nn.Module,
    pixels: torch.Tensor,
    names: Iterable[str],
    *,
    head: SiglipHead | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the tower as ``LlavaVideoModel.encode_frames`` does and compute the named signals, unpooled.

    vision: the SiglipVisionModel holding only the layers used; pixels (F, 3, S, S). Returns the encoder
    output (F, N, C) (no post_layernorm, as LLaVA uses it) and {name: (F, N) / (F, N, d) / (F, C)} float32.
    ``head`` (:func:`load_siglip_head`) is needed for frame_salience and frame_global.
    """
    names = check_names(names, SIGLIP_SIGNALS, "LLaVA's SigLIP tower")
    if head is None and ({FRAME_SALIENCE, FRAME_GLOBAL} & set(names)):
        raise ValueError(
            "frame_salience / frame_global (FastVID) need SigLIP's attention-pooling head, which LLaVA "
            "checkpoints lack: load it with load_siglip_head(<SigLIP checkpoint directory>)"
        )
    layer = feature_layer(vision)
    with capture_layer_input(layer) as captured:
        hidden = vision.encoder(inputs_embeds=vision.embeddings(pixels)).last_hidden_state
    out: dict[str, torch.Tensor] = {}
    if VIT_RECEIVED_ATTENTION in names:
        out[VIT_RECEIVED_ATTENTION] = received_attention(layer, captured.hidden, chunk)
    if VIT_KEYS in names:
        out[VIT_KEYS] = head_mean_keys(layer, captured.hidden)
    if head is not None and ({FRAME_SALIENCE, FRAME_GLOBAL} & set(names)):
        salience, global_ = head(hidden)
        if FRAME_SALIENCE in names:
            out[FRAME_SALIENCE] = salience
        if FRAME_GLOBAL in names:
            out[FRAME_GLOBAL] = global_
    return hidden, out
