"""The default job's achieved retention: the layer-averaged one for methods that prune inside the LM.

A FastV run keeps every video token at the LM input, so the pre-LLM count says 1.0 whatever it prunes; the
wrapper's meter records the driver's layer-averaged retention, the collected summary carries it and the
table shows it for an in-LLM row, the LM-input count for the others.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import vidcom2_lmms_eval.wrappers as wrappers
from lmms_eval.api.instance import Instance
from vidcom2_lmms_eval.collect import CollectError, write_csv
from vidcom2_lmms_eval.default_job import Case, format_table, replay, table_rows
from vidcom2_lmms_eval.meter import SampleRecord, aggregate
from vidcom2_lmms_eval.synthetic_task import EVENT_TASK, build_event_task, doc_to_text, doc_to_visual

from llava.event_task import make_event_videos
from llava.model.compression import CompressionSpec
from llava.model.tiny import write_tiny_llava
from llava.runtime import FrameSampling, GenerationOptions

GEN = {"max_new_tokens": 2, "temperature": 0, "until": ["\n"]}


def _summary(path: Path, rows: list[dict]) -> Path:
    return write_csv(rows, path)


def test_meter_layer_average_is_token_weighted_and_none_when_a_record_lacks_it() -> None:
    def rec(doc: int, before: int, layered: float | None, status: str = "ok") -> SampleRecord:
        return SampleRecord(task="t", doc_id=doc, rank=0, status=status, tokens_before=before, tokens_after=before,
                            layer_average_retention=layered)  # fmt: skip

    overall = aggregate([rec(0, 100, 0.2), rec(1, 300, 0.4), rec(2, 0, None, status="failed")])["overall"]
    assert overall["layer_average_retention"] == pytest.approx((0.2 * 100 + 0.4 * 300) / 400)
    assert overall["achieved_retention"] == 1.0
    assert aggregate([rec(0, 100, 0.2), rec(1, 100, None)])["overall"]["layer_average_retention"] is None


def test_table_shows_layer_average_for_in_llm_rows_and_lm_input_for_the_others(tmp_path: Path) -> None:
    summary = _summary(tmp_path / "s.csv", [
        {"method": "none", "retention": 1.0, "achieved_retention": 1.0, "layer_average_retention": 1.0,
         EVENT_TASK: 100.0},
        {"method": "vidcom2", "retention": 0.25, "achieved_retention": 0.282, "layer_average_retention": 0.2791,
         EVENT_TASK: 100.0},
        {"method": "fastv", "retention": 0.25, "achieved_retention": 1.0, "layer_average_retention": 0.2617,
         EVENT_TASK: 25.0},
    ])  # fmt: skip
    cases = [Case("none", 1.0), Case("vidcom2", 0.25), Case("fastv", 0.25, in_llm=True)]
    rows = table_rows(cases, summary)
    assert [(r["achieved_retention"], r["retention_measure"]) for r in rows] == [
        (1.0, "LM input"), (0.282, "LM input"), (0.2617, "layer average"),
    ]  # fmt: skip
    assert "layer average" in format_table(rows).splitlines()[3]
    missing = _summary(tmp_path / "m.csv", [
        {"method": "fastv", "retention": 0.25, "achieved_retention": 1.0, "layer_average_retention": None,
         EVENT_TASK: 25.0},
    ])  # fmt: skip
    with pytest.raises(CollectError, match=r"no layer_average_retention for fastv_r0.25"):
        table_rows([Case("fastv", 0.25, in_llm=True)], missing)


def test_fastv_row_shows_the_drivers_layer_average_not_one(tmp_path: Path) -> None:
    """Tiny random LLaVA-OV (16 LM layers), FastV at R = 0.25 through the lmms-eval wrapper: the meter's
    record, the collected summary and the table row all hold the driver's layer-averaged retention (< 1)."""
    model = write_tiny_llava(tmp_path / "ck", arch="llava_ov")
    videos = tmp_path / "videos"
    make_event_videos(videos, count=2, seed=0)
    task = build_event_task(tmp_path / "task", videos)
    docs = [json.loads(line) for line in (task / "docs.jsonl").read_text().splitlines()]
    w = wrappers.LlavaOneVision(pretrained=str(model), compressor="fastv", retention=0.25, max_frames_num=4,
                                device="cpu", dtype="float32", meter_dir=str(tmp_path / "meter"))  # fmt: skip
    w.task_dict = {"synth": {"test": {d["doc_id"]: d for d in docs}}}
    doc = docs[0]
    args = (doc_to_text(doc), dict(GEN), doc_to_visual, doc["doc_id"], "synth", "test")
    w.generate_until([Instance("generate_until", args, 0, metadata={"task": "synth", "doc_id": 0, "repeats": 1})])
    [record] = w.meter.records
    direct = w.model.answer(
        doc_to_visual(doc)[0], doc_to_text(doc), compression=CompressionSpec("fastv", 0.25),
        sampling=FrameSampling(num_frames=4), generation=GenerationOptions(max_new_tokens=2),
    )  # fmt: skip
    driver = direct.extra["layer_average_retention"]
    assert record.tokens_after == record.tokens_before  # FastV drops nothing before the LM
    assert 0.2 < driver < 0.3 and record.layer_average_retention == pytest.approx(driver, abs=1e-9)
    overall = aggregate([record])["overall"]
    summary = _summary(tmp_path / "s.csv", [
        {"method": "fastv", "retention": 0.25, "achieved_retention": overall["achieved_retention"],
         "layer_average_retention": overall["layer_average_retention"], EVENT_TASK: 0.0},
    ])  # fmt: skip
    case = Case("fastv", 0.25)
    replay(model, videos, [Case("none", 1.0), case], 4, tmp_path / "work", tmp_path / "kept.png")
    assert case.in_llm and not case.error
    [row] = table_rows([case], summary)
    assert row["achieved_retention"] < 1.0 and row["achieved_retention"] == pytest.approx(driver, abs=1e-4)
    assert row["retention_measure"] == "layer average"
    assert next(csv.DictReader(summary.open()))["achieved_retention"] == "1.0000"  # what the table showed before
