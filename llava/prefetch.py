"""Load the next items of a stream on worker threads while the caller works on the current one.

Why: in an evaluation the CPU reads and decodes sample i+1 while the GPU answers sample i, so video
reading leaves the critical path. :class:`Prefetch` is the one place that does it (the lmms-eval
wrappers and ``vidcom2 bench --stream`` both use it):

- results come back in submission order, whatever order the workers finish in;
- at most ``depth`` items are loading or loaded-and-waiting at once (memory stays bounded: each holds
  a decoded video), besides the one the caller is working on;
- a load that raises does not stop the stream: its item comes back as a :class:`Fetched` carrying the
  exception, so the caller reports it with the item's ids (nothing is dropped or reordered);
- ``workers=0`` loads in the caller's thread, one item at a time (the serial path, same interface);
- leaving the ``with`` block (end, ``break``, an exception, KeyboardInterrupt) cancels what has not
  started and waits for the loads already running, so no thread outlives the stream.

Threads, not processes: decord, PyAV, numpy copies and torch's CPU kernels release the GIL while they
work, and a thread can hand a result (a decoded video of tens of MB, a pinned tensor) to the caller
without pickling it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Fetched(Generic[T, R]):
    """One item of the stream and what loading it gave.

    index: position in the input (0-based). value: the load's result, None when it raised. error: the
    exception the load raised, else None. load_s: seconds the load ran (on its worker). wait_s: seconds
    the caller waited for this item after asking for it (0 when it was ready: reading was hidden).
    """

    index: int
    item: T
    value: R | None
    error: Exception | None
    load_s: float
    wait_s: float

    @property
    def ok(self) -> bool:
        return self.error is None

    def result(self) -> R:
        """The loaded value; re-raises the load's own exception (unchanged, so its message still names
        the file) when it failed."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


def _timed(load: Callable[[T], R], item: T) -> tuple[R | None, Exception | None, float]:
    start = time.perf_counter()
    try:
        value = load(item)
    except Exception as exc:  # a per-item failure; BaseException (KeyboardInterrupt, SystemExit) propagates
        return None, exc, time.perf_counter() - start
    return value, None, time.perf_counter() - start


class Prefetch(Generic[T, R]):
    """``for fetched in Prefetch(items, load, workers=4): ...`` - see the module docstring.

    ``items`` is consumed lazily, in the caller's thread (it need not be thread-safe); ``load`` runs on
    the workers and must be safe to call from several threads at once. ``depth`` defaults to twice the
    workers (one loading and one waiting per worker).
    """

    def __init__(
        self,
        items: Iterable[T],
        load: Callable[[T], R],
        *,
        workers: int = 2,
        depth: int | None = None,
        name: str = "prefetch",
    ) -> None:
        if workers < 0:
            raise ValueError(f"prefetch workers must be >= 0, got {workers}")
        depth = 2 * workers if depth is None else depth
        if workers > 0 and depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.items = items
        self.load = load
        self.workers = workers
        self.depth = depth
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[int, T, Future]] = deque()
        self._started = False
        self._exhausted = False
        self._source_error: Exception | None = None
        self.wait_s = 0.0  # total seconds the caller waited for items (the reader on the critical path)
        self.delivered = 0

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Fetched[T, R]]:
        if self._started:
            raise RuntimeError("a Prefetch stream can be iterated once")
        self._started = True
        try:
            if self.workers == 0:
                yield from self._serial()
            else:
                yield from self._threaded()
        finally:
            self.close()

    def _serial(self) -> Iterator[Fetched[T, R]]:
        for index, item in enumerate(self.items):
            value, error, seconds = _timed(self.load, item)
            yield self._deliver(index, item, value, error, seconds, seconds)

    def _threaded(self) -> Iterator[Fetched[T, R]]:
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=self.name)
        source = enumerate(self.items)
        self._fill(source)
        while self._pending:
            index, item, future = self._pending.popleft()
            start = time.perf_counter()
            value, error, seconds = future.result()
            waited = time.perf_counter() - start
            self._fill(source)  # keep the workers busy while the caller works on this item
            yield self._deliver(index, item, value, error, seconds, waited)
        if self._source_error is not None:  # raised where the serial loop would have raised it
            raise self._source_error

    def _fill(self, source: Iterator[tuple[int, T]]) -> None:
        """Submit items until ``depth`` are in flight or the input ends. An exception of the input
        iterator itself is kept and raised after the items before it have been delivered."""
        assert self._pool is not None
        while not self._exhausted and len(self._pending) < self.depth:
            try:
                nxt = next(source, None)
            except Exception as exc:
                self._source_error, self._exhausted = exc, True
                return
            if nxt is None:
                self._exhausted = True
                return
            index, item = nxt
            self._pending.append((index, item, self._pool.submit(_timed, self.load, item)))

    def _deliver(
        self, index: int, item: T, value: R | None, error: Exception | None, seconds: float, waited: float
    ) -> Fetched[T, R]:
        self.wait_s += waited
        self.delivered += 1
        return Fetched(index, item, value, error, seconds, waited)

    @property
    def in_flight(self) -> int:
        """Items submitted to the workers and not yet handed to the caller."""
        return len(self._pending)

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Cancel loads not yet started, wait for the running ones, stop the workers (idempotent)."""
        for _, _, future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Prefetch[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
