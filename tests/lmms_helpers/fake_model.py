"""A stand-in VideoLLM for wrapper tests that must not depend on a model family.

It decodes the video for real (llava.video_io, so missing/corrupt files fail as in the adapters),
counts 16 visual tokens per frame and keeps round(R * before) of them; the answer is always "A".
"""

from __future__ import annotations

from llava.model.compression import CompressionSpec
from llava.runtime import FrameSampling, GenerationOptions, InferenceResult, StageTimer

TOKENS_PER_FRAME = 16


class FakeVideoLLM:
    family = "fake"
    conv_template = "qwen_1_5"
    mm_spatial_pool_mode = "bilinear"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.calls: list[tuple[str, str]] = []

    def answer(
        self,
        video,
        question,
        *,
        compression=CompressionSpec(),
        generation=GenerationOptions(),
        sampling=FrameSampling(),
    ) -> InferenceResult:
        from llava.video_io import read_video

        self.calls.append((str(video), question))
        timer = StageTimer(self.device)
        with timer.stage("read_video"):
            clip = read_video(video, sampling)
        before = clip.num_frames * TOKENS_PER_FRAME
        after = before if compression.is_identity else max(clip.num_frames, round(compression.retention * before))
        for stage in ("preprocess", "vision", "compress", "prefill", "decode"):
            with timer.stage(stage):
                pass
        return InferenceResult("A", [65], before, after, timer.seconds, {"frames": clip.num_frames})

    def answer_batch(self, videos, questions, **kwargs) -> list[InferenceResult]:
        return [self.answer(v, q, **kwargs) for v, q in zip(videos, questions, strict=True)]


def fake_loader(path, *, family=None, device="cpu", dtype="float32", attn_implementation="sdpa") -> FakeVideoLLM:
    return FakeVideoLLM(device)
