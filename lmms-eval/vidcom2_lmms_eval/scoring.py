"""Benchmark scores recomputed from lmms-eval's per-sample logs, with failed samples counted as wrong.

Why: a sample whose video could not be read (our wrappers' ``on_video_error=record``) reaches the task
as an empty answer, and lmms-eval 0.7.3's tasks do not all score that as wrong: MVBench's aggregation
drops empty answers from its denominator (one failure + one right answer reports 100%), and
LongVideoBench parses an empty answer into a random letter. So every score we report is recomputed from
``<stamp>_samples_<task>.jsonl`` (``--log_samples``): first with the task's own rule, which must give
back the number in results.json (a check that the rule below is still lmms-eval's), then with each
failed sample (from our meter) counted as a wrong answer inside the denominator.

Each :class:`Scoring` states, per lmms-eval task, where its per-sample verdict sits in the log and how
the task aggregates it (micro accuracy, or MLVU's mean over its seven task types).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# lmms-eval 0.7.3 tasks/mlvu/utils.py mlvu_aggregate_results_dev: the mean over these seven types, a type
# without samples counting 0.
MLVU_DEV_TYPES = ("anomaly_reco", "count", "ego", "needle", "order", "plotQA", "topic_reasoning")


class ScoringError(ValueError):
    """A sample log that does not match results.json or the task's known schema; names the file."""


def _same_letter(metric: dict[str, Any], pred: str = "pred_answer", gold: str = "answer") -> bool:
    return metric[pred] == metric[gold]


def _lvb_correct(metric: dict[str, Any]) -> bool:
    gold = metric["answer"]
    return metric["parsed_pred"] in gold if isinstance(gold, list) else metric["parsed_pred"] == gold


def _always(metric: Any) -> bool:
    return True


@dataclass(frozen=True)
class Scoring:
    """How one lmms-eval task scores its samples.

    metric: the key of the per-sample verdict in the samples log and of the score in results.json.
    scale: results.json value -> percent. tolerance: in percent (LongVideoBench rounds to 5 decimals).
    correct: the task's per-sample verdict. counted: whether the task's own aggregation keeps a sample
    in its denominator (MVBench drops empty answers). groups: macro-average over these values of
    ``group_key`` (MLVU), each group without samples counting 0, as the task does.
    """

    metric: str
    correct: Callable[[Any], bool]
    scale: float = 1.0
    counted: Callable[[Any], bool] = _always
    group_key: str | None = None
    groups: tuple[str, ...] = ()
    tolerance: float = 1e-6

    def score(self, verdicts: Iterable[tuple[Any, bool | None]]) -> float:
        """Percent from (metric, forced verdict) pairs: a forced False is a wrong answer that is always
        counted; None leaves the sample to the task's own rule."""
        right: dict[str, int] = {}
        total: dict[str, int] = {}
        for metric, forced in verdicts:
            if forced is None and not self.counted(metric):
                continue
            group = str(metric[self.group_key]) if self.group_key else ""
            ok = self.correct(metric) if forced is None else forced
            right[group] = right.get(group, 0) + int(ok)
            total[group] = total.get(group, 0) + 1
        if self.group_key:
            return sum(100.0 * right[g] / total[g] if total.get(g) else 0.0 for g in self.groups) / len(self.groups)
        n = total.get("", 0)
        return 100.0 * right.get("", 0) / n if n else 0.0


_MVBENCH = Scoring("mvbench_accuracy", lambda m: m["score"] == 1, counted=lambda m: m["pred_answer"] != "")

SCORINGS: dict[str, Scoring] = {
    "videomme": Scoring("videomme_perception_score", _same_letter),
    "mlvu_dev": Scoring(
        "mlvu_percetion_score", _same_letter, group_key="task_type", groups=MLVU_DEV_TYPES
    ),  # sic: lmms-eval's spelling
    "longvideobench_val_v": Scoring("lvb_acc", _lvb_correct, scale=100.0, tolerance=1e-3),
    "vidcom2_synth_mc": Scoring("accuracy", lambda m: float(m) == 1.0, scale=100.0),
    "vidcom2_synth_event": Scoring("accuracy", lambda m: float(m) == 1.0, scale=100.0),
}
MVBENCH_PREFIX = "mvbench_"


def scoring_for(task: str) -> Scoring | None:
    if task in SCORINGS:
        return SCORINGS[task]
    return _MVBENCH if task.startswith(MVBENCH_PREFIX) else None


@dataclass(frozen=True)
class TaskScore:
    """One lmms-eval task of one run: our score (failures wrong), the task's own, and the counts."""

    task: str
    score: float  # percent, failed samples counted wrong
    task_rule_score: float  # percent, lmms-eval's own rule (equals results.json)
    samples: int
    failed: int
    verdicts: list[tuple[Any, bool | None]] | None  # (per-sample metric, forced verdict); None: no samples log


def read_samples(path: Path, metric: str) -> dict[Any, Any]:
    """doc_id -> the per-sample metric of one lmms-eval samples log."""
    out: dict[Any, Any] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if metric not in entry or "doc_id" not in entry:
            raise ScoringError(f"{path}:{line_no}: no doc_id / {metric!r} in the logged sample")
        out[entry["doc_id"]] = entry[metric]
    return out


def score_task(task: str, samples_file: Path, reported: float, failed_ids: set[Any]) -> TaskScore:
    """Recompute ``task`` from its samples log; ``reported`` is results.json's value (task units)."""
    scoring = scoring_for(task)
    if scoring is None:
        raise ScoringError(f"{samples_file}: no scoring rule for task {task!r}")
    metrics = read_samples(samples_file, scoring.metric)
    unknown = sorted(str(d) for d in failed_ids - set(metrics))
    if unknown:
        raise ScoringError(f"{samples_file}: the meter's failed doc_ids {unknown} of {task} are not in the log")
    own = scoring.score((m, None) for m in metrics.values())
    if abs(own - reported * scoring.scale) > scoring.tolerance:
        raise ScoringError(
            f"{samples_file}: {task} recomputed with lmms-eval's rule gives {own:.6f}%, but results.json says "
            f"{reported * scoring.scale:.6f}%; the task's scoring is not the one vidcom2_lmms_eval.scoring assumes"
        )
    verdicts = [(m, False if doc in failed_ids else None) for doc, m in metrics.items()]
    return TaskScore(task, scoring.score(verdicts), own, len(metrics), len(failed_ids & set(metrics)), verdicts)
