"""Read the next requests' videos while the GPU answers the current ones, inside ``generate_until``.

How it plugs in: ``generate_until`` knows, after the resume cache has taken the finished requests out,
which (video, question) pairs it will send to the model and in which order. :func:`streamed_reads`
gets that plan, starts a :class:`llava.prefetch.Prefetch` over it (one item per batch of
``batch_size`` requests, exactly the wrapper's chunks) and, for the duration of the ``with`` block,
puts a :class:`PrefetchedModel` in ``wrapper.model``. The wrapper's own code runs unchanged - its
missing-file checks, error recording, metering - and when it calls ``answer`` / ``answer_batch`` for a
planned batch, the batch's host stage (read, decode, CPU preprocessing: the adapter's
``prepare_batch``) has already run on a worker, so only the device stage (``answer_prepared``) is left.

What stays exactly as without prefetching:

- cached requests are never planned, so never read;
- a batch whose host stage failed (a missing or unreadable video), or a call that is not the planned
  batch (the wrapper answering the remaining videos of such a batch, or one by one), goes to the adapter
  itself, which reads in this thread and raises its own error naming the file - the wrapper then
  reports task, doc id and path as it always did;
- answers: ``answer_prepared(prepare_batch(...))`` is what the adapters' ``answer_batch`` runs.

Also a progress bar (rank 0): requests done and their rate, cached ones counted as done from the start.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from llava.prefetch import Fetched, Prefetch

Key = tuple[str, str]  # (video path, question)


def supports_prefetch(model: Any) -> bool:
    """Whether an adapter splits a request into a host stage and a device stage."""
    return callable(getattr(model, "prepare_batch", None)) and callable(getattr(model, "answer_prepared", None))


def check_prefetch(model: Any, workers: int) -> None:
    """At wrapper start: ``prefetch_workers`` > 0 needs an adapter with the host / device split."""
    if workers > 0 and not supports_prefetch(model):
        raise ValueError(
            f"model_arg prefetch_workers={workers}: the {getattr(model, 'family', '?')} adapter has no "
            "prepare_batch / answer_prepared to read ahead with; use prefetch_workers=0"
        )


@dataclass
class _Batch:
    """One planned batch: its keys, what the worker's host stage gave, whether it was answered from it."""

    keys: list[Key]
    fetched: Fetched
    served: bool = False

    def holds(self, keys: list[Key]) -> bool:
        have = Counter(self.keys)
        return all(have[key] >= count for key, count in Counter(keys).items())


class PrefetchedModel:
    """Stands in for the adapter while a plan streams; every other attribute is the adapter's.

    A call for exactly the current planned batch, whose host stage succeeded, is answered from it; any
    other call (a failed batch, its remaining videos, one by one) goes to the adapter itself. A call
    for keys the current batch does not hold moves on to the next planned batch (passing over batches
    the wrapper never asked for: all their videos missing)."""

    def __init__(self, adapter: Any, stream: Iterator[Fetched], sampling: Any, on_batch_done: Any = None) -> None:
        self._adapter = adapter
        self._stream = stream
        self._sampling = sampling
        self._current: _Batch | None = None
        self._on_batch_done = on_batch_done or (lambda n: None)
        self.prefetched_batches = 0  # batches answered from the workers' host stage
        self.direct_calls = 0  # calls passed to the adapter itself

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)

    # ------------------------------------------------------------------ the calls the wrapper makes
    def answer(self, video: Any, question: str, **kwargs: Any) -> Any:
        return self._serve([video], [question], kwargs, lambda: [self._adapter.answer(video, question, **kwargs)])[0]

    def answer_batch(self, videos: Sequence[Any], questions: Sequence[str], **kwargs: Any) -> list[Any]:
        return self._serve(videos, questions, kwargs, lambda: self._adapter.answer_batch(videos, questions, **kwargs))

    def _serve(self, videos: Sequence[Any], questions: Sequence[str], kwargs: dict[str, Any], direct: Any) -> list:
        keys = [(str(v), str(q)) for v, q in zip(videos, questions, strict=True)]
        if kwargs.get("sampling", self._sampling) != self._sampling:
            raise ValueError(f"prefetched with sampling {self._sampling}, asked with {kwargs.get('sampling')}")
        batch = self._batch_holding(keys) if keys else None
        if batch is not None and batch.fetched.ok and keys == batch.keys and not batch.served:
            batch.served = True
            self.prefetched_batches += 1
            options = {k: v for k, v in kwargs.items() if k != "sampling"}
            return self._adapter.answer_prepared(batch.fetched.value, **options)
        self.direct_calls += 1
        return direct()

    def _batch_holding(self, keys: list[Key]) -> _Batch:
        current = self._current
        if current is not None and not current.served and current.holds(keys):
            return current
        while True:
            self.finish_batch()
            fetched = next(self._stream, None)
            if fetched is None:
                raise RuntimeError(f"requests {keys} are not in the prefetch plan (plan and calls disagree)")
            self._current = _Batch(list(fetched.item), fetched)
            if self._current.holds(keys):
                return self._current

    def finish_batch(self) -> None:
        if self._current is not None:
            self._on_batch_done(len(self._current.keys))
            self._current = None


def plan_batches(plan: Sequence[Key], batch_size: int) -> list[tuple[Key, ...]]:
    """The wrapper's chunks of the plan: consecutive runs of ``batch_size`` requests."""
    return [tuple(plan[i : i + batch_size]) for i in range(0, len(plan), batch_size)]


def _progress(total: int, done: int, rank: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="sample", desc=desc, disable=rank != 0, dynamic_ncols=True)


@contextmanager
def streamed_reads(wrapper: Any, plan: Sequence[Key], *, total: int | None = None) -> Iterator[Any]:
    """Within the block, ``wrapper.model`` answers the planned (video, question) pairs from batches
    prepared ahead by ``wrapper.settings.prefetch_workers`` threads (see the module docstring; 0 workers:
    each batch's host stage runs in this thread when its turn comes). An adapter without the split is
    left in place. ``total``: all requests of
    the call, cached ones included, for the progress bar."""
    s = wrapper.settings
    adapter = wrapper.model
    workers = int(getattr(s, "prefetch_workers", 0))
    total = len(plan) if total is None else total
    bar = _progress(total, total - len(plan), getattr(wrapper, "_rank", 0), f"vidcom2 {wrapper.model_id}")
    try:
        if not plan or not supports_prefetch(adapter):
            yield adapter
            bar.update(len(plan))
            return
        sampling = s.sampling

        def load(batch: tuple[Key, ...]) -> Any:
            return adapter.prepare_batch([v for v, _ in batch], [q for _, q in batch], sampling, pin_memory=True)

        with Prefetch(plan_batches(plan, s.batch_size), load, workers=workers, depth=workers, name="vidcom2_read") as p:
            model = PrefetchedModel(adapter, iter(p), sampling, on_batch_done=bar.update)
            wrapper.model = model
            try:
                yield model
                model.finish_batch()
            finally:
                wrapper.model = adapter
    finally:
        bar.close()
