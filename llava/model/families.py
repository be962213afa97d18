"""The ``llava_onevision`` and ``llava_video`` model families: detection, loading, answering.

:class:`LlavaVideoLLM` is the adapter the CLI, the lmms-eval wrapper and the benchmark use:
``answer`` (one video), ``answer_batch`` (several videos and questions, left-padded, each video
compressed with its own budget), ``answer_image`` (one image, never compressed). Per-instance
settings: ``grid_newlines`` (LLaVA-Video row newlines after compression, see llava.model.layout) and
``position_mode`` (contiguous, the default, or original).

Family defaults for frame sampling when the request names none: LLaVA-OV 32 uniform frames,
LLaVA-Video 64 frames at fps 1 with force_sample (i.e. 64 uniform frames).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llava.model.compression import CompressionSpec
from llava.model.generate import llava_stack
from llava.model.layout import GRID_NEWLINES
from llava.model.llava_arch import POSITION_MODES, LlavaVideoModel, VisualBlock
from llava.model.llava_config import FAMILY_OV, FAMILY_VIDEO, POOL_MODES, is_lmms_lab_config, lmms_lab_family
from llava.model.lm_driver import generate, layer_average_retention, stop_string_check
from llava.model.loading import load_llava, place_split
from llava.model.method_api import FRAME_GLOBAL, FRAME_SALIENCE, LLM_ATTENTION_ROWS, VIT_KEYS, VIT_RECEIVED_ATTENTION
from llava.model.prompt import CONV_TEMPLATE, split_prompt, stop_token_ids
from llava.model.siglip_signals import load_siglip_head
from llava.model.tiny import tiny_builder
from llava.placement import Placement, is_split
from llava.runtime import (
    FrameSampling,
    GenerationOptions,
    InferenceResult,
    ModelFamily,
    StageTimer,
    cut_at_stop,
)
from llava.video_io import VideoClip, read_videos

DEFAULT_SAMPLING = {
    FAMILY_OV: FrameSampling(num_frames=32),
    FAMILY_VIDEO: FrameSampling(fps=1.0, max_frames=64, force_sample=True),
}


def resolve_sampling(sampling: FrameSampling, family: str) -> FrameSampling:
    """The request's sampling, or the family default when it names neither num_frames nor fps."""
    if sampling.num_frames is not None or sampling.fps is not None:
        return sampling
    default = DEFAULT_SAMPLING[family]
    if sampling.max_frames is not None:  # --max-frames alone caps the family default
        if default.num_frames is not None:
            return replace(default, num_frames=sampling.max_frames)
        return replace(default, max_frames=sampling.max_frames)
    return default


@dataclass(frozen=True)
class PreparedVideos:
    """A batch of (video, question) requests after the host stage (:meth:`LlavaVideoLLM.prepare_batch`).

    frames: per video (F, H, W, 3) uint8 RGB (numpy, or a pinned torch tensor). infos: what each result's
    ``extra`` reports about its video. prompts: per request the token ids before and after the video
    placeholder. seconds: the host stages' seconds (read_video), added to the results' timings.
    """

    frames: list[np.ndarray | torch.Tensor]
    infos: list[dict[str, Any]]
    prompts: list[tuple[list[int], list[int]]]
    seconds: dict[str, float]


def _frames_and_info(item: np.ndarray | VideoClip) -> tuple[np.ndarray, dict[str, Any]]:
    """The frames of a decoded video and what the result's ``extra`` reports about it."""
    if isinstance(item, np.ndarray):
        return item, {"frames": int(item.shape[0])}
    return item.frames, {"frames": item.num_frames, "source_fps": item.source_fps, "duration": item.duration}


class LlavaVideoLLM:
    """A loaded LLaVA-OneVision / LLaVA-Video checkpoint behind the VideoLLM protocol."""

    def __init__(self, model: LlavaVideoModel, tokenizer: Any, *, source: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.family = model.spec.family
        self.source = source
        self.grid_newlines = "frame"
        self.position_mode = "contiguous"
        self.stop_ids = stop_token_ids(tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def conv_template(self) -> str:
        """The prompt template both families were trained with, the only one implemented (prompt.py)."""
        return CONV_TEMPLATE

    @property
    def mm_spatial_pool_mode(self) -> str:
        return self.model.spec.pool_mode

    @mm_spatial_pool_mode.setter
    def mm_spatial_pool_mode(self, mode: str) -> None:
        """Override the checkpoint's pooling, as lmms-eval's LLaVA wrappers do through overwrite_config."""
        if mode not in POOL_MODES:
            raise ValueError(f"mm_spatial_pool_mode={mode!r} is not one of {', '.join(POOL_MODES)}")
        self.model.spec.pool_mode = mode

    @property
    def supplied_signals(self) -> frozenset[str]:
        """Signals this model computes for compression methods: the SigLIP feature layer's received
        attention and keys always, attention rows inside the LM (the layer-wise driver) always; FastVID's
        frame salience and global vector only with SigLIP's attention-pooling head loaded
        (:meth:`load_vision_head`; LLaVA checkpoints do not hold it)."""
        head = {FRAME_SALIENCE, FRAME_GLOBAL} if self.model.vision_head is not None else set()
        return frozenset({VIT_RECEIVED_ATTENTION, VIT_KEYS, LLM_ATTENTION_ROWS, *head})

    @property
    def signal_hint(self) -> str:
        if self.model.vision_head is not None:
            return ""
        return (
            "frame_salience / frame_global come from SigLIP's attention-pooling head, which LLaVA checkpoints lack: "
            "load it from a SigLIP checkpoint (e.g. google/siglip-so400m-patch14-384) with --vision-head DIR "
            "(vidcom2 infer) or vision_head=DIR (lmms-eval model_args)"
        )

    def _check_settings(self) -> None:
        if self.grid_newlines not in GRID_NEWLINES:
            raise ValueError(f"grid_newlines must be one of {', '.join(GRID_NEWLINES)}, got {self.grid_newlines!r}")
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {', '.join(POSITION_MODES)}, got {self.position_mode!r}")

    # ------------------------------------------------------------------ stages for one video
    def read_frames(
        self, videos: list[str | Path | np.ndarray], sampling: FrameSampling
    ) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """(frames, info) per video: paths and folders decoded in parallel, frame arrays taken as they are."""
        decoded = read_videos(videos, resolve_sampling(sampling, self.family))
        return [_frames_and_info(item) for item in decoded]

    def features_from_frames(
        self, frames: np.ndarray | torch.Tensor, timer: StageTimer, signals: Iterable[str] = ()
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Decoded (F, H, W, 3) frames -> (the pooled features compression chooses from, the signals its
        method needs) (preprocess, vision)."""
        with timer.stage("preprocess"):
            pixels = self.model.preprocess(frames)
        with torch.inference_mode(), timer.stage("vision"):
            return self.model.encode_video_with_signals(pixels, signals)

    def blocks_from_frames(
        self, videos: list[np.ndarray | torch.Tensor], compression: CompressionSpec, timer: StageTimer
    ) -> list[VisualBlock]:
        """Each video's decoded frames -> its compressed visual block. Every video is encoded on its own
        (the vision stage); then all are compressed together in one stage (one selection launch per
        shape, one host synchronisation), each on its own budget."""
        encoded = [self.features_from_frames(frames, timer, compression.tower_signals) for frames in videos]
        with torch.inference_mode(), timer.stage("compress"):
            return self.model.compress_videos(
                [f for f, _ in encoded], compression, self.grid_newlines, [s for _, s in encoded]
            )

    def load_vision_head(self, path: str | Path) -> None:
        """Load SigLIP's post_layernorm and attention-pooling head from a SigLIP checkpoint directory
        (e.g. google/siglip-so400m-patch14-384): FastVID's frame salience and global vector come from it,
        and LLaVA checkpoints do not hold it."""
        self.model.vision_head = load_siglip_head(path, device=self.device, dtype=self.model.dtype)

    def video_block(
        self,
        video: str | Path | np.ndarray,
        compression: CompressionSpec,
        sampling: FrameSampling,
        timer: StageTimer,
    ) -> tuple[VisualBlock, dict[str, Any]]:
        """Read (path) or take (frames array) one video and run it to its compressed visual block."""
        with timer.stage("read_video"):
            [(frames, info)] = self.read_frames([video], sampling)
        return self.blocks_from_frames([frames], compression, timer)[0], info

    # ------------------------------------------------------------------ host stage / device stage
    def prepare_batch(
        self,
        videos: list[str | Path | np.ndarray | VideoClip],
        questions: list[str],
        sampling: FrameSampling = FrameSampling(),
        *,
        timer: StageTimer | None = None,
        pin_memory: bool = False,
    ) -> PreparedVideos:
        """The host half of :meth:`answer_batch`: read and decode the videos (on threads), tokenise the
        prompts. Touches no GPU, so a prefetch thread can run it while the GPU answers an earlier batch.

        ``timer``: the request's timer (answer_batch passes its own); without one it times itself (host
        clock) and the result carries the seconds. ``pin_memory``: when the model is on a GPU, hand the
        frames over in pinned host memory (a faster copy later). Raises
        :class:`llava.video_io.VideoReadError` (naming the file) for an unreadable video."""
        if len(videos) != len(questions):
            raise ValueError(f"{len(videos)} videos but {len(questions)} questions")
        if not videos:
            raise ValueError("answer_batch needs at least one video")
        own = timer is None
        timer = timer or StageTimer()
        with timer.stage("read_video"):  # all videos at once, decoded on threads
            decoded = self.read_frames(list(videos), sampling)
        frames: list[np.ndarray | torch.Tensor] = [f for f, _ in decoded]
        if pin_memory and self.device.type == "cuda":
            frames = [torch.from_numpy(np.ascontiguousarray(f)).pin_memory() for f in frames]
        placeholder = self.model.spec.placeholder
        prompts = [split_prompt(self.tokenizer, question, placeholder) for question in questions]
        return PreparedVideos(frames, [info for _, info in decoded], prompts, timer.seconds if own else {})

    def answer_prepared(
        self,
        prepared: PreparedVideos,
        *,
        compression: CompressionSpec = CompressionSpec(),
        generation: GenerationOptions = GenerationOptions(),
        timer: StageTimer | None = None,
    ) -> list[InferenceResult]:
        """The device half of :meth:`answer_batch` on a :meth:`prepare_batch` result: vision, compression
        (each video on its own budget), prefill and decoding. ``timer``: the request's timer when the caller
        timed the host stage with it; by default a new one, charged the host seconds ``prepared`` carries.
        ``prepared`` is not changed: it may be answered again."""
        self._check_settings()
        compression.check_supported(self.family, self.supplied_signals, self.signal_hint)
        if timer is None:
            timer = StageTimer(self.device)
            for stage, seconds in prepared.seconds.items():
                timer.add(stage, seconds)
        blocks = self.blocks_from_frames(list(prepared.frames), compression, timer)
        prompts = [(before, block, after) for (before, after), block in zip(prepared.prompts, blocks, strict=True)]
        return self._generate(prompts, list(prepared.infos), timer, compression, generation)

    def answer_batch(
        self,
        videos: list[str | Path | np.ndarray],
        questions: list[str],
        *,
        compression: CompressionSpec = CompressionSpec(),
        generation: GenerationOptions = GenerationOptions(),
        sampling: FrameSampling = FrameSampling(),
    ) -> list[InferenceResult]:
        """Answer several (video, question) pairs in one left-padded batch; every video is compressed
        with its own budget. Timings are those of the whole batch (``extra.batch_size`` says so).
        The same as :meth:`answer_prepared` of :meth:`prepare_batch`."""
        self._check_settings()
        compression.check_supported(self.family, self.supplied_signals, self.signal_hint)  # before any video is read
        compression.llm_plan(self.model.language_model.config.num_hidden_layers)  # its layers and R, checked now
        timer = StageTimer(self.device)
        prepared = self.prepare_batch(videos, questions, sampling, timer=timer)
        return self.answer_prepared(prepared, compression=compression, generation=generation, timer=timer)

    def answer(
        self,
        video: str | Path | np.ndarray,
        question: str,
        *,
        compression: CompressionSpec = CompressionSpec(),
        generation: GenerationOptions = GenerationOptions(),
        sampling: FrameSampling = FrameSampling(),
    ) -> InferenceResult:
        """One question about one video (a path, a frame folder, or an (F, H, W, 3) uint8 array)."""
        return self.answer_batch(
            [video], [question], compression=compression, generation=generation, sampling=sampling
        )[0]

    def answer_image(
        self, image: str | Path | np.ndarray, question: str, *, generation: GenerationOptions = GenerationOptions()
    ) -> InferenceResult:
        """One image, resized to the tower's square input; image tokens are never compressed."""
        from PIL import Image

        timer = StageTimer(self.device)
        with timer.stage("read_video"):
            array = np.asarray(Image.open(image).convert("RGB")) if not isinstance(image, np.ndarray) else image
        with timer.stage("preprocess"):
            pixels = self.model.preprocess(array[None])
        with torch.inference_mode(), timer.stage("vision"):
            block = self.model.image_block(pixels)
        timer.add("compress", 0.0)
        before, after = split_prompt(self.tokenizer, question, self.model.spec.placeholder)
        return self._generate([(before, block, after)], [{"image": True}], timer, CompressionSpec(), generation)[0]

    def _generate(
        self,
        prompts: list[tuple[list[int], VisualBlock, list[int]]],
        infos: list[dict[str, Any]],
        timer: StageTimer,
        compression: CompressionSpec,
        generation: GenerationOptions,
    ) -> list[InferenceResult]:
        with timer.stage("prefill"):
            batch = self.model.build_inputs(prompts, self.position_mode)
        stack = llava_stack(self.model.language_model, split=is_split(self.model))
        out = generate(
            stack,
            batch,
            generation,
            stop_ids=self.stop_ids,
            stop_check=stop_string_check(self.tokenizer, generation.stop),
            timer=timer,
            plan=compression.llm_plan(stack.num_layers),
        )
        texts = [cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), generation.stop) for ids in out.ids]
        results = []
        for row, ((_, block, _), info, ids, text) in enumerate(zip(prompts, infos, out.ids, texts, strict=True)):
            layout = block.layout
            extra = {
                **layout.stats(),
                **info,
                "family": self.family,
                "compression": compression.describe(),
                "grid_newlines": self.grid_newlines if self.model.spec.newline_position == "grid" else None,
                "position_mode": self.position_mode,
                "batch_size": len(prompts),
                "prompt_tokens": int(batch.valid.shape[1]),
                "layer_average_retention": layer_average_retention(out.layer_visual, row, layout.total_tokens),
                "decode_mode": out.decode_mode,
            }
            results.append(
                InferenceResult(
                    answer=text,
                    output_ids=ids,
                    visual_tokens_before=layout.full_length,
                    visual_tokens_after=layout.length,
                    timings=dict(timer.seconds),
                    extra=extra,
                )
            )
        return results


def _load(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    placement: Placement | None = None,
) -> LlavaVideoLLM:
    model, tokenizer, directory = load_llava(
        path, device=device, dtype=dtype, attn_implementation=attn_implementation, placement=placement
    )
    return LlavaVideoLLM(model, tokenizer, source=str(directory))


def _detect(family: str):
    def detect(config: dict[str, Any]) -> bool:
        if config.get("model_type") == "llava_onevision":
            return family == FAMILY_OV
        return is_lmms_lab_config(config) and lmms_lab_family(config) == family

    return detect


FAMILIES = tuple(ModelFamily(f, _detect(f), _load, place=place_split) for f in (FAMILY_OV, FAMILY_VIDEO))
TINY_BUILDERS = {"llava_ov": tiny_builder("llava_ov"), "llava_vid": tiny_builder("llava_vid")}
