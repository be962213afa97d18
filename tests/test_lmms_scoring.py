"""Scores recomputed from lmms-eval sample logs: the tasks' own rules, and failed samples counted wrong."""

import json
import random

import pytest
from vidcom2_lmms_eval.mini_benchmarks import task_module
from vidcom2_lmms_eval.scoring import MLVU_DEV_TYPES, ScoringError, score_task, scoring_for


def _log(path, task_metric: str, metrics: list) -> None:
    path.write_text("".join(json.dumps({"doc_id": i, task_metric: m}) + "\n" for i, m in enumerate(metrics)))


def test_mvbench_failure_counts_wrong_where_the_task_reports_100(tmp_path):
    """One right answer + one failed sample: lmms-eval's aggregation drops the empty answer (100%)."""
    metrics = [{"pred_answer": "A", "gt_answer": "A", "score": 1}, {"pred_answer": "", "gt_answer": "A", "score": 0}]
    own = task_module("mvbench").mvbench_aggregate_results(metrics)
    assert own == 100.0
    _log(tmp_path / "s.jsonl", "mvbench_accuracy", metrics)
    s = score_task("mvbench_action_count", tmp_path / "s.jsonl", own, failed_ids={1})
    assert (s.task_rule_score, s.score, s.samples, s.failed) == (100.0, 50.0, 2, 1)


def test_longvideobench_failure_counts_wrong_even_when_the_random_letter_is_right(tmp_path):
    metrics = [
        {"id": "a", "duration_group": 15, "question_category": "S2E", "answer": "B", "parsed_pred": "B"},
        {"id": "b", "duration_group": 60, "question_category": "TOS", "answer": "C", "parsed_pred": "C"},  # random
    ]
    _log(tmp_path / "s.jsonl", "lvb_acc", metrics)
    s = score_task("longvideobench_val_v", tmp_path / "s.jsonl", 1.0, failed_ids={1})
    assert (s.task_rule_score, s.score) == (100.0, 50.0)


def test_task_rules_equal_the_tasks_own_aggregation_code():
    """Random logs through lmms-eval's own aggregation functions and through ours, no failures."""
    rng = random.Random(0)
    mlvu = [
        {"task_type": rng.choice(MLVU_DEV_TYPES[:5]), "pred_answer": rng.choice("AB"), "answer": rng.choice("AB")}
        for _ in range(40)
    ]  # two types without samples: both count 0 in the task's mean
    mvbench = [{"pred_answer": rng.choice(["A", "B", ""]), "gt_answer": "A", "score": 0} for _ in range(40)]
    for m in mvbench:
        m["score"] = int(m["pred_answer"] == "A")
    pairs = [
        ("mlvu_dev", mlvu, task_module("mlvu").mlvu_aggregate_results_dev),
        ("mvbench_moving_count", mvbench, task_module("mvbench").mvbench_aggregate_results),
    ]
    for task, metrics, aggregate in pairs:
        ours = scoring_for(task).score((m, None) for m in metrics)
        assert ours == pytest.approx(aggregate(metrics), abs=1e-9), task


def test_mlvu_failure_is_wrong_in_its_type(tmp_path):
    metrics = [{"task_type": t, "pred_answer": "A", "answer": "A"} for t in MLVU_DEV_TYPES]
    _log(tmp_path / "s.jsonl", "mlvu_percetion_score", metrics)
    s = score_task("mlvu_dev", tmp_path / "s.jsonl", 100.0, failed_ids={2})
    assert s.score == pytest.approx(100.0 * 6 / 7)


def test_a_log_that_disagrees_with_results_json_is_an_error(tmp_path):
    _log(tmp_path / "s.jsonl", "videomme_perception_score", [{"pred_answer": "A", "answer": "A", "duration": "short"}])
    with pytest.raises(ScoringError, match="results.json says 50.000000%"):
        score_task("videomme", tmp_path / "s.jsonl", 50.0, failed_ids=set())
    with pytest.raises(ScoringError, match="failed doc_ids \\['7'\\]"):
        score_task("videomme", tmp_path / "s.jsonl", 100.0, failed_ids={7})
