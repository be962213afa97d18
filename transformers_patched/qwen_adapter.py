"""The Qwen2-VL / Qwen2.5-VL / Qwen3-VL adapter: videos and questions in, answers and meters out.

``QwenVideoLLM`` is what :func:`llava.runtime.load_video_llm` returns for these families. It reads and
samples videos (llava.video_io), builds the prompt with the checkpoint's chat template and processor,
then runs the stages of :mod:`transformers_patched.qwen_stages`. Compression is chosen per call.

Frame timing: frames are sampled by us, so the processor gets each video's true metadata (source fps,
total frames and the indices actually used). Qwen3-VL's timestamps come from those indices; Qwen2.5-VL's
``second_per_grid_ts`` is set from the sampled timestamps (mean frame spacing x temporal patch size),
not from the average rate of the whole video.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoProcessor, PreTrainedModel
from transformers.video_utils import VideoMetadata

from llava.model.compression import CompressionSpec
from llava.model.lm_driver import generate, layer_average_retention, stop_string_check
from llava.model.method_api import LLM_ATTENTION_ROWS
from llava.placement import Placement
from llava.runtime import FrameSampling, GenerationOptions, InferenceResult, StageTimer, cut_at_stop, maybe_stage
from llava.video_io import VideoClip, read_videos
from transformers_patched import qwen_stages as stages
from transformers_patched.qwen_arch import QwenArch, arch_of_config, load_model
from transformers_patched.qwen_vit_signals import QWEN_SIGNALS

QWEN_DEFAULT_FPS = 2.0  # qwen-vl-utils' default sampling rate
QWEN_DEFAULT_MAX_FRAMES = 768

Message = dict[str, Any]
Conversation = list[Message]


def qwen_sampling(sampling: FrameSampling) -> FrameSampling:
    """Fill Qwen's defaults (2 fps, at most 768 frames) when neither a frame count nor a rate is given."""
    if sampling.num_frames is not None or sampling.fps is not None:
        return sampling
    return FrameSampling(
        fps=QWEN_DEFAULT_FPS,
        max_frames=sampling.max_frames or QWEN_DEFAULT_MAX_FRAMES,
        force_sample=sampling.force_sample,
        min_pixels=sampling.min_pixels,
        max_pixels=sampling.max_pixels,
    )


def clip_metadata(clip: VideoClip) -> VideoMetadata:
    """The processor's view of a sampled clip: true fps, total frames and the frame indices used."""
    indices = np.rint(clip.timestamps * clip.source_fps).astype(np.int64).tolist()
    return VideoMetadata(
        total_num_frames=clip.total_frames,
        fps=float(clip.source_fps),
        duration=float(clip.duration),
        frames_indices=indices,
        height=int(clip.frames.shape[1]),
        width=int(clip.frames.shape[2]),
    )


def seconds_per_temporal_patch(clip: VideoClip, temporal_patch_size: int) -> float:
    """Seconds covered by one temporal patch of the frames actually used (mean spacing x patch size)."""
    if clip.num_frames > 1:
        spacing = float(clip.timestamps[-1] - clip.timestamps[0]) / (clip.num_frames - 1)
    else:
        spacing = 1.0 / float(clip.source_fps)
    # rounded: transformers 5.17 truncates it with int() in get_rope_index, so 0.9999999 must not reach it
    return round(spacing * temporal_patch_size, 6)


# Inputs get_rope_index reads on the host: they stay there when a prepared batch moves to the device.
HOST_INPUTS = ("second_per_grid_ts",)


@dataclass
class PreparedBatch:
    """Processor output plus what the results report about it.

    on_device: the tensors are on the model's device (:meth:`QwenVideoLLM.prepare`); False after the host
    stage alone (:meth:`QwenVideoLLM.prepare_batch`: on the CPU, or where preprocess_device put them,
    pixel values already in the model's dtype). seconds: host stage seconds the results' timings get
    (filled by prepare_batch when it timed itself).
    """

    inputs: dict[str, Any]
    clips: list[VideoClip]
    questions: list[str]
    videos_per_row: list[int]
    on_device: bool = True
    seconds: dict[str, float] = field(default_factory=dict)
    positions: torch.Tensor | None = None  # (4, B, L) prompt positions, computed on the host (qwen_stages)
    placeholders: dict[str, int] | None = None  # image / video placeholder tokens, counted on the host


class QwenVideoLLM:
    """A Qwen video LLM with per-call compression. See the module docstring."""

    def __init__(self, model: PreTrainedModel, processor: Any, *, family: str | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self.arch: QwenArch = arch_of_config(model.config)
        self.family = family or self.arch.name
        self.processor.tokenizer.padding_side = "left"
        # Where the HF video processor resizes and normalises frames. None = on the CPU, as the stock
        # pipeline (and lmms-eval) does; "cuda" moves that work to the GPU (much faster, but resampling
        # kernels differ, so pixel values may differ in the last bits from the CPU path).
        self.preprocess_device: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        attn_implementation: str = "sdpa",
        placement: Placement | None = None,
    ) -> QwenVideoLLM:
        model = load_model(path, device=device, dtype=dtype, attn_implementation=attn_implementation,
                           placement=placement)  # fmt: skip
        return cls(model, AutoProcessor.from_pretrained(str(path)))

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ preprocessing

    def _video_processing(self, sampling: FrameSampling, clips: list[VideoClip]) -> tuple[Any, dict[str, Any]]:
        """(processor to call, its video options): pre-sampled frames, and the pixel budget when given.

        FrameSampling.min_pixels / max_pixels are per frame. Qwen2/2.5-VL's processor size is per frame.
        Qwen3-VL's size is a budget over all frames of a video: when every video of the call has the same
        (even-rounded) frame count, the per-frame budgets times that count are exact; otherwise max_pixels
        becomes the per-frame cap (``cap_pixels_per_frame``, ``max_video_tokens`` = max_pixels /
        (patch * merge)^2, the qwen-vl-utils rule, on a shallow copy of the processor) and min_pixels the
        processor's total lower bound ``shortest_edge``.
        """
        kwargs: dict[str, Any] = {"do_sample_frames": False}
        if self.preprocess_device is not None:
            kwargs["device"] = self.preprocess_device
        processor = self.processor
        if sampling.min_pixels is None and sampling.max_pixels is None:
            return processor, kwargs
        for name in ("min_pixels", "max_pixels"):
            value = getattr(sampling, name)
            if value is not None and value < 1:
                raise ValueError(f"FrameSampling.{name} must be >= 1, got {value}")
        if sampling.min_pixels is not None and sampling.max_pixels is not None:
            if sampling.min_pixels > sampling.max_pixels:
                raise ValueError(
                    f"FrameSampling.min_pixels={sampling.min_pixels} exceeds max_pixels={sampling.max_pixels}"
                )
        video = processor.video_processor
        size = dict(video.size)
        low = sampling.min_pixels if sampling.min_pixels is not None else size["shortest_edge"]
        high = sampling.max_pixels if sampling.max_pixels is not None else size["longest_edge"]
        if self.arch.total_pixel_budget:
            tp = int(video.temporal_patch_size)
            counts = {-(-c.num_frames // tp) * tp for c in clips}
            if len(counts) == 1:
                frames = counts.pop()
                low = low * frames if sampling.min_pixels is not None else low
                high = high * frames if sampling.max_pixels is not None else high
            elif sampling.max_pixels is not None:
                video = copy.copy(video)
                video.max_video_tokens = max(1, sampling.max_pixels // (video.patch_size * video.merge_size) ** 2)
                processor = copy.copy(processor)
                processor.video_processor = video
                kwargs["cap_pixels_per_frame"] = True
                high = max(int(size["longest_edge"]), sampling.max_pixels * QWEN_DEFAULT_MAX_FRAMES)
                low = min(low, sampling.max_pixels)
        kwargs["size"] = {"shortest_edge": int(low), "longest_edge": int(high)}
        return processor, kwargs

    @staticmethod
    def _video_source(item: Any) -> str | Path | VideoClip:
        """Check a video item before the batch is decoded, so a wrong type fails before any decoding."""
        if isinstance(item, (str, Path, VideoClip)):
            return item
        raise TypeError(f"a video item must be a path or a VideoClip, got {type(item).__name__}")

    def prepare(
        self,
        conversations: Sequence[Conversation],
        sampling: FrameSampling = FrameSampling(),
        *,
        timer: Any = None,
        on_host: bool = False,
        pin_memory: bool = False,
    ) -> PreparedBatch:
        """Chat messages (HF format; video items carry ``video``: path or VideoClip, images ``image``)
        -> processor output on the device. Items are kept in message order across the batch.

        ``on_host``: stop before the copy to the device (the host stage of :meth:`prepare_batch`);
        ``pin_memory`` then puts the CPU tensors in pinned memory when the model is on a GPU."""
        if not conversations:
            raise ValueError("conversations must hold at least one conversation")
        sampling = qwen_sampling(sampling)
        sources: list[Any] = []  # video items in message order across the batch, decoded together below
        images: list[Any] = []
        videos_per_row: list[int] = []
        with maybe_stage(timer, "read_video"):
            for conversation in conversations:
                videos_per_row.append(0)
                for message in conversation:
                    content = message.get("content")
                    for item in content if isinstance(content, list) else []:
                        if item.get("type") == "video":
                            if item.get("video") is None:
                                raise ValueError("a video item of the messages has no 'video' (path or VideoClip)")
                            sources.append(self._video_source(item["video"]))
                            videos_per_row[-1] += 1
                        elif item.get("type") == "image":
                            if item.get("image") is None:
                                raise ValueError("an image item of the messages has no 'image'")
                            images.append(_load_image(item["image"]))
            clips: list[VideoClip] = read_videos(sources, sampling)  # on threads, in order
        with maybe_stage(timer, "preprocess"):
            texts = [
                self.processor.apply_chat_template(list(c), add_generation_prompt=True, tokenize=False)
                for c in conversations
            ]
            kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
            processor = self.processor
            if clips:
                processor, video_kwargs = self._video_processing(sampling, clips)
                kwargs.update(
                    videos=[c.frames for c in clips],
                    video_metadata=[clip_metadata(c) for c in clips],
                    videos_kwargs=video_kwargs,
                )
            if images:
                kwargs["images"] = images
            batch = dict(processor(**kwargs))
            if clips and self.arch.timed_rope:
                patch = int(self.processor.video_processor.temporal_patch_size)
                batch["second_per_grid_ts"] = torch.tensor(
                    [seconds_per_temporal_patch(c, patch) for c in clips], dtype=torch.float32
                )
            # positions from the CPU ids and grids now: no GPU work to wait for, none left for later
            positions = stages.prompt_positions(self.model, batch)
            placeholders = stages.placeholder_counts(self.model, batch)
            if on_host:  # cast where the processor ran (half the bytes to copy later), pin for a fast copy
                inputs = self._cast_pixels(dict(batch.items()))
                if pin_memory and self.device.type == "cuda":
                    inputs = {k: v.pin_memory() if _cpu_tensor(v) else v for k, v in inputs.items()}
            else:
                inputs = self._cast_pixels(self._on_device(batch))
                positions = positions.to(self.device)
        questions = [_last_user_text(c) for c in conversations]
        return PreparedBatch(
            inputs=inputs,
            clips=clips,
            questions=questions,
            videos_per_row=videos_per_row,
            on_device=not on_host,
            positions=positions,
            placeholders=placeholders,
        )

    def _on_device(self, inputs: Any) -> dict[str, Any]:
        """Tensors moved to the model's device (asynchronously from pinned memory), HOST_INPUTS left."""
        return {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) and k not in HOST_INPUTS else v
            for k, v in inputs.items()
        }

    def _cast_pixels(self, inputs: dict[str, Any]) -> dict[str, Any]:
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(self.model.dtype)
        return inputs

    def prepare_batch(
        self,
        videos: Sequence[str | Path | VideoClip],
        questions: Sequence[str],
        sampling: FrameSampling = FrameSampling(),
        *,
        timer: StageTimer | None = None,
        pin_memory: bool = False,
    ) -> PreparedBatch:
        """The host half of :meth:`answer_batch`: read and decode the videos (on threads), run the HF
        processor (on the CPU unless preprocess_device), no copy to the GPU - so a prefetch thread can run
        it while the GPU answers an earlier batch. Without ``timer`` it times itself (host clock) and the
        result carries the seconds. Raises :class:`llava.video_io.VideoReadError` for an unreadable video."""
        if len(videos) != len(questions):
            raise ValueError(f"answer_batch got {len(videos)} videos but {len(questions)} questions")
        conversations = [video_question_messages(v, q) for v, q in zip(videos, questions, strict=True)]
        own = timer is None
        timer = timer or StageTimer()
        prepared = self.prepare(conversations, sampling, timer=timer, on_host=True, pin_memory=pin_memory)
        if own:
            prepared.seconds = timer.seconds
        return prepared

    def answer_prepared(
        self,
        prepared: PreparedBatch,
        *,
        compression: CompressionSpec = CompressionSpec(),
        generation: GenerationOptions = GenerationOptions(),
        timer: StageTimer | None = None,
    ) -> list[InferenceResult]:
        """The device half: copy a prepared batch to the GPU (charged to ``preprocess``), then :meth:`run`;
        each result's ``extra`` gets its videos' frame counts and timestamps. ``timer``: the request's timer
        when the caller timed the host stage with it; by default a new one, charged ``prepared.seconds``.
        ``prepared`` is not changed: it may be answered again."""
        self._check_compression(compression)
        if timer is None:
            timer = StageTimer(self.device)
            for stage, seconds in prepared.seconds.items():
                timer.add(stage, seconds)
        if not prepared.on_device:
            with timer.stage("preprocess"):
                inputs, positions = self._on_device(prepared.inputs), prepared.positions
                positions = positions.to(self.device, non_blocking=True) if positions is not None else None
                prepared = replace(prepared, inputs=inputs, on_device=True, positions=positions)
        results = self.run(prepared, compression=compression, generation=generation, timer=timer)
        clips = iter(prepared.clips)
        for result, count in zip(results, prepared.videos_per_row, strict=True):
            row_clips = [next(clips) for _ in range(count)]
            result.extra["frames"] = [c.num_frames for c in row_clips]
            result.extra["frame_timestamps"] = [np.round(c.timestamps, 3).tolist() for c in row_clips]
        return results

    # ------------------------------------------------------------------ running

    def _check_compression(self, compression: CompressionSpec) -> None:
        if not isinstance(compression, CompressionSpec):
            raise TypeError(f"compression must be a CompressionSpec, got {type(compression).__name__}")
        compression.check_supported(self.family, self.supplied_signals)
        compression.llm_plan(self.model.config.text_config.num_hidden_layers)  # its layers and R, checked now

    @property
    def supplied_signals(self) -> frozenset[str]:
        """The signals these families compute for compression methods: the vision tower's
        (transformers_patched.qwen_vit_signals) and attention rows inside the LM (the layer-wise driver)."""
        return frozenset({*QWEN_SIGNALS, LLM_ATTENTION_ROWS})

    def run(
        self,
        prepared: PreparedBatch,
        *,
        compression: CompressionSpec = CompressionSpec(),
        generation: GenerationOptions = GenerationOptions(),
        timer: StageTimer | None = None,
    ) -> list[InferenceResult]:
        """Vision -> compress -> prefill -> decode on a prepared batch; one result per conversation."""
        self._check_compression(compression)
        timer = timer or StageTimer(self.device)
        inputs = prepared.inputs
        with timer.stage("vision"):
            vision = stages.encode_vision(self.model, inputs, compression.tower_signals)
        with timer.stage("compress"):
            keep_flags = stages.select_video_tokens(self.model, inputs, vision, compression)
        with timer.stage("prefill"):
            lm_inputs = stages.build_prefill(
                self.model, inputs, vision, keep_flags, prepared.positions, prepared.placeholders
            )
            batch = stages.lm_inputs(lm_inputs)
        stack = stages.qwen_stack(self.model)
        tokenizer = self.processor.tokenizer
        out = generate(
            stack,
            batch,
            generation,
            stop_ids=stages.eos_token_ids(self.model),
            stop_check=stop_string_check(tokenizer, generation.stop),
            timer=timer,
            plan=compression.llm_plan(stack.num_layers),
        )
        results = []
        seconds = {stage: 0.0 for stage in ("read_video", "preprocess", "vision", "compress", "prefill", "decode")}
        seconds.update(timer.seconds)
        for row, out_ids in enumerate(out.ids):
            answer = cut_at_stop(tokenizer.decode(out_ids, skip_special_tokens=True), generation.stop)
            before = int(lm_inputs.tokens_before[row])
            results.append(
                InferenceResult(
                    answer=answer,
                    output_ids=out_ids,
                    visual_tokens_before=before,
                    visual_tokens_after=int(lm_inputs.tokens_after[row]),
                    timings=dict(seconds),
                    extra={
                        "family": self.family,
                        "compression": compression.describe(),
                        "batch_size": len(out.ids),
                        "prompt_tokens_after": batch.lengths[row],
                        "layer_average_retention": layer_average_retention(out.layer_visual, row, before),
                        "decode_mode": out.decode_mode,
                    },
                )
            )
        return results

    def answer_messages(
        self,
        conversations: Sequence[Conversation],
        *,
        compression: CompressionSpec = CompressionSpec(),
        generation: GenerationOptions = GenerationOptions(),
        sampling: FrameSampling = FrameSampling(),
    ) -> list[InferenceResult]:
        """The lower-level call: a batch of chat conversations, each with any videos / images."""
        self._check_compression(compression)  # before any video is read
        timer = StageTimer(self.device)
        prepared = self.prepare(conversations, sampling, timer=timer)
        return self.answer_prepared(prepared, compression=compression, generation=generation, timer=timer)

    def answer(
        self,
        video: str | Path | VideoClip,
        question: str,
        *,
        compression: CompressionSpec = CompressionSpec(),
        generation: GenerationOptions = GenerationOptions(),
        sampling: FrameSampling = FrameSampling(),
    ) -> InferenceResult:
        """One question about one video."""
        return self.answer_batch(
            [video], [question], compression=compression, generation=generation, sampling=sampling
        )[0]

    def answer_batch(
        self,
        videos: Sequence[str | Path | VideoClip],
        questions: Sequence[str],
        *,
        compression: CompressionSpec = CompressionSpec(),
        generation: GenerationOptions = GenerationOptions(),
        sampling: FrameSampling = FrameSampling(),
    ) -> list[InferenceResult]:
        """One question per video, run as one padded batch (each video on its own budget)."""
        if len(videos) != len(questions):
            raise ValueError(f"answer_batch got {len(videos)} videos but {len(questions)} questions")
        conversations = [video_question_messages(v, q) for v, q in zip(videos, questions, strict=True)]
        return self.answer_messages(conversations, compression=compression, generation=generation, sampling=sampling)



def video_question_messages(video: str | Path | VideoClip, question: str) -> Conversation:
    """The single-turn chat of one video and one question (video first, as Qwen's examples do)."""
    return [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": question}]}]


def _last_user_text(conversation: Conversation) -> str:
    for message in reversed(conversation):
        content = message.get("content")
        if isinstance(content, str):
            return content
        texts = [item.get("text", "") for item in content or [] if item.get("type") == "text"]
        if texts:
            return " ".join(texts)
    return ""


def _cpu_tensor(value: Any) -> bool:
    return torch.is_tensor(value) and value.device.type == "cpu"


def _load_image(item: Any) -> Any:
    """A PIL image or array passes through; a path is opened (errors name the file)."""
    if isinstance(item, (str, Path)):
        from PIL import Image

        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            return Image.open(path).convert("RGB")
        except Exception as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from exc
    return item
