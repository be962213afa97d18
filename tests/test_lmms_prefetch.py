"""The wrappers read ahead (vidcom2_lmms_eval.prefetch_requests): same answers and failures, fewer waits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import vidcom2_lmms_eval.wrappers as wrappers
from lmms_eval.api.instance import Instance
from vidcom2_lmms_eval.args import parse_model_args
from vidcom2_lmms_eval.prefetch_requests import PrefetchedModel
from vidcom2_lmms_eval.synthetic_task import build_task, doc_to_text, doc_to_visual

from llava.prefetch import Prefetch
from llava.synthetic_videos import make_videos

sys.path.insert(0, str(Path(__file__).resolve().parent / "lmms_helpers"))
from fake_model import FakeVideoLLM  # noqa: E402

GEN = {"max_new_tokens": 4, "temperature": 0, "until": ["\n"]}


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_videos(root / "videos")
    task = build_task(root / "task", root / "videos", broken=True)
    return [json.loads(line) for line in (task / "docs.jsonl").read_text().splitlines()]


class CountingFake(FakeVideoLLM):
    """Counts the calls the wrapper's model receives directly vs the prepared batches it answers."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__(device)
        self.direct: list[int] = []  # batch size of every answer / answer_batch call
        self.prepared_answers = 0

    def answer_batch(self, videos, questions, **kwargs):
        self.direct.append(len(videos))
        self._direct = True
        try:
            return super().answer_batch(videos, questions, **kwargs)
        finally:
            self._direct = False

    def answer_prepared(self, prepared, **kwargs):
        self.prepared_answers += 0 if getattr(self, "_direct", False) else 1  # not the direct calls' own
        return super().answer_prepared(prepared, **kwargs)


def meta(doc_id: int) -> dict:
    return {"task": "synth", "doc_id": doc_id, "repeats": 1}


def _run(monkeypatch, tmp_path, docs, ids, **args):
    monkeypatch.setattr(wrappers, "load_video_llm", lambda *a, **k: CountingFake())
    w = wrappers.LlavaOneVision(pretrained="fake", meter_dir=str(tmp_path / "meter"), **args)
    w.task_dict = {"synth": {"test": {d["doc_id"]: d for d in docs}}}
    reqs = [
        Instance("generate_until", (doc_to_text(docs[i]), dict(GEN), doc_to_visual, i, "synth", "test"), 0, meta(i))
        for i in ids
    ]
    try:
        out = w.generate_until(reqs)
    finally:
        assert isinstance(w.model, CountingFake)  # the adapter is back in place after the call, whatever happened
    records = [(r.doc_id, r.status, r.error) for r in w.meter.records]
    return [o.text for o in out], records, w.model


def test_planned_batches_are_answered_from_the_readers(monkeypatch, tmp_path, docs) -> None:
    texts, records, model = _run(monkeypatch, tmp_path, docs, [0, 1, 2, 3, 4], batch_size=2, prefetch_workers=2)
    assert texts == ["A"] * 5 and [r[:2] for r in records] == [(i, "ok") for i in range(5)]
    assert model.direct == [] and model.prepared_answers == 3  # batches [0, 1], [2, 3], [4]
    assert sorted(v for v, _ in model.calls) == sorted(docs[i]["video"] for i in range(5))  # each read once


def test_a_broken_batch_goes_to_the_adapter_and_fails_as_without_prefetching(monkeypatch, tmp_path, docs) -> None:
    missing, corrupt = len(docs) - 2, len(docs) - 1
    ids = [0, missing, corrupt, 1, 2]  # batches [0, missing], [corrupt, 1], [2]
    runs = {
        workers: _run(monkeypatch, tmp_path, docs, ids, batch_size=2, on_video_error="record", prefetch_workers=workers)
        for workers in (0, 2)
    }
    assert runs[0][:2] == runs[2][:2]  # the same answers, statuses and error messages, in order
    texts, records, model = runs[2]
    assert texts == ["A", "", "", "A", "A"]
    failed = {doc_id: error for doc_id, status, error in records if status == "failed"}
    assert set(failed) == {missing, corrupt}
    assert f"doc_id={corrupt}" in failed[corrupt] and "corrupt.mp4" in failed[corrupt]
    # [0] alone (its missing partner filtered), then [corrupt, 1] and one by one: the adapter reads them itself
    assert model.direct == [1, 2, 1, 1] and model.prepared_answers == 1  # only [2] was prepared ahead


def test_prefetch_workers_is_a_checked_model_arg(monkeypatch, tmp_path, docs) -> None:
    assert parse_model_args("llava_onevision", {"pretrained": "x"}).prefetch_workers == 2
    with pytest.raises(ValueError, match="prefetch_workers must be >= 0"):
        parse_model_args("llava_onevision", {"pretrained": "x", "prefetch_workers": -1})
    texts, _, model = _run(monkeypatch, tmp_path, docs, [0, 1], prefetch_workers=0)
    assert texts == ["A", "A"] and model.direct == [] and model.prepared_answers == 2  # read in their own turn
    monkeypatch.setattr(CountingFake, "prepare_batch", None)  # an adapter without the host / device split
    with pytest.raises(ValueError, match="prefetch_workers=2.*no prepare_batch"):
        wrappers.LlavaOneVision(pretrained="fake", prefetch_workers=2)
    assert wrappers.LlavaOneVision(pretrained="fake", prefetch_workers=0).model.prepare_batch is None


def test_calls_outside_the_plan_are_an_error() -> None:
    adapter = FakeVideoLLM()
    with Prefetch([(("a.mp4", "q"),)], lambda batch: None, workers=1) as stream:
        model = PrefetchedModel(adapter, iter(stream), sampling=None)
        with pytest.raises(RuntimeError, match="not in the prefetch plan"):
            model.answer("b.mp4", "q", sampling=None)


def test_an_interrupt_stops_the_readers_and_puts_the_adapter_back(monkeypatch, tmp_path, docs) -> None:
    import threading

    def interrupted(self, prepared, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CountingFake, "answer_prepared", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(monkeypatch, tmp_path, docs, [0, 1, 2, 3], prefetch_workers=2)
    assert not [t for t in threading.enumerate() if t.name.startswith("vidcom2_read") and t.is_alive()]
