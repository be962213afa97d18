"""llava.prefetch.Prefetch: order under random delays, bounded look-ahead, per-item errors, clean shutdown."""

from __future__ import annotations

import random
import threading
import time

import pytest

from llava.prefetch import Prefetch
from llava.video_io import VideoReadError


def _prefetch_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(name) and t.is_alive()]


@pytest.mark.parametrize("workers", [0, 1, 4])
def test_results_in_submission_order_whatever_order_loads_finish(workers: int) -> None:
    delays = random.Random(0).choices([0.0, 0.001, 0.004, 0.008], k=40)

    def load(i: int) -> int:
        time.sleep(delays[i])  # later items often finish first
        return i * i

    with Prefetch(range(40), load, workers=workers, depth=6) as stream:
        got = [(f.index, f.item, f.value) for f in stream]
    assert got == [(i, i, i * i) for i in range(40)]


def test_look_ahead_is_bounded_by_depth_and_the_input_is_consumed_lazily() -> None:
    lock = threading.Lock()
    started, pulled, worst_started, worst_pulled = [0], [0], [0], [0]

    def source():
        for i in range(30):
            pulled[0] += 1
            yield i

    def load(i: int) -> int:
        with lock:
            started[0] += 1
        return i

    consumed = 0
    with Prefetch(source(), load, workers=3, depth=4) as stream:
        for fetched in stream:
            time.sleep(0.002)  # a slow consumer: unbounded workers would run far ahead
            with lock:
                worst_started[0] = max(worst_started[0], started[0] - consumed)
            worst_pulled[0] = max(worst_pulled[0], pulled[0] - consumed)
            assert stream.in_flight <= 4
            consumed += 1
            assert fetched.value == consumed - 1
    assert consumed == 30
    # besides the item the consumer holds, at most `depth` are loading or waiting
    assert worst_started[0] <= 4 + 1 and worst_pulled[0] <= 4 + 1
    assert worst_started[0] >= 2  # and it did read ahead


def test_a_failed_load_is_an_item_of_its_own_carrying_its_error() -> None:
    def load(item: tuple[str, int, str]) -> str:
        task, doc_id, path = item
        if doc_id == 3:
            raise VideoReadError(f"video file not found: {path}")
        return f"{task}/{doc_id}"

    items = [("mvbench", i, f"/data/v{i}.mp4") for i in range(6)]
    with Prefetch(items, load, workers=2) as stream:
        fetched = list(stream)
    assert [f.item for f in fetched] == items  # nothing dropped, nothing reordered
    bad = fetched[3]
    assert not bad.ok and bad.value is None and bad.item == ("mvbench", 3, "/data/v3.mp4")
    with pytest.raises(VideoReadError, match="/data/v3.mp4") as caught:
        bad.result()
    assert caught.value is bad.error  # the load's own exception, unchanged
    assert [f.result() for f in fetched if f.ok] == [f"mvbench/{i}" for i in (0, 1, 2, 4, 5)]


def test_an_error_of_the_input_itself_comes_after_the_items_before_it() -> None:
    def source():
        yield from range(5)
        raise KeyError("doc 5")

    seen = []
    with pytest.raises(KeyError, match="doc 5"), Prefetch(source(), lambda i: i, workers=3, depth=8) as stream:
        for fetched in stream:
            seen.append(fetched.value)
    assert seen == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("stop", ["break", "error", "interrupt"])
def test_leaving_early_cancels_what_has_not_started_and_stops_the_workers(stop: str) -> None:
    started = []

    def load(i: int) -> int:
        started.append(i)
        time.sleep(0.01)
        return i

    name = f"prefetch_test_{stop}"
    raised = {"break": None, "error": RuntimeError, "interrupt": KeyboardInterrupt}[stop]
    try:
        with Prefetch(range(1000), load, workers=2, depth=3, name=name) as stream:
            for fetched in stream:
                if fetched.index == 1:
                    if raised is None:
                        break
                    raise raised("stop")
    except (RuntimeError, KeyboardInterrupt) as exc:
        assert type(exc) is raised
    assert _prefetch_threads(name) == []  # every worker joined
    assert len(started) <= 2 + 3 + 1  # delivered + depth + the refill that ran before the consumer stopped


def test_the_caller_waits_only_for_what_was_not_ready() -> None:
    done = threading.Semaphore(0)

    def load(i: int) -> int:
        if i == 0:
            time.sleep(0.1)  # the first item is never ready in time
        done.release()
        return i

    with Prefetch(range(6), load, workers=3, depth=3) as stream:
        waits = []
        for fetched in stream:
            waits.append(fetched.wait_s)
            if fetched.index < 5:
                done.acquire()  # the next item has finished loading before the caller asks for it
    assert waits[0] >= 0.08 and max(waits[1:]) < 0.05 and stream.delivered == 6
    assert stream.wait_s == pytest.approx(sum(waits))
    with Prefetch(range(3), lambda i: time.sleep(0.02), workers=0) as serial:
        assert all(f.wait_s == f.load_s >= 0.02 for f in serial)  # serial: the caller waits for every load


def test_bad_settings_and_a_second_iteration_raise() -> None:
    with pytest.raises(ValueError, match="workers must be >= 0"):
        Prefetch([], lambda i: i, workers=-1)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetch([], lambda i: i, workers=2, depth=0)
    stream = Prefetch([1], lambda i: i, workers=1)
    assert [f.value for f in stream] == [1]
    with pytest.raises(RuntimeError, match="once"):
        list(stream)
