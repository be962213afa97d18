"""--model_args -> typed wrapper settings, per lmms-eval model id.

Why a table of defaults: with no compressor the wrappers must sample frames and size pixels exactly
like lmms-eval 0.7.3's built-in wrapper of the same id, so a baseline row is comparable with
published lmms-eval numbers. Each default below cites the built-in it copies.

COMPRESSOR / R_RATIO (the VidCom2 authors' environment variables) are read here, once, at the wrapper
boundary; nothing below the wrapper looks at the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from llava.model.compression import CompressionSpec, available_compressors, is_method_option
from llava.model.vidcom2 import VidCom2Config
from llava.placement import Placement, make_placement
from llava.runtime import DECODE_MODES, FrameSampling

VIDCOM2_KEYS = tuple(f.name for f in fields(VidCom2Config))
OTHER_COMPRESSOR_KEYS = ("seed",)  # options of the reference baselines (random)
ON_VIDEO_ERROR = ("raise", "record")
DEFAULT_PREFETCH_WORKERS = 2


@dataclass(frozen=True)
class IdDefaults:
    """What lmms-eval's built-in wrapper of one id does when an argument is omitted."""

    frames_key: str  # the built-in's name for the frame budget
    max_frames: int
    fps: float | None = None
    force_sample: bool = False
    uniform: bool = True  # uniform num_frames sampling (no fps rule)
    min_pixels: int | None = None
    max_pixels: int | None = None
    mm_spatial_pool_mode: str | None = None
    max_new_tokens: int = 1024
    family: str | None = None  # llava.runtime family hint; None = detect from the checkpoint


DEFAULTS: dict[str, IdDefaults] = {
    # lmms_eval/models/simple/llava_onevision.py: max_frames_num=32 (uniform linspace),
    # mm_spatial_pool_mode="bilinear", generate_until max_new_tokens default 1024.
    "llava_onevision": IdDefaults("max_frames_num", 32, mm_spatial_pool_mode="bilinear"),
    # lmms_eval/models/simple/llava_vid.py: max_frames_num=20, video_fps=1, force_sample=False,
    # mm_spatial_pool_mode="average"; load_video keeps 1 frame/s unless that exceeds max_frames_num
    # (then uniform). The VidCom2 README passes max_frames_num=64 (scripts/eval_llava_vid.sh does too).
    "llava_vid": IdDefaults("max_frames_num", 20, fps=1.0, uniform=False, mm_spatial_pool_mode="average"),
    # lmms_eval/models/simple/qwen2_vl.py: max_pixels=602112, min_pixels=3136, max_num_frames=32,
    # gen default max_new_tokens=128.
    "qwen2_vl": IdDefaults("max_num_frames", 32, min_pixels=3136, max_pixels=602112, max_new_tokens=128),
    # lmms_eval/models/simple/qwen2_5_vl.py: min_pixels=256*28*28, max_pixels=1605632, max_num_frames=32
    # (uniform linspace), fps=None, gen default max_new_tokens=32768.
    "qwen2_5_vl": IdDefaults("max_num_frames", 32, min_pixels=256 * 28 * 28, max_pixels=1605632, max_new_tokens=32768),
    # lmms_eval/models/simple/qwen3_vl.py: min_pixels=256*28*28, max_pixels=1605632, max_num_frames=32
    # (nframes), fps=None, gen default max_new_tokens=128.
    "qwen3_vl": IdDefaults("max_num_frames", 32, min_pixels=256 * 28 * 28, max_pixels=1605632, max_new_tokens=128),
}

# Arguments every wrapper accepts (beyond frames/pixels/compression), with their meaning.
COMMON_KEYS = {
    "pretrained": "hub id or local checkpoint directory",
    "family": "model family of llava.runtime (detected from config.json when omitted)",
    "device": "cpu, cuda or cuda:N (multi-process runs use cuda:LOCAL_RANK)",
    "device_map": "a device (cuda:0: no split), or split one model over the host's devices with accelerate: auto, "
    "balanced, or a JSON file of module name -> device (one process: GPUS=1)",
    "max_memory": "per-device budget of a split device_map, entries by '/': 0:70GiB/1:70GiB/cpu:100GiB",
    "offload_dir": "folder for the weights a device_map puts on disk",
    "dtype": "float32, float16 or bfloat16",
    "torch_dtype": "alias of dtype (llava_vid built-in name)",
    "attn_implementation": "sdpa, eager, flash_attention_2, or sdpa_varlen (Qwen: packed vision attention)",
    "use_flash_attention_2": "qwen2_vl built-in switch; true means attn_implementation=flash_attention_2",
    "conv_template": "prompt template; must be the adapter's own (checked)",
    "model_name": "informational (llava_qwen); recorded",
    "mm_spatial_pool_mode": "LLaVA pooling; must be the adapter's own (checked)",
    "batch_size": "requests per forward; >1 needs the adapter's answer_batch",
    "max_batch_size": "ignored (lmms-eval passes it)",
    "compressor": f"one of {', '.join(available_compressors())}",
    "retention": "R in (0, 1]: fraction of video tokens kept",
    "<method>.<knob>": "a knob of the chosen method, e.g. visionzip.dominant_ratio=0.6 (VidCom2's knobs also bare)",
    "on_video_error": "raise (default) or record: a failed sample scores as a wrong empty answer",
    "meter_dir": "where the efficiency meter writes (default: next to lmms-eval's results)",
    "vision_head": "LLaVA: a SigLIP checkpoint directory whose attention-pooling head gives FastVID's signals",
    "preprocess_device": "Qwen: run the HF video processor there (e.g. cuda); default the CPU, as the built-ins",
    "resume_dir": "per-sample answer cache; a rerun skips finished samples",
    "prefetch_workers": f"threads reading and preprocessing the next batches while the GPU answers (default "
    f"{DEFAULT_PREFETCH_WORKERS}; 0: each batch is read when its turn comes)",
    "max_new_tokens": "default when the task's generation_kwargs do not set it",
    "decode_mode": f"one of {', '.join(DECODE_MODES)}: auto (default: compiled on CUDA where it applies - no "
    "in-LLM method, sdpa or eager attention - else eager), eager, static (a static KV cache) or compiled (static "
    "cache + CUDA graphs: float32 ids equal eager's, bf16 may differ at near-tied logits; the first request of a "
    "shape compiles)",
}


@dataclass(frozen=True)
class WrapperSettings:
    """Everything a wrapper needs, parsed and checked."""

    model_id: str
    pretrained: str
    family: str | None
    device: str
    dtype: str
    attn_implementation: str
    sampling: FrameSampling
    compression: CompressionSpec
    batch_size: int = 1
    conv_template: str | None = None
    model_name: str | None = None
    mm_spatial_pool_mode: str | None = None
    on_video_error: str = "raise"
    meter_dir: str | None = None
    preprocess_device: str | None = None
    vision_head: str | None = None
    resume_dir: str | None = None
    max_new_tokens: int = 1024
    decode_mode: str = "auto"
    prefetch_workers: int = DEFAULT_PREFETCH_WORKERS
    compression_source: str = "model_args"
    placement: Placement = field(default_factory=Placement)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def frames(self) -> int | None:
        return self.sampling.num_frames or self.sampling.max_frames


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"model_arg {key}={value!r} is not a boolean")


def _as_int(key: str, value: Any) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_arg {key}={value!r} is not an integer") from None
    if not number.is_integer():
        raise ValueError(f"model_arg {key}={value!r} is not an integer")
    return int(number)


def valid_keys(model_id: str) -> set[str]:
    d = DEFAULTS[model_id]
    keys = set(COMMON_KEYS) | set(VIDCOM2_KEYS) | set(OTHER_COMPRESSOR_KEYS) | {d.frames_key}
    keys |= {"max_frames_num", "max_num_frames", "fps", "force_sample", "min_pixels", "max_pixels"}
    if model_id == "llava_vid":
        keys.add("video_fps")
    return keys


def compression_from(args: dict[str, Any], environ: dict[str, str]) -> tuple[CompressionSpec, str]:
    """Compressor, retention and options from model_args, falling back to COMPRESSOR / R_RATIO.

    Conflicts and half-specified settings raise: compression is never switched off silently.
    """
    env_comp = environ.get("COMPRESSOR", "").strip() or None
    env_r = environ.get("R_RATIO", "").strip() or None
    arg_comp = args.get("compressor")
    arg_r = args.get("retention")
    if arg_comp is not None and env_comp is not None and str(arg_comp).lower() != env_comp.lower():
        raise ValueError(f"model_arg compressor={arg_comp!r} conflicts with environment COMPRESSOR={env_comp!r}")
    if arg_r is not None and env_r is not None and float(arg_r) != float(env_r):
        raise ValueError(f"model_arg retention={arg_r!r} conflicts with environment R_RATIO={env_r!r}")
    source = "model_args" if arg_comp is not None or arg_r is not None else ("env" if env_comp or env_r else "default")
    name = str(arg_comp if arg_comp is not None else (env_comp or "none")).lower()
    retention_raw = arg_r if arg_r is not None else env_r
    options = {k: args[k] for k in (*VIDCOM2_KEYS, *OTHER_COMPRESSOR_KEYS) if k in args}
    options.update({k: v for k, v in args.items() if is_method_option(k)})
    if name == "none":
        if retention_raw is not None and float(retention_raw) < 1.0:
            raise ValueError(
                f"retention={retention_raw} given without a compressor; set compressor=vidcom2 "
                "(or COMPRESSOR=vidcom2) - compression is never switched on or off implicitly"
            )
        if options:
            raise ValueError(f"compressor options {sorted(options)} given without a compressor (compressor=none)")
        return CompressionSpec(), source
    if retention_raw is None:
        raise ValueError(f"compressor={name!r} needs a retention: model_arg retention=R or environment R_RATIO=R")
    if name != "vidcom2" and set(options) & set(VIDCOM2_KEYS):
        raise ValueError(f"options {sorted(set(options) & set(VIDCOM2_KEYS))} are VidCom2 knobs, not {name!r} ones")
    return CompressionSpec(compressor=name, retention=float(retention_raw), options=dict(options)), source


def parse_model_args(model_id: str, args: dict[str, Any], environ: dict[str, str] | None = None) -> WrapperSettings:
    """Validate and type ``args`` (lmms-eval's parsed --model_args) for ``model_id``."""
    if model_id not in DEFAULTS:
        raise ValueError(f"no VidCom2 wrapper for model id {model_id!r}; known: {', '.join(DEFAULTS)}")
    environ = dict(os.environ) if environ is None else environ
    args = {k: v for k, v in args.items() if v is not None}
    unknown = sorted(k for k in set(args) - valid_keys(model_id) if not is_method_option(k))
    if unknown:
        raise ValueError(
            f"unknown model_args {unknown} for --model {model_id}; valid: {', '.join(sorted(valid_keys(model_id)))}"
        )
    if "pretrained" not in args:
        raise ValueError(f"--model {model_id} needs model_args pretrained=<hub id or local directory>")
    d = DEFAULTS[model_id]

    frames = args.get(d.frames_key, args.get("max_frames_num", args.get("max_num_frames", d.max_frames)))
    frames = _as_int(d.frames_key, frames)
    fps_raw = args.get("fps", args.get("video_fps", d.fps))
    fps = float(fps_raw) if fps_raw is not None else None
    force = _as_bool("force_sample", args.get("force_sample", d.force_sample))
    min_px = _as_int("min_pixels", args["min_pixels"]) if "min_pixels" in args else d.min_pixels
    max_px = _as_int("max_pixels", args["max_pixels"]) if "max_pixels" in args else d.max_pixels
    if model_id.startswith("llava") and ("min_pixels" in args or "max_pixels" in args):
        raise ValueError(f"min_pixels/max_pixels are Qwen pixel budgets; --model {model_id} does not use them")
    if model_id.startswith("qwen") and "mm_spatial_pool_mode" in args:
        raise ValueError(f"mm_spatial_pool_mode is a LLaVA pooling knob; --model {model_id} does not use it")
    if fps is None and d.uniform:
        sampling = FrameSampling(num_frames=frames, min_pixels=min_px, max_pixels=max_px)
    else:
        sampling = FrameSampling(fps=fps, max_frames=frames, force_sample=force, min_pixels=min_px, max_pixels=max_px)

    attn = str(args.get("attn_implementation", "sdpa"))
    if "use_flash_attention_2" in args and _as_bool("use_flash_attention_2", args["use_flash_attention_2"]):
        attn = "flash_attention_2"
    on_error = str(args.get("on_video_error", "raise"))
    if on_error not in ON_VIDEO_ERROR:
        raise ValueError(f"model_arg on_video_error={on_error!r} is not one of {', '.join(ON_VIDEO_ERROR)}")
    batch_size = _as_int("batch_size", args.get("batch_size", 1))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prefetch_workers = _as_int("prefetch_workers", args.get("prefetch_workers", DEFAULT_PREFETCH_WORKERS))
    if prefetch_workers < 0:
        raise ValueError(f"model_arg prefetch_workers must be >= 0, got {prefetch_workers}")
    compression, source = compression_from(args, environ)
    decode_mode = str(args.get("decode_mode", "auto")).strip().lower()
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"model_arg decode_mode={args['decode_mode']!r} is not one of {', '.join(DECODE_MODES)}")
    if decode_mode not in ("eager", "auto") and attn == "flash_attention_2":
        raise ValueError(
            f"model_arg decode_mode={decode_mode} needs attn_implementation sdpa or eager, not flash_attention_2"
        )
    device = str(args.get("device", "cuda" if _cuda() else "cpu"))
    placement = make_placement(
        device, args.get("device_map"), args.get("max_memory"), args.get("offload_dir"),
        names=("model_arg device_map", "model_arg max_memory"),
    )  # fmt: skip
    if placement.split and decode_mode in ("static", "compiled"):
        raise ValueError(
            f"model_arg decode_mode={decode_mode} needs the model on one device; a split device_map decodes "
            "eagerly (decode_mode=eager or auto)"
        )
    return WrapperSettings(
        model_id=model_id,
        pretrained=str(args["pretrained"]),
        family=str(args["family"]) if "family" in args else d.family,
        device=placement.device,
        dtype=str(args.get("dtype", args.get("torch_dtype", "bfloat16" if _cuda() else "float32"))),
        attn_implementation=attn,
        sampling=sampling,
        compression=compression,
        batch_size=batch_size,
        conv_template=str(args["conv_template"]) if "conv_template" in args else None,
        model_name=str(args["model_name"]) if "model_name" in args else None,
        mm_spatial_pool_mode=str(args.get("mm_spatial_pool_mode", d.mm_spatial_pool_mode) or "") or None,
        on_video_error=on_error,
        meter_dir=str(args["meter_dir"]) if "meter_dir" in args else None,
        preprocess_device=str(args["preprocess_device"]) if "preprocess_device" in args else None,
        vision_head=str(args["vision_head"]) if "vision_head" in args else None,
        resume_dir=str(args["resume_dir"]) if "resume_dir" in args else None,
        max_new_tokens=_as_int("max_new_tokens", args.get("max_new_tokens", d.max_new_tokens)),
        decode_mode=decode_mode,
        prefetch_workers=prefetch_workers,
        compression_source=source,
        placement=placement,
        raw=dict(args),
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
