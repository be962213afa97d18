"""Reading videos into uint8 RGB frames, with the frame sampling rules of LLaVA-OV and LLaVA-Video.

One entry point, :func:`read_video`, for every family, the CLI and the lmms-eval wrappers:

- a video file is decoded with decord when it is importable (fast, Linux x86_64 wheels only) and with
  PyAV otherwise (``backend="auto"``); ``backend="decord"`` / ``"pyav"`` force one;
- a directory of frame images (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.webp``; MVBench ships some
  videos this way) is a video whose frames are the images sorted by file name, played at
  ``folder_fps`` frames per second (default 1.0: each image is one second);
- every failure (missing path, undecodable file, zero frames) raises :class:`VideoReadError`, a
  ``ValueError`` whose message names the path;
- :func:`read_videos` reads the videos of one batch on threads (decord and PyAV release the GIL while
  decoding), results in input order, the first failing item's error re-raised as is.

Frame sampling (:func:`sample_frame_indices`, pure and deterministic), in this order of precedence:

1. ``num_frames=N``: N indices uniform over the whole video, ``linspace(0, total-1, N)`` truncated to
   int (LLaVA-OneVision; N larger than the video repeats frames, as upstream does);
2. ``fps=f``: every ``round(source_fps / f)``-th frame (at least every frame); when that gives more
   than ``max_frames`` frames, or ``force_sample`` is set, exactly ``max_frames`` uniform frames instead
   (LLaVA-Video: fps 1, max_frames 64, force_sample=True);
3. neither: every frame, or ``max_frames`` uniform frames when the video is longer than that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llava.runtime import FrameSampling

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BACKENDS = ("auto", "decord", "pyav")
MAX_READ_WORKERS = 8  # one batch's decodes in flight at once; more threads only contend for cores


class VideoReadError(ValueError):
    """A video could not be read; the message always names the path."""


@dataclass
class VideoClip:
    """Sampled frames of one video and where they sit in it.

    frames: (N, H, W, 3) uint8 RGB. timestamps: (N,) float64 seconds of each sampled frame.
    source_fps / duration / total_frames describe the whole video, not the sample.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    source_fps: float
    duration: float
    total_frames: int
    path: str

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def _uniform(total_frames: int, count: int) -> np.ndarray:
    return np.linspace(0, total_frames - 1, count).astype(np.int64)


def sample_frame_indices(total_frames: int, source_fps: float, sampling: FrameSampling) -> np.ndarray:
    """Frame indices (N,) int64 to decode, per the rules in the module docstring."""
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    for name in ("num_frames", "max_frames"):
        value = getattr(sampling, name)
        if value is not None and value < 1:
            raise ValueError(f"FrameSampling.{name} must be >= 1, got {value}")
    if sampling.fps is not None and not sampling.fps > 0:
        raise ValueError(f"FrameSampling.fps must be > 0, got {sampling.fps}")
    if sampling.num_frames is not None:
        return _uniform(total_frames, sampling.num_frames)
    cap = sampling.max_frames
    if sampling.fps is not None:
        step = max(1, round(float(source_fps) / float(sampling.fps))) if source_fps > 0 else 1
        indices = np.arange(0, total_frames, step, dtype=np.int64)
        if cap is not None and (sampling.force_sample or len(indices) > cap):
            return _uniform(total_frames, cap)
        return indices
    if cap is not None and total_frames > cap:
        return _uniform(total_frames, cap)
    return np.arange(total_frames, dtype=np.int64)


def _clip(frames: np.ndarray, indices: np.ndarray, fps: float, total: int, path: Path) -> VideoClip:
    fps = float(fps) if fps and fps > 0 else 1.0
    return VideoClip(
        frames=np.ascontiguousarray(frames, dtype=np.uint8),
        timestamps=indices.astype(np.float64) / fps,
        source_fps=fps,
        duration=total / fps,
        total_frames=int(total),
        path=str(path),
    )


def _read_folder(path: Path, sampling: FrameSampling, folder_fps: float) -> VideoClip:
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise VideoReadError(f"video folder {path} holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
    indices = sample_frame_indices(len(files), folder_fps, sampling)
    try:
        images = [np.asarray(Image.open(files[i]).convert("RGB")) for i in indices]
        frames = np.stack(images)
    except Exception as exc:  # unreadable image, frames of different sizes
        raise VideoReadError(f"cannot read frame images of video folder {path}: {exc}") from exc
    return _clip(frames, indices, folder_fps, len(files), path)


def _read_decord(path: Path, sampling: FrameSampling) -> VideoClip:
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        total, fps = len(reader), float(reader.get_avg_fps())
    except Exception as exc:
        raise VideoReadError(f"cannot decode video {path} (decord): {exc}") from exc
    if total < 1:
        raise VideoReadError(f"video {path} has zero frames")
    indices = sample_frame_indices(total, fps, sampling)
    try:
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except Exception as exc:
        raise VideoReadError(f"cannot decode frames of video {path} (decord): {exc}") from exc
    return _clip(frames, indices, fps, total, path)


def _pyav_pass(path: Path, wanted: np.ndarray | None) -> tuple[dict[int, np.ndarray], int, float, int]:
    """One decoding pass: (frames at the wanted indices, decoded count, fps, container's frame count)."""
    import av

    want = None if wanted is None else set(wanted.tolist())
    kept: dict[int, np.ndarray] = {}
    count = 0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoReadError(f"video {path} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        declared = int(stream.frames or 0)
        if wanted is None and declared > 0:
            return kept, 0, fps, declared
        for frame in container.decode(stream):
            if want is not None and count in want:
                kept[count] = frame.to_ndarray(format="rgb24")
            count += 1
    return kept, count, fps, declared


def _read_pyav(path: Path, sampling: FrameSampling) -> VideoClip:
    # The container's frame count is only a hint: sample on it, decode, and when the decoded
    # count disagrees sample again on the true count (a second pass, rare).
    try:
        _, counted, fps, declared = _pyav_pass(path, None)
        total = declared or counted
        if total < 1:
            raise VideoReadError(f"video {path} has zero frames")
        indices = sample_frame_indices(total, fps, sampling)
        kept, counted, fps, _ = _pyav_pass(path, indices)
        if counted != total:
            if counted < 1:
                raise VideoReadError(f"video {path} has zero frames")
            total = counted
            indices = sample_frame_indices(total, fps, sampling)
            kept, counted, fps, _ = _pyav_pass(path, indices)
    except VideoReadError:
        raise
    except Exception as exc:
        raise VideoReadError(f"cannot decode video {path} (pyav): {exc}") from exc
    frames = np.stack([kept[int(i)] for i in indices])
    return _clip(frames, indices, fps, total, path)


def decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def read_video(
    path: str | Path,
    sampling: FrameSampling = FrameSampling(),
    *,
    backend: str = "auto",
    folder_fps: float = 1.0,
) -> VideoClip:
    """Decode and sample one video file or frame folder (see the module docstring for the rules)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if not folder_fps > 0:
        raise ValueError(f"folder_fps must be > 0, got {folder_fps}")
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, sampling, folder_fps)
    if not path.is_file():
        raise VideoReadError(f"video file not found: {path}")
    if path.stat().st_size == 0:
        raise VideoReadError(f"video {path} is empty (0 bytes)")
    if backend == "decord" or (backend == "auto" and decord_available()):
        return _read_decord(path, sampling)
    return _read_pyav(path, sampling)


def _decoded(item: Any) -> bool:
    return isinstance(item, (np.ndarray, VideoClip))


def read_videos(
    items: Sequence[Any],
    sampling: FrameSampling = FrameSampling(),
    *,
    read: Callable[[Any, FrameSampling], Any] = read_video,
    max_workers: int = MAX_READ_WORKERS,
) -> list[Any]:
    """Read a batch's videos on threads so it pays about one decode, not one per video.

    ``read(item, sampling)`` is called once per item still to decode; items already decoded (an
    ``np.ndarray`` of frames or a :class:`VideoClip`) come back as they are, without a thread. Results
    are in input order. On failure the error of the first failing item (in input order) is re-raised
    unchanged, so a :class:`VideoReadError` still names its file; reads not yet started are cancelled.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    results = list(items)
    todo = [i for i, item in enumerate(results) if not _decoded(item)]
    if len(todo) <= 1 or max_workers == 1:
        for i in todo:
            results[i] = read(results[i], sampling)
        return results
    pool = ThreadPoolExecutor(max_workers=min(len(todo), max_workers), thread_name_prefix="read_video")
    try:
        futures = [(i, pool.submit(read, results[i], sampling)) for i in todo]
        for i, future in futures:
            results[i] = future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results
