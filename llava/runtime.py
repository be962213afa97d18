"""What every model family shares at run time: request options, results, stage timers, the family type.

A model family (LLaVA-OneVision, LLaVA-Video, Qwen2-VL, ...) is a detector (does this checkpoint
belong to me?) and a loader returning an object with ``answer(...)``. The families are listed in
:mod:`llava.families_index`, above them; this module imports none of them. The CLI, the lmms-eval
wrappers and the benchmark all load through :func:`llava.families_index.load_video_llm`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from llava.model.compression import CompressionSpec

STAGES = ("read_video", "preprocess", "vision", "compress", "prefill", "decode")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# auto (the default): compiled where it applies (see llava.model.static_decode.resolve_decode_mode), else
# eager. eager: DynamicCache, one eager forward per token. static: a StaticCache filled from the prefill,
# steps still eager. compiled: the static cache plus a torch.compile'd step (CUDA graphs on CUDA).
DECODE_MODES = ("auto", "eager", "static", "compiled")


def check_decode_mode(mode: str) -> str:
    """``mode`` if valid; otherwise a ValueError naming decode_mode and the valid values."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    return mode


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"bfloat16" (or a torch.dtype) -> torch.dtype; unknown names raise, listing the valid ones."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """``text`` up to (not including) the earliest of the stop strings, or all of it."""
    hits = [text.index(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else text


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding options; greedy unless do_sample."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks); stop strings still apply
    decode_mode: str = "auto"  # one of DECODE_MODES; see llava.model.static_decode

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_decode_mode(self.decode_mode)



@dataclass(frozen=True)
class FrameSampling:
    """How frames are taken from a video. Families use the fields that apply to them.

    num_frames: uniform sampling of exactly this many frames (LLaVA-OV default 32).
    fps: sample at this rate, capped by max_frames; force_sample switches to uniform max_frames
        when the fps rule would exceed it (LLaVA-Video default: fps 1, 64 frames, forced).
    min_pixels / max_pixels: Qwen's per-frame pixel budget.
    """

    num_frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    force_sample: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None


@dataclass
class InferenceResult:
    """One answered request: the text, ids, token counts and per-stage seconds."""

    answer: str
    output_ids: list[int]
    visual_tokens_before: int
    visual_tokens_after: int
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def achieved_retention(self) -> float:
        """Video tokens kept at the LM input over those before (pre-LLM methods)."""
        return self.visual_tokens_after / self.visual_tokens_before if self.visual_tokens_before else 1.0

    @property
    def layer_average_retention(self) -> float:
        """Video tokens entering each LM layer, averaged over layers, over those before compression: the
        "equivalent retention" in-LLM methods are compared at (= achieved_retention for pre-LLM ones)."""
        return float(self.extra.get("layer_average_retention", self.achieved_retention))

    def to_json(self) -> str:
        data = asdict(self)
        data["achieved_retention"] = self.achieved_retention
        return json.dumps(data)


class StageTimer:
    """Seconds per stage of one request; a stage entered twice accumulates.

    On CUDA each stage is bracketed by two CUDA events on the current stream, read (one synchronize)
    only when ``seconds`` is asked for: asynchronous GPU work is charged to the stage that launched
    it, and timing adds no synchronisation of its own inside the request. Elsewhere: perf_counter.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self._cuda = self.device is not None and self.device.type == "cuda"
        self._done: dict[str, float] = {}
        self._pending: list[tuple[str, Any, Any]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            try:
                yield
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record(stream)
                self._pending.append((name, start, end))
            return
        start_s = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start_s)

    def add(self, name: str, seconds: float) -> None:
        """Charge ``seconds`` to a stage (e.g. 0.0 for a stage a request skips)."""
        self._done[name] = self._done.get(name, 0.0) + seconds

    @property
    def seconds(self) -> dict[str, float]:
        """Stage -> seconds so far (synchronises once if CUDA events are pending)."""
        if self._pending:
            self._pending[-1][2].synchronize()
            for name, start, end in self._pending:
                self.add(name, start.elapsed_time(end) / 1e3)
            self._pending.clear()
        return dict(self._done)


def maybe_stage(timer: StageTimer | None, name: str) -> Any:
    """``timer.stage(name)``, or a no-op context when no timer is given."""
    return timer.stage(name) if timer is not None else nullcontext()


class VideoLLM(Protocol):
    """What a loaded model family offers to the CLI, the lmms-eval wrappers and the benchmark."""

    family: str

    def answer(
        self,
        video: str | Path,
        question: str,
        *,
        compression: CompressionSpec = CompressionSpec(),
        generation: GenerationOptions = GenerationOptions(),
        sampling: FrameSampling = FrameSampling(),
    ) -> InferenceResult: ...


@dataclass(frozen=True)
class ModelFamily:
    name: str
    detect: Callable[[dict[str, Any]], bool]  # config.json dict -> belongs to this family?
    load: Callable[..., VideoLLM]  # (path, device=, dtype=, attn_implementation=, placement=) -> model
    # (torch model built on the CPU, llava.placement.Placement) -> the model dispatched over its device map
    place: Callable[[Any, Any], Any] | None = None
