"""The vidcom2 console script: make-videos, make-tiny, infer --json end to end, one-line user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava.cli import main, parse_options, register_subcommand
from llava.runtime import STAGES


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    assert main(["make-videos", "--out", str(root / "videos"), "--seed", "2"]) == 0
    assert (
        main(["make-tiny", "--arch", "llava_vid", "--format", "lmms-lab", "--seed", "4", "--out", str(root / "vid")])
        == 0
    )
    return root


def infer_args(root: Path, *extra: str) -> list[str]:
    return [
        "infer",
        "--model",
        str(root / "vid"),
        "--video",
        str(root / "videos" / "mixed.mp4"),
        "--question",
        "What happens?",
        "--frames",
        "8",
        "--max-new-tokens",
        "5",
        *extra,
    ]


def test_infer_json_end_to_end(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            infer_args(
                workdir, "--compressor", "vidcom2", "--retention", "0.25", "--option", "temperature=0.05", "--json"
            )
        )
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    data = json.loads(out[0])
    for key in ("answer", "output_ids", "visual_tokens_before", "visual_tokens_after", "achieved_retention"):
        assert key in data
    assert set(data["timings"]) == set(STAGES)
    assert data["visual_tokens_before"] == 8 * 3 * 4  # 8 frames, 3x3 pooled grid + row newlines
    assert 0 < data["visual_tokens_after"] < data["visual_tokens_before"]
    assert data["achieved_retention"] == pytest.approx(data["visual_tokens_after"] / data["visual_tokens_before"])
    assert data["extra"]["family"] == "llava_video" and data["extra"]["frames"] == 8
    assert len(data["output_ids"]) <= 5
    assert data["extra"]["grid_newlines"] == "frame" and data["extra"]["position_mode"] == "contiguous"


def test_infer_layout_options(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = ("--compressor", "vidcom2", "--retention", "0.25", "--json")
    assert main(infer_args(workdir, *extra, "--grid-newlines", "all_rows", "--positions", "original")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["extra"]["grid_newlines"] == "all_rows" and data["extra"]["position_mode"] == "original"
    assert data["extra"]["newline_tokens_after"] == 8 * 3  # every row newline of every frame kept


def test_console_script_subprocess(workdir: Path) -> None:
    exe = Path(sys.executable).with_name("vidcom2")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "llava.cli"]
    proc = subprocess.run(
        cmd + infer_args(workdir, "--json"),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["visual_tokens_after"] == data["visual_tokens_before"] and data["achieved_retention"] == 1.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--retention", "1.5", "--compressor", "vidcom2"), "retention"),
        (("--compressor", "nosuch"), "unknown compressor 'nosuch'"),
        (("--compressor", "vidcom2", "--retention", "0.5", "--option", "tau=3"), "tau"),
        (("--option", "novalue"), "KEY=VALUE"),
        (("--grid-newlines", "cols"), "grid_newlines"),
        (("--preprocess-device", "cuda"), "--preprocess-device is not supported by model family llava_video"),
        (("--device-map", "{bad"), "--device-map: not valid JSON"),
        (("--max-memory", "0=1GiB"), "--max-memory budgets a split: give --device-map auto or balanced"),
        (("--device-map", "auto", "--decode-mode", "compiled"), "--decode-mode compiled needs the model on one device"),
        (("--device-map", '{"vision": "cpu"}'), "device map leaves parameters unplaced"),
    ],
)
def test_user_errors_are_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], extra: tuple, message: str
) -> None:
    assert main(infer_args(workdir, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_missing_video_and_model(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = infer_args(workdir)
    args[args.index("--video") + 1] = str(workdir / "absent.mp4")
    assert main(args) == 2
    assert "absent.mp4" in capsys.readouterr().err
    corrupt = workdir / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(100))
    args[args.index("--video") + 1] = str(corrupt)
    assert main(args) == 2
    assert "corrupt.mp4" in capsys.readouterr().err
    args = infer_args(workdir)
    args[args.index("--model") + 1] = str(workdir / "nomodel")
    assert main(args) == 2
    assert "nomodel" in capsys.readouterr().err


def test_make_tiny_unknown_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-tiny", "--arch", "gpt", "--out", str(tmp_path)]) == 2
    assert "llava_ov" in capsys.readouterr().err


def test_registered_subcommand_runs(capsys: pytest.CaptureFixture[str]) -> None:
    register_subcommand("echo-test", lambda p: p.add_argument("--word"), lambda a: print(a.word) or 3)
    assert main(["echo-test", "--word", "hi"]) == 3
    assert capsys.readouterr().out.strip() == "hi"
    with pytest.raises(ValueError):
        register_subcommand("echo-test", lambda p: None, lambda a: 0)


def test_parse_options() -> None:
    assert parse_options(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ValueError):
        parse_options(["=1"])


def test_infer_with_a_device_map_answers_as_unsplit(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--device-map auto`` under a CPU budget of part of the model: later layers are offloaded to disk by
    accelerate, and the answer, ids and token counts equal the unsplit run's."""
    extra = ("--compressor", "vidcom2", "--retention", "0.25", "--json")
    assert main(infer_args(workdir, *extra)) == 0
    whole = json.loads(capsys.readouterr().out)
    size = sum(f.stat().st_size for f in (workdir / "vid").glob("*.safetensors"))
    split_args = ("--device-map", "auto", "--max-memory", f"cpu={size * 6 // 10}B", "--offload-dir",
                  str(workdir / "offload"))  # fmt: skip
    assert main(infer_args(workdir, *extra, *split_args)) == 0
    split = json.loads(capsys.readouterr().out)
    assert any((workdir / "offload").iterdir())  # something really went to disk
    assert split["output_ids"] == whole["output_ids"] and split["answer"] == whole["answer"]
    assert split["visual_tokens_after"] == whole["visual_tokens_after"]
    assert split["extra"]["decode_mode"] == "eager"
