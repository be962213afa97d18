"""`vidcom2 bench` plumbing on the CPU (the measurements themselves need a GPU): options and sweeps."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from llava.bench.efficiency import Case, run_case, sweep_cases
from llava.cli import main
from llava.runtime import FrameSampling, InferenceResult


def test_vidcom2_options_reach_the_vidcom2_cases_only(tmp_path: Path) -> None:
    seen = []

    class FakeLLM:
        device = "cpu"

        def answer_batch(self, videos, questions, *, compression, **_):
            seen.append(compression)
            return [InferenceResult("a", [1], 4, 2, timings={"decode": 0.1})] * len(videos)

    model = SimpleNamespace(sampling=lambda frames: FrameSampling(num_frames=frames))
    for compressor in ("vidcom2", "uniform"):
        run_case(
            FakeLLM(), model, tmp_path / "v.mp4", Case(compressor, 0.25, 4, 1),
            decode_tokens=3, repeats=1, warmup=0, vidcom2_options={"execution": "compiled"},
        )
    assert [(s.compressor, s.options) for s in seen] == [("vidcom2", {"execution": "compiled"}), ("uniform", {})]


def test_bad_vidcom2_option_fails_before_building_a_model(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main(["bench", "--vidcom2-option", "executon=compiled", "--out", str(tmp_path / "x.csv")]) == 2
    assert "unknown VidCom2 option" in capsys.readouterr().err
    assert main(["bench", "--vidcom2-option", "execution", "--out", str(tmp_path / "x.csv")]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_default_sweeps() -> None:
    cases = sweep_cases(["none", "vidcom2", "uniform"], [1.0, 0.25, 0.1], [32, 8], [1, 4])
    assert Case("none", 1.0, 32, 1) in cases and Case("uniform", 0.1, 32, 1) in cases
    assert {c for c in cases if c.frames == 8} == {Case("none", 1.0, 8, 1), Case("vidcom2", 0.25, 8, 1)}
    assert {c for c in cases if c.batch == 4} == {Case("none", 1.0, 32, 4), Case("vidcom2", 0.25, 32, 4)}
    assert len(sweep_cases(["none", "vidcom2"], [0.25], [32, 8], [1, 4], full=True)) == 8


def test_python_dash_m_sees_the_extension_subcommands() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "llava.cli", "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--vidcom2-option" in out.stdout
