"""Frame sampling rules, both decoders, frame folders, synthetic videos, read errors, parallel batch reads."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from llava.runtime import FrameSampling
from llava.synthetic_videos import MANIFEST, make_videos
from llava.video_io import VideoReadError, read_video, read_videos, sample_frame_indices


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("videos")
    return out, make_videos(out, seed=3)


def test_uniform_sampling_is_linspace() -> None:
    idx = sample_frame_indices(100, 30.0, FrameSampling(num_frames=5))
    assert idx.tolist() == [0, 24, 49, 74, 99]
    assert sample_frame_indices(3, 30.0, FrameSampling(num_frames=5)).tolist() == [0, 0, 1, 1, 2]


def test_fps_sampling_caps_and_force_sample() -> None:
    # 10 s at 30 fps sampled at 1 fps: every 30th frame
    assert sample_frame_indices(300, 30.0, FrameSampling(fps=1.0)).tolist() == list(range(0, 300, 30))
    # more than max_frames -> max_frames uniform
    capped = sample_frame_indices(300, 30.0, FrameSampling(fps=1.0, max_frames=4))
    assert capped.tolist() == np.linspace(0, 299, 4).astype(int).tolist()
    # fewer than max_frames: kept, unless force_sample
    assert len(sample_frame_indices(300, 30.0, FrameSampling(fps=1.0, max_frames=64))) == 10
    assert len(sample_frame_indices(300, 30.0, FrameSampling(fps=1.0, max_frames=64, force_sample=True))) == 64


def test_no_sampling_takes_all_or_caps() -> None:
    assert sample_frame_indices(7, 1.0, FrameSampling()).tolist() == list(range(7))
    assert len(sample_frame_indices(700, 1.0, FrameSampling(max_frames=16))) == 16


@pytest.mark.parametrize("bad", [FrameSampling(num_frames=0), FrameSampling(fps=-1.0), FrameSampling(max_frames=0)])
def test_bad_sampling_raises(bad: FrameSampling) -> None:
    with pytest.raises(ValueError):
        sample_frame_indices(10, 10.0, bad)


def test_decoders_agree_and_manifest_holds(videos: tuple[Path, dict]) -> None:
    out, manifest = videos
    assert json.loads((out / MANIFEST).read_text()) == manifest
    for entry in manifest["videos"]:
        if entry["kind"] != "mp4":
            continue
        a = read_video(out / entry["path"], FrameSampling(), backend="decord")
        b = read_video(out / entry["path"], FrameSampling(), backend="pyav")
        assert a.frames.shape == (entry["num_frames"], entry["height"], entry["width"], 3)
        assert a.frames.dtype == np.uint8
        np.testing.assert_array_equal(a.frames, b.frames)
        assert a.source_fps == pytest.approx(entry["fps"]) and b.source_fps == pytest.approx(entry["fps"])
        assert a.total_frames == b.total_frames == entry["num_frames"]
        np.testing.assert_allclose(a.timestamps, np.arange(entry["num_frames"]) / entry["fps"])
        diffs = np.abs(np.diff(a.frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
        for start, end in entry["static_ranges"]:  # frames in [start, end) repeat frame start-1
            assert diffs[start - 1 : end - 1].max() < 0.5
        for cut in entry["scene_cuts"]:  # the cut is by far the largest change
            assert diffs[cut - 1] > 5 * np.delete(diffs, cut - 1).max()


def test_sampled_read_matches_full_read(videos: tuple[Path, dict]) -> None:
    out, _ = videos
    full = read_video(out / "mixed.mp4", FrameSampling(), backend="pyav")
    for backend in ("decord", "pyav"):
        part = read_video(out / "mixed.mp4", FrameSampling(num_frames=5), backend=backend)
        idx = np.linspace(0, 39, 5).astype(int)
        np.testing.assert_array_equal(part.frames, full.frames[idx])
        np.testing.assert_allclose(part.timestamps, idx / 10.0)


def test_frame_folder_is_a_video(videos: tuple[Path, dict]) -> None:
    out, manifest = videos
    entry = next(e for e in manifest["videos"] if e["kind"] == "frame_folder")
    clip = read_video(out / entry["path"], FrameSampling(num_frames=4), folder_fps=2.0)
    assert clip.frames.shape == (4, 64, 64, 3)
    assert clip.total_frames == entry["num_frames"] and clip.source_fps == 2.0
    np.testing.assert_allclose(clip.timestamps, np.linspace(0, 7, 4).astype(int) / 2.0)


@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
def test_missing_and_corrupt_files_name_the_path(tmp_path: Path, backend: str) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoReadError, match="nope.mp4"):
        read_video(missing, backend=backend)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(VideoReadError, match="corrupt.mp4"):
        read_video(corrupt, backend=backend)


def test_zero_frames_raise(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoReadError, match="empty.mp4"):
        read_video(empty)
    folder = tmp_path / "noframes"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a frame")
    with pytest.raises(VideoReadError, match="noframes"):
        read_video(folder)


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend"):
        read_video("x.mp4", backend="opencv")


# --------------------------------------------------------------------------- parallel batch reads


def test_read_videos_keeps_input_order_when_later_items_finish_first() -> None:
    finished: list[str] = []

    def slow_first(item: str, sampling: FrameSampling) -> str:
        time.sleep({"a": 0.3, "b": 0.15}.get(item, 0.0))
        finished.append(item)
        return item.upper()

    assert read_videos(["a", "b", "c"], FrameSampling(), read=slow_first) == ["A", "B", "C"]
    assert finished == ["c", "b", "a"]  # they did run out of order


def test_read_videos_reads_really_overlap() -> None:
    barrier = threading.Barrier(2, timeout=5)  # a sequential read would wait here alone and time out

    def meet(item: int, sampling: FrameSampling) -> int:
        barrier.wait()
        return item * 10

    assert read_videos([1, 2], FrameSampling(), read=meet) == [10, 20]


def test_read_videos_caps_workers_and_reads_one_item_inline() -> None:
    lock, running, peak, threads = threading.Lock(), [0], [0], []

    def count(item: int, sampling: FrameSampling) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            threads.append(threading.current_thread())
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return item

    assert read_videos(list(range(6)), FrameSampling(), read=count, max_workers=2) == list(range(6))
    assert peak[0] == 2
    threads.clear()
    assert read_videos([7], FrameSampling(), read=count) == [7]
    assert threads == [threading.main_thread()]  # one item: no thread pool
    with pytest.raises(ValueError, match="max_workers"):
        read_videos([1, 2], max_workers=0)


def test_read_videos_passes_decoded_items_through(videos: tuple[Path, dict]) -> None:
    out, _ = videos
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    clip = read_video(out / "mixed.mp4", FrameSampling(num_frames=3))
    calls: list[object] = []

    def record(item: object, sampling: FrameSampling) -> str:
        calls.append(item)
        return "read"

    result = read_videos([frames, "x.mp4", clip], FrameSampling(), read=record)
    assert result[0] is frames and result[1] == "read" and result[2] is clip
    assert calls == ["x.mp4"]


def test_read_videos_matches_one_by_one_reads(videos: tuple[Path, dict]) -> None:
    out, manifest = videos
    paths = [out / e["path"] for e in manifest["videos"]]
    sampling = FrameSampling(num_frames=4)
    clips = read_videos(paths, sampling)
    assert [c.path for c in clips] == [str(p) for p in paths]
    for path, clip in zip(paths, clips, strict=True):
        np.testing.assert_array_equal(clip.frames, read_video(path, sampling).frames)


def test_read_videos_error_names_the_file(videos: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = videos
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    good = out / "mixed.mp4"
    with pytest.raises(VideoReadError, match="corrupt.mp4"):
        read_videos([good, corrupt, good], FrameSampling(num_frames=2))
    with pytest.raises(VideoReadError, match="video file not found: .*nope.mp4"):
        read_videos([good, tmp_path / "nope.mp4", corrupt], FrameSampling(num_frames=2))  # the first failure wins
