"""`vidcom2 bench` plumbing on the CPU (the measurements themselves need a GPU): options and sweeps."""

from __future__ import annotations

import csv
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
            FakeLLM(),
            model,
            tmp_path / "v.mp4",
            Case(compressor, 0.25, 4, 1),
            decode_tokens=3,
            repeats=1,
            warmup=0,
            vidcom2_options={"execution": "compiled"},
        )
    assert [(s.compressor, s.options) for s in seen] == [("vidcom2", {"execution": "compiled"}), ("uniform", {})]


def test_timed_requests_compile_in_process(tmp_path: Path) -> None:
    """No inductor worker pool may boot beside the timed requests (it slowed the first ones on an H100)."""
    import torch._inductor.config as inductor_config

    seen = []

    class FakeLLM:
        device = "cpu"

        def answer_batch(self, videos, questions, **_):
            seen.append(inductor_config.compile_threads)
            return [InferenceResult("a", [1], 4, 2, timings={"decode": 0.1})] * len(videos)

    model = SimpleNamespace(sampling=lambda frames: FrameSampling(num_frames=frames))
    case = Case("vidcom2", 0.25, 4, 1)
    with inductor_config.patch(compile_threads=4):
        run_case(FakeLLM(), model, tmp_path / "v.mp4", case, decode_tokens=3, repeats=2, warmup=1)
        assert inductor_config.compile_threads == 4
    assert seen == [1, 1, 1]


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


class _FakeAdapter:
    """answer_batch with fixed stage timings, for bench_model's bookkeeping on the CPU."""

    device = "cpu"
    TIMINGS = {"preprocess": 0.01, "vision": 0.02, "compress": 0.001, "prefill": 0.05, "decode": 0.1}

    def answer_batch(self, videos, questions, **_):
        return [InferenceResult("a", [1], 8, 2, timings=dict(self.TIMINGS), extra={"prompt_tokens": 5})] * len(videos)


def _bench_fake(monkeypatch, tmp_path: Path, cases: list[Case], build, **options) -> list[dict]:
    import llava.bench.efficiency as eff

    monkeypatch.setattr(eff, "ideal_prefill_seconds", lambda *a, **k: 0.04)
    monkeypatch.setattr(eff, "write_bench_video", lambda path, frames: path)
    model = SimpleNamespace(name="fake", build=build, sampling=lambda frames: FrameSampling(num_frames=frames))
    return eff.bench_model(
        model,
        cases,
        device="cpu",
        dtype="float32",
        attn="sdpa",
        decode_tokens=3,
        repeats=1,
        warmup=0,
        work_dir=tmp_path,
        command="test",
        log=lambda *_: None,
        **options,
    )


def test_rows_record_the_allocator_settings_and_each_case_releases_its_graphs(tmp_path: Path, monkeypatch) -> None:
    import llava.bench.efficiency as eff

    released: list[int] = []
    monkeypatch.setattr(eff, "release_selection_graphs", lambda: released.append(1))
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cases = [Case("none", 1.0, 4, 1), Case("vidcom2", 0.25, 4, 1)]
    rows = _bench_fake(monkeypatch, tmp_path, cases, lambda *a: _FakeAdapter())
    assert [row["cuda_alloc_conf"] for row in rows] == ["expandable_segments:True"] * 2
    assert len(released) == 2  # after every case, so no case is charged another's graphs
    assert rows[1]["ttft_ms"] == pytest.approx(81.0) and rows[1]["compress_pct_of_ttft"] == pytest.approx(1.235)


def test_preprocess_device_reaches_qwen_adapters_and_is_refused_elsewhere(tmp_path: Path, monkeypatch) -> None:
    class FakeQwen(_FakeAdapter):
        preprocess_device = None

    built: list[_FakeAdapter] = []

    def run(cls: type, device: str | None) -> list[dict]:
        build = lambda *_: built.append(cls()) or built[-1]  # noqa: E731
        return _bench_fake(monkeypatch, tmp_path, [Case("none", 1.0, 4, 1)], build, preprocess_device=device)

    assert run(FakeQwen, "cuda")[0]["preprocess_device"] == "cuda" and built[-1].preprocess_device == "cuda"
    assert run(FakeQwen, None)[0]["preprocess_device"] == "cpu"
    with pytest.raises(ValueError, match="--preprocess-device: fake has no CPU video processor"):
        run(_FakeAdapter, "cuda")


def test_plot_keeps_each_panel_to_one_run_and_splits_variants(tmp_path: Path) -> None:
    from llava.bench.plot import _one_run_per_model, _variant, plot_efficiency

    def row(run: tuple[str, str], compressor: str, retention: float, **extra: str) -> dict[str, str]:
        base = {
            "model": "m",
            "compressor": compressor,
            "compressor_options": "",
            "retention": str(retention),
            "frames": "32",
            "batch": "1",
            "ttft_ms": "10",
            "ideal_ttft_ms": "9",
            "peak_allocated_mib": "1024",
            "attn_implementation": "sdpa",
            "preprocess_device": "cuda:0",
            "cuda_alloc_conf": "",
            "date": run[0],
            "commit": run[1],
            "setup": "one GPU",
        }
        return {**base, **extra}

    old, new, newer = ("2026-11-25", "aaaaaaa"), ("2026-11-26", "bbbbbbb"), ("2026-11-26", "ccccccc")
    sweep = [row(old, "none", 1.0)] + [row(old, "vidcom2", r) for r in (0.5, 0.25, 0.1)]
    later = [row(new, "none", 1.0), row(new, "vidcom2", 0.25)]  # no sweep: the older sweep is kept
    newest = [row(newer, "none", 1.0)] + [row(newer, "vidcom2", r) for r in (0.5, 0.25, 0.1)]  # same day, later rows
    assert {r["commit"] for r in _one_run_per_model(sweep + later)} == {"aaaaaaa"}
    assert {r["commit"] for r in _one_run_per_model(sweep + later + newest)} == {"ccccccc"}
    assert (
        _variant(
            row(old, "none", 1.0, model="qwen2_vl_7b", attn_implementation="sdpa_varlen", preprocess_device="cuda")
        )
        == "qwen2_vl_7b (sdpa_varlen, GPU processor)"
    )
    assert _variant(row(old, "none", 1.0)) == "m"
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(sweep[0]))
        writer.writeheader()
        writer.writerows(sweep + later)
    assert plot_efficiency(path, tmp_path / "plot.png").stat().st_size > 0
