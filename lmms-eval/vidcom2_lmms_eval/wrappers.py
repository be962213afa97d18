"""Thin lmms-eval model wrappers: parse model_args, load through llava.runtime, answer, meter.

All model logic (prompt template, frame decoding, vision, compression, generation) lives in the model
adapters behind :func:`llava.families_index.load_video_llm`; a wrapper only turns lmms-eval requests into
``VideoLLM.answer`` calls and records what each call cost.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger

from llava.families_index import load_video_llm
from llava.runtime import GenerationOptions, InferenceResult
from llava.video_io import VideoReadError
from vidcom2_lmms_eval.args import WrapperSettings, parse_model_args
from vidcom2_lmms_eval.meter import EfficiencyMeter, SampleRecord
from vidcom2_lmms_eval.prefetch_requests import check_prefetch, streamed_reads
from vidcom2_lmms_eval.resume import ResumeCache, sample_key


class VideoSampleError(ValueError):
    """A request's video is missing or unreadable; the message names the task, doc id and path."""


class TaskVisualError(VideoSampleError):
    """The task's own doc_to_visual gave up on a doc (lmms-eval's videomme and mlvu call ``sys.exit``
    when a video file is missing); the message names the task, the doc id and the task's own words."""


def call_task_visual(fn: Any, doc: Any, task: str, doc_id: Any) -> Any:
    """``fn(doc)`` (a task's doc_to_visual or doc_to_messages) with its exits turned into errors.

    Why: lmms-eval 0.7.3's videomme and mlvu_dev ``doc_to_visual`` call ``sys.exit("video path:... does
    not exist")`` for a missing file; unguarded, that ends every rank's whole run with a message naming
    neither task nor doc. A SystemExit or OSError here becomes a :class:`TaskVisualError` (a failed
    sample under on_video_error=record); any other exception is re-raised naming task and doc id.
    """
    try:
        return fn(doc)
    except SystemExit as exc:
        raise TaskVisualError(
            f"{task} doc_id={doc_id}: the task's doc_to_visual exited (sys.exit) instead of returning a video: "
            f"{exc.code}"
        ) from None
    except OSError as exc:
        raise TaskVisualError(f"{task} doc_id={doc_id}: the task's doc_to_visual failed: {exc}") from exc
    except Exception as exc:
        kind = type(exc).__name__
        raise ValueError(f"{task} doc_id={doc_id}: the task's doc_to_visual raised {kind}: {exc}") from exc


def _cli_value(flag: str) -> str | None:
    """Value of ``--flag`` on lmms-eval's command line (it does not hand its output path to models)."""
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def default_meter_dir(pretrained: str) -> Path | None:
    """lmms-eval's own results folder: <output_path>/<sanitized model name>/ (as EvaluationTracker does)."""
    output_path = _cli_value("--output_path")
    if output_path is None:
        return None
    from lmms_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lmms_eval.utils import sanitize_model_name

    name = GeneralConfigTracker._get_model_name(_cli_value("--model_args") or f"pretrained={pretrained}")
    return Path(output_path) / sanitize_model_name(name or pretrained)


def generation_options(
    gen_kwargs: dict[str, Any], default_max_new_tokens: int, decode_mode: str = "auto"
) -> GenerationOptions:
    """lmms-eval generation_kwargs -> GenerationOptions (temperature 0 means greedy, as in the built-ins).

    ``decode_mode`` is a model_arg (how to run the model), not a task's generation kwarg."""
    gen = dict(gen_kwargs or {})
    until = gen.pop("until", None)
    stop = (until,) if isinstance(until, str) else tuple(until or ())
    beams = int(gen.pop("num_beams", 1) or 1)
    if beams != 1:
        raise ValueError(f"generation_kwargs num_beams={beams}: beam search is not supported by the VidCom2 adapters")
    temperature = float(gen.pop("temperature", 0.0) or 0.0)
    do_sample = bool(gen.pop("do_sample", False)) and temperature > 0
    return GenerationOptions(
        max_new_tokens=int(gen.pop("max_new_tokens", gen.pop("max_gen_toks", default_max_new_tokens))),
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_p=float(gen.pop("top_p", 1.0) or 1.0),
        stop=stop,
        decode_mode=decode_mode,
    )


def _single_video(visuals: Any, task: str, doc_id: Any) -> str:
    """The one video path of a request; anything else is a clear error."""
    items = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
    items = [v for v in items if v is not None]
    if len(items) != 1 or not isinstance(items[0], (str, os.PathLike)):
        kinds = [type(v).__name__ for v in items]
        raise ValueError(
            f"{task} doc_id={doc_id}: the VidCom2 wrappers take exactly one video path per request, got {kinds}"
        )
    return str(items[0])


def split_devices(llm: Any) -> tuple[torch.device, ...]:
    """The GPUs a split model's device map uses (empty for a model on one device)."""
    device_map = getattr(getattr(llm, "model", None), "hf_device_map", None) or {}
    names = sorted({str(d) for d in device_map.values() if str(d).startswith("cuda")})
    return tuple(torch.device(n) for n in names)


class VidCom2Wrapper(lmms):
    """Shared body of the five ids; subclasses only name their lmms-eval id."""

    model_id: str = ""
    is_simple = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.settings: WrapperSettings = parse_model_args(self.model_id, kwargs)
        s = self.settings
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = world
        device = s.device
        if s.placement.split and world > 1:
            raise ValueError(
                f"model_arg device_map={s.raw.get('device_map')!r} splits one model over this host's devices; "
                f"{world} processes would each take every device: launch one process (GPUS=1)"
            )
        if world > 1 and device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per process, as the built-ins
        placement = replace(s.placement, device=device)
        self.model = load_video_llm(
            s.pretrained, family=s.family, dtype=s.dtype, attn_implementation=s.attn_implementation, placement=placement
        )
        # a split model's entry device (vision tower, embedding): inputs go there, the meter reads its memory
        self._device = torch.device(self.model.device) if placement.split else torch.device(device)
        self._check_adapter_matches()
        if s.preprocess_device is not None:
            if not hasattr(self.model, "preprocess_device"):
                raise ValueError(
                    f"model_arg preprocess_device: the {getattr(self.model, 'family', '?')} adapter has no "
                    "separate video processor to move"
                )
            self.model.preprocess_device = s.preprocess_device
        if s.vision_head is not None:
            if not hasattr(self.model, "load_vision_head"):
                raise ValueError(
                    f"model_arg vision_head: the {getattr(self.model, 'family', '?')} adapter computes FastVID's "
                    "signals from its own tower and takes no SigLIP head"
                )
            self.model.load_vision_head(s.vision_head)
        supplied = getattr(self.model, "supplied_signals", None)
        if supplied is not None:  # an unsupported method fails here, before any sample
            s.compression.check_supported(self.model.family, supplied, getattr(self.model, "signal_hint", ""))
        check_prefetch(self.model, s.prefetch_workers)
        if s.batch_size > 1 and not hasattr(self.model, "answer_batch"):
            raise ValueError(
                f"batch_size={s.batch_size}: the {getattr(self.model, 'family', '?')} adapter has no answer_batch; "
                "use --batch_size 1"
            )
        self.batch_size_per_gpu = s.batch_size
        self.meter = EfficiencyMeter(self._device, self._run_info(), split_devices(self.model))
        self.resume = ResumeCache(s.resume_dir, self._rank) if s.resume_dir else None
        self._finalized = False
        logger.info(
            f"[vidcom2] --model {self.model_id}: {s.compression.describe()} ({s.compression_source}), {s.sampling}"
        )

    # ------------------------------------------------------------------ setup helpers
    def _check_adapter_matches(self) -> None:
        """Apply mm_spatial_pool_mode (the built-in LLaVA wrappers override the checkpoint's with their
        own default or the given value) and refuse a conv_template the adapter does not use."""
        s = self.settings
        family = getattr(self.model, "family", "?")
        if s.mm_spatial_pool_mode is not None:
            if hasattr(self.model, "mm_spatial_pool_mode"):
                self.model.mm_spatial_pool_mode = s.mm_spatial_pool_mode
            elif "mm_spatial_pool_mode" in s.raw:
                raise ValueError(f"model_arg mm_spatial_pool_mode: the {family} adapter has no spatial pooling to set")
        if s.conv_template is not None:
            have = getattr(self.model, "conv_template", None)
            if have is None:
                raise ValueError(f"model_arg conv_template={s.conv_template!r}: the {family} adapter has no template")
            if str(have) != s.conv_template:
                raise ValueError(
                    f"model_arg conv_template={s.conv_template!r} but the {family} adapter implements {have!r} only"
                )

    def _run_info(self) -> dict[str, Any]:
        s = self.settings
        info = {
            "model_id": self.model_id,
            "pretrained": s.pretrained,
            "family": getattr(self.model, "family", s.family),
            "compressor": s.compression.compressor,
            "retention": s.compression.retention,
            "compression": s.compression.describe(),
            "compression_options": dict(s.compression.options),
            "compression_source": s.compression_source,
            "sampling": asdict(s.sampling),
            "frames": s.frames,
            "dtype": s.dtype,
            "attn_implementation": s.attn_implementation,
            "device": str(self._device),
            "batch_size": s.batch_size,
            "decode_mode": s.decode_mode,
            "prefetch_workers": s.prefetch_workers,
        }
        if s.placement.split:  # only then: unsplit runs keep the meter fields they had
            info["device_map"] = getattr(self.model.model, "hf_device_map", {})
        return info

    def _signature(self) -> dict[str, Any]:
        info = self._run_info()
        keys = ("model_id", "pretrained", "compression", "sampling", "dtype", "attn_implementation", "decode_mode")
        return {k: info[k] for k in keys}  # decode_mode too: in bf16 it may change a near-tied greedy token

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------ request plumbing
    def _unpack(self, request: Instance) -> tuple[str, dict, str, Any, str, str]:
        """-> (question, gen_kwargs, video path, doc_id, task, split) from the simple-API args."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        visuals = call_task_visual(doc_to_visual, self.task_dict[task][split][doc_id], task, doc_id)
        return context, gen_kwargs, _single_video(visuals, task, doc_id), doc_id, task, split

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(f"--model {self.model_id} (VidCom2 wrapper) supports generate_until tasks only")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"--model {self.model_id} (VidCom2 wrapper) supports generate_until tasks only")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        todo: list[tuple[int, tuple, str | None]] = []
        for i, req in enumerate(requests):
            padding = bool((req.metadata or {}).get("__padding_only__")) if isinstance(req.metadata, dict) else False
            try:
                unpacked = self._unpack(req)
            except TaskVisualError as exc:  # raises unless on_video_error=record
                doc_id, task, split = req.args[3:6]
                results[i] = self._video_failure(("", {}, None, doc_id, task, split, padding), exc, str(exc))
                continue
            question, gen_kwargs, video, doc_id, task, split = unpacked
            key = sample_key(self._signature(), task, split, doc_id, question, gen_kwargs) if self.resume else None
            hit = self.resume.get(key) if self.resume and key else None
            if hit is not None:
                record = SampleRecord(**{**hit["record"], "status": "cached", "rank": self._rank})
                if not padding:
                    self.meter.add(record)
                results[i] = self._result(hit["text"], record.tokens_after, record.output_tokens)
                continue
            todo.append((i, (*unpacked, padding), key))
        step = self.settings.batch_size
        plan = [(str(u[2]), str(u[0])) for _, u, _ in todo]  # (video, question) in the order they are asked
        with streamed_reads(self, plan, total=len(requests)):  # the next batches are read while one runs
            for start in range(0, len(todo), step):
                chunk = todo[start : start + step]
                for (i, _, _), result in zip(chunk, self._answer_chunk(chunk), strict=True):
                    results[i] = result
        return [r for r in results if r is not None]

    def _result(self, text: str, tokens_after: int, output_tokens: int) -> GenerationResult:
        # lmms-eval's own efficiency fields: input = visual tokens the LLM saw, output = generated tokens
        return GenerationResult(
            text=text, token_counts=TokenCounts(input_tokens=tokens_after, output_tokens=output_tokens)
        )

    def _answer_chunk(self, chunk: list[tuple[int, tuple, str | None]]) -> list[GenerationResult]:
        """Answer one batch; a missing/corrupt video raises (naming doc and path) or is recorded as failed."""
        s = self.settings
        items = [u for _, u, _ in chunk]
        generation = generation_options(items[0][1], s.max_new_tokens, s.decode_mode)
        ok_items, outputs = [], []
        for item in items:
            question, _, video, doc_id, task, _split, padding = item
            if not Path(video).exists():
                outputs.append(self._video_failure(item, FileNotFoundError(f"no such file or directory: {video}")))
            else:
                ok_items.append(item)
                outputs.append(None)
        answered = self._run_model(ok_items, generation)
        it = iter(answered)
        final: list[GenerationResult] = []
        for (_, item, key), out in zip(chunk, outputs, strict=True):
            if out is not None:
                final.append(out)
                continue
            answer_or_error, seconds, peaks = next(it)
            if isinstance(answer_or_error, BaseException):
                final.append(self._video_failure(item, answer_or_error))
                continue
            final.append(self._record_answer(item, key, answer_or_error, seconds, peaks, len(ok_items)))
        return final

    def _run_model(self, items: list[tuple], generation: GenerationOptions) -> list[tuple[Any, float, tuple]]:
        """(InferenceResult | video error, wall seconds, (peak alloc, peak reserved)) per item."""
        if not items:
            return []
        s = self.settings
        self.meter.memory.reset()
        start = time.perf_counter()
        try:
            if len(items) == 1:
                res = [
                    self.model.answer(
                        items[0][2], items[0][0], compression=s.compression, generation=generation, sampling=s.sampling
                    )
                ]
            else:
                res = self.model.answer_batch(
                    [it[2] for it in items],
                    [it[0] for it in items],
                    compression=s.compression,
                    generation=generation,
                    sampling=s.sampling,
                )
        except (VideoReadError, FileNotFoundError) as exc:
            if len(items) == 1:
                return [(exc, time.perf_counter() - start, self.meter.memory.read())]
            # a batch failed on one video: redo one by one so only that sample fails
            return [r for item in items for r in self._run_model([item], generation)]
        wall = (time.perf_counter() - start) / len(items)
        peaks = self.meter.memory.read()
        return [(r, wall, peaks) for r in res]

    def _video_failure(self, item: tuple, exc: BaseException, message: str | None = None) -> GenerationResult:
        question, _, video, doc_id, task, _split, padding = item
        message = message or f"{task} doc_id={doc_id}: cannot read video {video}: {exc}"
        if self.settings.on_video_error != "record":
            raise VideoSampleError(message + " (model_arg on_video_error=record counts it as a failed sample)") from exc
        logger.error(f"[vidcom2] failed sample recorded: {message}")
        if not padding:
            self.meter.add(
                SampleRecord(task=task, doc_id=doc_id, rank=self._rank, status="failed", error=message, video=video)
            )
        return GenerationResult(text="", token_counts=TokenCounts(input_tokens=0, output_tokens=0))

    def _record_answer(
        self, item: tuple, key: str | None, res: InferenceResult, wall: float, peaks: tuple, batch: int
    ) -> GenerationResult:
        question, _, video, doc_id, task, _split, padding = item
        record = SampleRecord(
            task=task,
            doc_id=doc_id,
            rank=self._rank,
            timings={k: float(v) for k, v in res.timings.items()},
            wall_s=wall,
            tokens_before=int(res.visual_tokens_before),
            tokens_after=int(res.visual_tokens_after),
            output_tokens=len(res.output_ids),
            frames=res.extra.get("frames") if isinstance(res.extra, dict) else None,
            peak_allocated_bytes=peaks[0],
            peak_reserved_bytes=peaks[1],
            batch_size=batch,
            video=video,
            layer_average_retention=float(res.layer_average_retention),
        )
        if not padding:
            self.meter.add(record)
            if self.resume is not None and key is not None:
                self.resume.put(key, res.answer, asdict(record))
        return self._result(res.answer, record.tokens_after, record.output_tokens)

    # ------------------------------------------------------------------ end of run
    def finalize_meter(self) -> Path | None:
        """Gather every rank's records and write the meter (rank 0). Called from clean(), which every
        rank runs exactly once after its last request in lmms-eval 0.7.3's evaluate()."""
        if self._finalized:
            return None
        self._finalized = True
        out = Path(self.settings.meter_dir) if self.settings.meter_dir else default_meter_dir(self.settings.pretrained)
        if out is None and self._rank == 0:
            logger.warning("[vidcom2] no --output_path and no meter_dir model_arg: efficiency meter not written")
        path = self.meter.finalize(out, self._rank, self._world_size)
        if path is not None:
            logger.info(f"[vidcom2] efficiency meter written to {path}")
        return path

    def clean(self) -> None:
        self.finalize_meter()
        super().clean()


class ChatMixin:
    """lmms-eval's chat API: Instance.args = (ctx, doc_to_messages, gen_kwargs, doc_id, task, split).

    The question is the text of the user turn (lmms-eval builds it with the same doc_to_text as for
    simple models); the adapter applies the model's own chat template and system prompt.
    """

    is_simple = False

    def _unpack(self, request: Instance) -> tuple[str, dict, str, Any, str, str]:
        _ctx, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
        messages = call_task_visual(doc_to_messages, self.task_dict[task][split][doc_id], task, doc_id)
        videos, texts = [], []
        for message in messages:
            if message.get("role") != "user":
                continue
            content = message.get("content")
            for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
                if part.get("type") == "video":
                    videos.append(part.get("url") or part.get("video") or part.get("path"))
                elif part.get("type") == "text":
                    texts.append(part.get("text", ""))
                elif part.get("type") in ("image", "audio"):
                    raise ValueError(
                        f"{task} doc_id={doc_id}: the VidCom2 wrappers take video only, got {part.get('type')}"
                    )
        return "\n".join(texts), gen_kwargs, _single_video(videos, task, doc_id), doc_id, task, split


class LlavaOneVision(VidCom2Wrapper):
    model_id = "llava_onevision"


class LlavaVid(VidCom2Wrapper):
    model_id = "llava_vid"


class Qwen2VL(VidCom2Wrapper):
    model_id = "qwen2_vl"


class Qwen25VL(VidCom2Wrapper):
    model_id = "qwen2_5_vl"


class Qwen3VL(VidCom2Wrapper):
    model_id = "qwen3_vl"


class Qwen25VLChat(ChatMixin, Qwen25VL):
    pass


class Qwen3VLChat(ChatMixin, Qwen3VL):
    pass
