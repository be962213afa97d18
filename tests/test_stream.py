"""The adapters' host / device split and `vidcom2 bench --stream` on tiny checkpoints (CPU)."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest

from llava.bench.stream import answer_stream, batched, stream_samples, write_stream_videos
from llava.cli import main
from llava.families_index import load_video_llm
from llava.model.compression import CompressionSpec
from llava.model.tiny import write_tiny_llava
from llava.runtime import FrameSampling, GenerationOptions
from llava.synthetic_videos import make_videos
from llava.video_io import VideoReadError
from transformers_patched.qwen_tiny import build_tiny_qwen

SAMPLING = FrameSampling(num_frames=4)
SPEC = CompressionSpec("vidcom2", 0.5)
GEN = GenerationOptions(max_new_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("videos")
    make_videos(out, seed=2)
    return out


@pytest.fixture(scope="module", params=["llava_ov", "qwen2_5_vl"])  # Qwen2.5: second_per_grid_ts stays on the host
def adapter(request, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "llava_ov":
        return load_video_llm(write_tiny_llava(root, arch="llava_ov", seed=3))
    return load_video_llm(build_tiny_qwen(request.param, root, seed=0))


def test_a_prepared_batch_answers_exactly_like_answer_batch(adapter, videos: Path) -> None:
    paths = [videos / "mixed.mp4", videos / "frames"]
    questions = ["What moves?", "Which colour is the disc?"]
    direct = adapter.answer_batch(paths, questions, compression=SPEC, generation=GEN, sampling=SAMPLING)
    prepared = adapter.prepare_batch(paths, questions, SAMPLING)
    assert prepared.seconds["read_video"] > 0
    for _ in range(2):  # a prepared batch is not used up: answering it again gives the same
        split = adapter.answer_prepared(prepared, compression=SPEC, generation=GEN)
        for d, s in zip(direct, split, strict=True):
            assert s.output_ids == d.output_ids and s.answer == d.answer
            assert (s.visual_tokens_before, s.visual_tokens_after) == (d.visual_tokens_before, d.visual_tokens_after)
            assert s.extra["frames"] == d.extra["frames"]
            assert s.timings["read_video"] == prepared.seconds["read_video"]  # the host stage's own seconds


def test_prepare_batch_names_the_unreadable_video(adapter, videos: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(VideoReadError, match="broken.mp4"):
        adapter.prepare_batch([videos / "mixed.mp4", broken], ["a", "b"], SAMPLING)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory):
    return load_video_llm(write_tiny_llava(tmp_path_factory.mktemp("ov"), arch="llava_ov", seed=5))


def test_the_prefetched_stream_answers_in_order_as_the_serial_one(tiny_llava, tmp_path: Path) -> None:
    files = write_stream_videos(tmp_path, 3, frames=6, size=32)
    batches = batched(stream_samples(files, 5, "What happens?"), 2)
    run = {"compression": SPEC, "generation": GEN, "sampling": SAMPLING}
    serial = [
        (s.index, r.output_ids)
        for b, rs, _, _ in answer_stream(tiny_llava, batches, workers=0, **run)
        for s, r in zip(b, rs, strict=True)
    ]
    streamed = [
        (s.index, r.output_ids)
        for b, rs, _, _ in answer_stream(tiny_llava, batches, workers=3, depth=2, **run)
        for s, r in zip(b, rs, strict=True)
    ]
    assert [i for i, _ in streamed] == list(range(5)) and streamed == serial


def test_stream_command_writes_rows_with_speedups_and_labels(tmp_path: Path) -> None:
    out = tmp_path / "throughput.csv"
    args = ["bench", "--stream", "3", "--warmup", "0", "--models", "tiny_llava_ov", "--device", "cpu"]
    args += ["--dtype", "float32", "--frames", "4", "--answer-tokens", "2"]
    args += ["--compressors", "none,vidcom2", "--retentions", "0.5"]
    args += ["--serial-baseline", "--prefetch-workers", "2", "--video-size", "32", "--distinct-videos", "2"]
    assert main([*args, "--no-progress", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["compressor"], r["prefetch_workers"]) for r in rows] == [("none", "0"), ("none", "2"), ("vidcom2", "2")]
    for column in ("model", "retention", "frames", "max_new_tokens", "samples_per_s", "gpu_busy_fraction", "gpu"):
        assert all(r[column] != "" for r in rows), column
    for r in rows:
        assert r["samples"] == "3" and float(r["output_tokens_mean"]) == 2.0 and r["commit"] and r["date"]
        assert 0 < float(r["gpu_busy_fraction"]) <= 1 and 0 <= float(r["reader_wait_fraction"]) <= 1
        assert float(r["latency_p50_ms"]) <= float(r["latency_p99_ms"]) and r["command"].startswith("vidcom2 bench")
    serial, none, vidcom2 = rows
    assert none["speedup_vs_uncompressed"] == "1.0" and serial["speedup_vs_serial_uncompressed"] == "1.0"
    ratio = float(vidcom2["samples_per_s"]) / float(none["samples_per_s"])
    assert float(vidcom2["speedup_vs_uncompressed"]) == pytest.approx(ratio, abs=1e-3)
    kept, before = int(vidcom2["visual_tokens_after"]), int(vidcom2["visual_tokens_before"])
    assert kept < before == int(none["visual_tokens_after"])


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--stream", "0"], "--stream must be >= 1"),
        (["--stream", "2", "--prefetch-workers", "0"], "--prefetch-workers must be >= 1"),
        (["--stream", "2", "--answer-tokens", "0"], "--answer-tokens must be >= 1"),
        (["--stream", "2", "--models", "tiny_nope"], "unknown tiny model tiny_nope"),
        (["--stream", "2,3,4"], "one sample count, or one per --answer-tokens value"),
    ],
)
def test_bad_stream_options_fail_before_any_model_is_built(flag, message, capsys, tmp_path: Path) -> None:
    assert main(["bench", *flag, "--device", "cpu", "--out", str(tmp_path / "x.csv")]) == 2
    assert message in capsys.readouterr().err


def test_one_sample_count_per_answer_length_or_one_for_all() -> None:
    from llava.bench import _add_arguments
    from llava.bench.stream_cli import check_stream_arguments

    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    both = parser.parse_args(["--stream", "48,12", "--answer-tokens", "1,32"])
    assert check_stream_arguments(both) == {1: 48, 32: 12}
    assert check_stream_arguments(parser.parse_args(["--stream", "5"])) == {1: 5, 32: 5}


def test_stream_bench_with_a_device_map_splits_and_keeps_the_counts(tmp_path: Path) -> None:
    """``--device-map auto`` under a CPU budget of part of the tiny model: accelerate offloads later layers to
    --offload-dir, rows say ``device_map=auto`` and decode eagerly, with the unsplit run's token counts."""
    args = ["bench", "--stream", "3", "--warmup", "0", "--models", "tiny_llava_ov", "--device", "cpu"]
    args += ["--dtype", "float32", "--frames", "4", "--answer-tokens", "2", "--compressors", "none,vidcom2"]
    args += ["--retentions", "0.5", "--prefetch-workers", "1", "--video-size", "32", "--distinct-videos", "2"]
    assert main([*args, "--no-progress", "--out", str(tmp_path / "whole.csv")]) == 0
    split = ["--device-map", "auto", "--max-memory", "cpu=1500KB", "--offload-dir", str(tmp_path / "offload")]
    assert main([*args, *split, "--no-progress", "--out", str(tmp_path / "split.csv")]) == 0
    whole = list(csv.DictReader((tmp_path / "whole.csv").open()))
    rows = list(csv.DictReader((tmp_path / "split.csv").open()))
    assert any((tmp_path / "offload").iterdir())
    assert [(r["device_map"], r["decode_mode"]) for r in rows] == [("auto", "auto:eager")] * 2
    assert [r["visual_tokens_after"] for r in rows] == [r["visual_tokens_after"] for r in whole]
    assert "device_map" not in whole[0]  # unsplit rows keep the columns of the CSVs they append to
