"""Efficiency meter: aggregation over ranks (sum times, max peaks, counts) and per task."""

import json

import torch
from vidcom2_lmms_eval.meter import EfficiencyMeter, SampleRecord, aggregate


def _rec(task, doc, rank, prefill, before, after, peak, status="ok"):
    return SampleRecord(
        task=task,
        doc_id=doc,
        rank=rank,
        status=status,
        timings={"prefill": prefill, "vision": 1.0},
        wall_s=prefill + 1.0,
        tokens_before=before,
        tokens_after=after,
        peak_allocated_bytes=peak,
        peak_reserved_bytes=None if peak is None else peak + 1,
    )


def test_aggregate_sums_times_maxes_peaks_counts_ranks():
    records = [
        _rec("a", 0, 0, 0.5, 100, 25, 10),
        _rec("a", 1, 1, 1.5, 100, 30, 40),
        _rec("b", 0, 1, 2.0, 200, 50, None),
        SampleRecord(task="b", doc_id=1, rank=0, status="failed", error="x"),
    ]
    agg = aggregate(records)
    o = agg["overall"]
    assert (o["samples"], o["ok"], o["failed"], o["samples_per_rank"]) == (4, 3, 1, {"0": 2, "1": 2})
    assert o["stage_seconds_sum"]["prefill"] == 4.0 and o["stage_seconds_sum"]["vision"] == 3.0
    assert o["peak_allocated_bytes_max"] == 40 and o["peak_reserved_bytes_max"] == 41
    assert o["achieved_retention"] == (25 + 30 + 50) / 400
    assert agg["per_task"]["a"]["stage_seconds_sum"]["prefill"] == 2.0
    assert agg["per_task"]["b"]["failed"] == 1 and agg["per_task"]["b"]["peak_allocated_bytes_max"] is None


def test_finalize_writes_json_and_samples_on_rank0_only(tmp_path):
    meter = EfficiencyMeter(torch.device("cpu"), {"model_id": "m"})
    meter.add(_rec("a", 0, 0, 0.5, 100, 25, None))
    assert meter.finalize(tmp_path / "r1", rank=1, world_size=1) is None and not (tmp_path / "r1").exists()
    path = meter.finalize(tmp_path / "r0", rank=0, world_size=1)
    data = json.loads(path.read_text())
    assert data["run"]["model_id"] == "m" and data["overall"]["samples"] == 1
    assert data["environment"]["torch"] == torch.__version__
    assert len(list((tmp_path / "r0").glob("*_vidcom2_meter_samples.jsonl"))) == 1
