"""A stand-in VideoLLM for wrapper tests that must not depend on a model family.

It decodes the video for real (llava.video_io, so missing/corrupt files fail as in the adapters),
counts 16 visual tokens per frame and keeps round(R * before) of them; the answer is always "A".
Like the adapters it splits a request into a host stage (``prepare_batch``: reads, recorded in
``calls``) and a device stage (``answer_prepared``); ``answer`` / ``answer_batch`` run both.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava.model.compression import CompressionSpec
from llava.runtime import FrameSampling, GenerationOptions, InferenceResult, StageTimer
from llava.video_io import VideoClip

TOKENS_PER_FRAME = 16


@dataclass(frozen=True)
class FakePrepared:
    clips: list[VideoClip]
    seconds: dict[str, float]


class FakeVideoLLM:
    family = "fake"
    conv_template = "qwen_1_5"
    mm_spatial_pool_mode = "bilinear"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.calls: list[tuple[str, str]] = []  # (video, question) of every video read

    def prepare_batch(self, videos, questions, sampling=FrameSampling(), *, timer=None, pin_memory=False):
        from llava.video_io import read_video

        timer = timer or StageTimer()
        clips = []
        for video, question in zip(videos, questions, strict=True):
            self.calls.append((str(video), question))
            with timer.stage("read_video"):
                clips.append(read_video(video, sampling))
        return FakePrepared(clips, timer.seconds)

    def answer_prepared(self, prepared, *, compression=CompressionSpec(), generation=GenerationOptions()):
        results = []
        for clip in prepared.clips:
            timer = StageTimer(self.device)
            timer.add("read_video", prepared.seconds.get("read_video", 0.0) / len(prepared.clips))
            before = clip.num_frames * TOKENS_PER_FRAME
            after = before if compression.is_identity else max(clip.num_frames, round(compression.retention * before))
            for stage in ("preprocess", "vision", "compress", "prefill", "decode"):
                with timer.stage(stage):
                    pass
            results.append(InferenceResult("A", [65], before, after, timer.seconds, {"frames": clip.num_frames}))
        return results

    def answer(
        self,
        video,
        question,
        *,
        compression=CompressionSpec(),
        generation=GenerationOptions(),
        sampling=FrameSampling(),
    ) -> InferenceResult:
        return self.answer_batch(
            [video], [question], compression=compression, generation=generation, sampling=sampling
        )[0]

    def answer_batch(
        self,
        videos,
        questions,
        *,
        compression=CompressionSpec(),
        generation=GenerationOptions(),
        sampling=FrameSampling(),
    ) -> list[InferenceResult]:
        prepared = self.prepare_batch(videos, questions, sampling)
        return self.answer_prepared(prepared, compression=compression, generation=generation)


def fake_loader(
    path, *, family=None, device="cpu", dtype="float32", attn_implementation="sdpa", placement=None
) -> FakeVideoLLM:
    return FakeVideoLLM(placement.device if placement is not None else device)
