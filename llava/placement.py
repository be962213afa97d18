"""Where a model's weights live: one device, or split over several through accelerate.

Why: a 72B-class checkpoint (about 145 GB in bf16) fits on no single GPU, so its decoder layers are spread
over the GPUs of one host (and, if asked, the CPU or disk) with accelerate's device map; each module runs
where its weights are and accelerate's hooks move a module's inputs there. The command-line and lmms-eval
boundaries parse ``--device-map`` / ``--max-memory`` (``device_map=`` / ``max_memory=``) once into a
:class:`Placement`; the family loaders (``llava.model.loading``, ``transformers_patched.qwen_arch``) take it.

Rules every split keeps, so the code between modules (layout, compression, keep flags) runs on one device:

- the vision tower and the text embedding (and LLaVA's projector and newline vector) sit on one device,
  the *entry* device: features, positions, masks and keep flags are made there, and every pre-LLM method
  runs there (on the features' device);
- a vision tower is never split (its class is in ``no_split_module_classes`` beside the decoder layer's):
  its attention statistics for VisionZip / HoliTom / FastVID are read inside one device;
- the language model's layers run where they are; the layer-wise driver (``llava.model.lm_driver``) moves
  the sequence state (hidden states, positions, masks, keep flags, in-LLM plans' inputs) with the hidden
  states when a layer sits on another device; each layer's KV cache lives on its layer's device;
- static / compiled decoding copies one cache into one CUDA graph: a split model refuses it and ``auto``
  resolves to eager (``llava.model.static_decode.resolve_decode_mode``).

Device map values: a device string (``cuda:0``, ``cpu``: no split, the old behaviour), ``auto`` (fill the
devices in order, accelerate's ``infer_auto_device_map``), ``balanced`` (spread evenly over the GPUs,
``get_balanced_memory``), or an explicit map as JSON text or a JSON file: module name prefix -> device
(``{"vision": 0, "language_model.model.layers.14": "disk", ...}``; ``disk`` needs an offload folder).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

STRATEGIES = ("auto", "balanced")
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*((?:[KMGT]i?)?B)?\s*$", re.IGNORECASE)
_DEVICE = re.compile(r"^(cpu|disk|meta|mps|cuda(:\d+)?|\d+)$")
MaxMemory = dict[int | str, int | str]  # GPU index / "cpu" / "disk" -> "70GiB" or bytes


@dataclass(frozen=True)
class Placement:
    """How to place a model: ``device`` alone (no split), or a split ``strategy`` / ``explicit`` map.

    max_memory: accelerate's per-device budget (keys: GPU index int, ``cpu``, ``disk``; values such as
    ``70GiB``), used by ``auto`` / ``balanced``. offload_dir: where ``disk`` modules' weights are kept.
    """

    device: str = "cpu"
    strategy: str | None = None
    explicit: dict[str, str] = field(default_factory=dict)
    max_memory: MaxMemory = field(default_factory=dict)
    offload_dir: str | None = None

    @property
    def split(self) -> bool:
        """True when the weights go through a device map (even one that happens to use one device)."""
        return self.strategy is not None or bool(self.explicit)

    def describe(self) -> str:
        """A short label for results (``cuda:0``, ``auto``, ``explicit``)."""
        return self.strategy or ("explicit" if self.explicit else self.device)


def _device_name(value: Any, where: str) -> str:
    """A map value as accelerate names it: ``0`` -> ``cuda:0``; ``cpu`` / ``disk`` / ``cuda:N`` as given."""
    text = str(value).strip().lower()
    if not _DEVICE.match(text):
        raise ValueError(f"{where}: {value!r} is not a device (cpu, disk, cuda, cuda:N or a GPU index N)")
    return f"cuda:{text}" if text.isdigit() else text


def parse_device_map(value: str | Mapping[str, Any] | None, *, param: str = "--device-map") -> tuple[str | None, dict]:
    """(strategy or None, explicit map) from the option's value; None or a plain device -> (None, {}).

    A value starting with ``{`` is JSON; an existing file path is read as JSON. Bad values raise a
    ValueError naming ``param``."""
    if value is None:
        return None, {}
    if isinstance(value, Mapping):
        raw: Any = dict(value)
    else:
        text = str(value).strip()
        if text.lower() in STRATEGIES:
            return text.lower(), {}
        if text.startswith("{"):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{param}: not valid JSON ({exc.msg} at character {exc.pos}): {text!r}") from None
        elif Path(text).is_file():
            try:
                raw = json.loads(Path(text).read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{param}: file {text} is not a JSON device map ({exc.msg})") from None
        else:
            _device_name(text, f"{param} (a device, auto, balanced, JSON or a JSON file)")
            return None, {}
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{param}: a device map must be a non-empty JSON object of module name -> device")
    return None, {str(k): _device_name(v, f"{param} entry {k!r}") for k, v in raw.items()}


def parse_max_memory(value: str | Mapping[Any, Any] | None, *, param: str = "--max-memory") -> MaxMemory:
    """``0=70GiB,1=70GiB,cpu=100GiB`` (or a mapping) -> {0: "70GiB", 1: "70GiB", "cpu": "100GiB"}.

    lmms-eval's ``--model_args`` splits on ``,`` and ``=``, so there the same reads ``0:70GiB/1:70GiB/cpu:100GiB``
    (``/`` between entries, ``:`` before the size)."""
    if value is None or value == "":
        return {}
    items = value.items() if isinstance(value, Mapping) else (
        _memory_entry(part) for part in str(value).replace("/", ",").split(",")
    )
    out: MaxMemory = {}
    for key, amount in items:
        key_text = str(key).strip().lower()
        match = _MEMORY.match(str(amount)) if amount is not None else None
        if match is None:
            raise ValueError(f"{param}: entry {key_text!r} needs DEVICE=SIZE such as 0=70GiB or cpu=100GiB")
        if match.group(2) in (None, "B", "b"):  # plain bytes: accelerate takes an int
            amount = int(float(match.group(1)))
        if key_text.startswith("cuda:"):
            key_text = key_text[5:]
        if key_text.isdigit():
            out[int(key_text)] = amount if isinstance(amount, int) else str(amount).strip()
        elif key_text in ("cpu", "disk", "mps"):
            out[key_text] = amount if isinstance(amount, int) else str(amount).strip()
        else:
            raise ValueError(f"{param}: {key_text!r} is not a GPU index, cpu or disk")
    return out


def _memory_entry(part: str) -> tuple[str, str | None]:
    """``0=70GiB`` or ``0:70GiB`` (``cuda:0:70GiB``) -> ("0", "70GiB"); no size -> (part, None)."""
    if "=" in part:
        key, amount = part.split("=", 1)
        return key, amount
    if ":" in part:
        key, amount = part.rsplit(":", 1)
        return key, amount
    return part, None


def make_placement(
    device: str = "cpu",
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: str | Mapping[Any, Any] | None = None,
    offload_dir: str | None = None,
    *,
    names: tuple[str, str] = ("--device-map", "--max-memory"),
) -> Placement:
    """The one parse of the placement options; ``names`` are the parameters as the caller spells them.

    A plain device as ``device_map`` (``device_map=cuda:0``, the lmms-eval built-ins' habit) is the device."""
    strategy, explicit = parse_device_map(device_map, param=names[0])
    memory = parse_max_memory(max_memory, param=names[1])
    if memory and strategy is None:
        raise ValueError(f"{names[1]} budgets a split: give {names[0]} auto or balanced (got {device_map!r})")
    if device_map is not None and strategy is None and not explicit:
        device = _device_name(str(device_map), names[0])
    if any(v == "disk" for v in explicit.values()) and not offload_dir:
        raise ValueError(f"{names[0]} puts modules on disk: an offload folder is needed (offload_dir)")
    return Placement(str(device), strategy, explicit, memory, offload_dir)


# ---------------------------------------------------------------- planning and dispatch


def device_of(name: str, device_map: Mapping[str, str]) -> str:
    """The map's device for a module or tensor name: its longest covering prefix."""
    owners = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    if not owners:
        raise ValueError(f"device map places no module covering {name!r}")
    return device_map[max(owners, key=len)]


def load_device(name: str, device_map: Mapping[str, str]) -> torch.device:
    """Where a loader should put tensor ``name`` before :func:`dispatch`: its GPU, or host memory for the
    modules the map runs from cpu or disk (accelerate offloads those from there)."""
    device = device_of(name, device_map)
    return torch.device("cpu" if device in ("cpu", "disk", "meta") else device)


def _entry_devices(device_map: Mapping[str, str], entry: Iterable[str]) -> dict[str, str]:
    """The device of each entry module."""
    return {name: device_of(name, device_map) for name in entry}


def plan_device_map(
    model: nn.Module,
    placement: Placement,
    *,
    no_split: Iterable[str],
    entry: Iterable[str],
    dtype: torch.dtype,
) -> dict[str, str]:
    """The module -> device map for ``model`` (built on any device, meta included).

    no_split: class names never cut across devices (decoder layer, vision tower). entry: modules that must
    share a device (vision tower, embedding, ...), checked here so a map that would run the layout on two
    devices fails at load time, naming the modules and their devices."""
    if not placement.split:
        raise ValueError("plan_device_map needs a split placement (device_map auto, balanced or a map)")
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = sorted(set(no_split))
    if placement.explicit:
        device_map = dict(placement.explicit)
        names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
        unknown = sorted(k for k in device_map if k and k not in names)
        if unknown:
            raise ValueError(f"device map names modules the model lacks: {unknown[:5]}")
        uncovered = [n for n, _ in model.named_parameters() if not _covered(n, device_map)]
        if uncovered:
            raise ValueError(f"device map leaves parameters unplaced: {uncovered[:5]} (+{max(0, len(uncovered) - 5)})")
    else:
        memory = dict(placement.max_memory) or None
        if placement.strategy == "balanced":
            memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
        device_map = {
            k: _device_name(v, "accelerate's device map")
            for k, v in infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split,
                                              dtype=dtype).items()
        }  # fmt: skip
    offloaded = sorted(k for k, v in device_map.items() if v in ("cpu", "disk"))
    if offloaded and any(v.startswith("cuda") for v in device_map.values()):
        warnings.warn(
            f"device map runs {len(offloaded)} module(s) from host memory or disk ({', '.join(offloaded[:3])}"
            f"{', ...' if len(offloaded) > 3 else ''}): their weights are copied to a GPU at every call; give the "
            "GPUs more max_memory to keep them resident",
            stacklevel=2,
        )
    devices = _entry_devices(device_map, entry)
    if len(set(devices.values())) > 1 or "disk" in devices.values():
        shown = ", ".join(f"{k} -> {v}" for k, v in devices.items())
        raise ValueError(
            f"the vision tower and the text embedding must share one device that holds weights (features, "
            f"positions and keep flags are built there); this map gives {shown}: raise the first device's "
            "max_memory or move them in the map"
        )
    return device_map


def _covered(name: str, device_map: Mapping[str, str]) -> bool:
    return any(k == "" or name == k or name.startswith(k + ".") for k in device_map)


def dispatch(model: nn.Module, device_map: Mapping[str, str], offload_dir: str | None = None) -> nn.Module:
    """Attach accelerate's hooks (weights moved to their devices; ``disk`` ones offloaded to
    ``offload_dir``); the cache and the driver's row capture are never moved by a hook (the driver places
    them itself)."""
    from accelerate import dispatch_model

    with warnings.catch_warnings():  # it warns of parameter entries, which _place_loose_tensors places
        warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
        model = dispatch_model(
            model, device_map=dict(device_map), offload_dir=offload_dir, skip_keys=["past_key_values", "row_capture"]
        )
    _place_loose_tensors(model, device_map)
    model.hf_device_map = dict(device_map)
    return model


def _place_loose_tensors(model: nn.Module, device_map: Mapping[str, str]) -> None:
    """Map entries that name a parameter rather than a module (LLaVA's ``image_newline``, a top-level
    vector): accelerate's block hooks place modules only, so these are moved here."""
    from accelerate.utils import set_module_tensor_to_device

    params = dict(model.named_parameters())
    for name, device in device_map.items():
        if name in params and params[name].device != torch.device(device):
            if device == "disk":
                raise ValueError(f"device map puts the parameter {name!r} on disk; only modules can be offloaded")
            set_module_tensor_to_device(model, name, device)


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device (offloaded weights sit on meta
    until the hook loads them), else the device of its first parameter or buffer (cpu for none)."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None:
        for child in module.modules():
            hook = getattr(child, "_hf_hook", None)
            if getattr(hook, "execution_device", None) is not None:
                device = hook.execution_device
                break
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def is_split(model: nn.Module) -> bool:
    """True for a model dispatched over a device map with more than one value (offload included)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    return len(set(device_map.values())) > 1 or "disk" in device_map.values()


# NVLink multicast (NVLS) off in NCCL, PyTorch's symmetric memory and NVSHMEM: on the shared multi-GPU hosts a
# program that uses it can put the host's GPUs out of service; every multi-GPU process starts with these.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def keep_multicast_off(environ: dict[str, str] | None = None) -> None:
    """Set :data:`NO_MULTICAST` in ``environ`` (default os.environ) before any GPU library starts; a value
    set otherwise is an error naming the variable (it is never overridden silently)."""
    import os

    env = os.environ if environ is None else environ
    for key, value in NO_MULTICAST.items():
        if env.get(key, value) != value:
            raise ValueError(f"{key}={env[key]} turns NVLink multicast on; it must be {value} (or unset)")
        env[key] = value
