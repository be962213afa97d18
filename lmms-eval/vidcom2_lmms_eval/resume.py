"""Per-sample answer cache so a long run that dies can resume without redoing finished samples.

Why not only lmms-eval's --use_cache: in 0.7.3 its ResponseCache stores responses only after the
model returns the whole request list of a run, so a crash loses everything; and its key does not
see COMPRESSOR / R_RATIO. Here every answered sample is appended (and flushed) to
``<resume_dir>/rank<r>.jsonl`` at once, keyed by the full run signature; at start-up every rank
loads the files of all ranks, so a rerun with a different process count still finds its samples.
Failed samples are not cached: a rerun retries them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sample_key(signature: dict[str, Any], task: str, split: str, doc_id: Any, context: str, gen: dict) -> str:
    payload = {"sig": signature, "task": task, "split": split, "doc": doc_id, "ctx": context, "gen": gen}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class ResumeCache:
    """Append-only JSONL store: key -> {"text": answer, "record": meter record}."""

    def __init__(self, directory: str | Path, rank: int) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"rank{rank}.jsonl"
        self.entries: dict[str, dict[str, Any]] = {}
        for file in sorted(self.dir.glob("rank*.jsonl")):
            for line_no, line in enumerate(file.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    # a line cut short by a crash: the sample is simply redone
                    continue
                if "key" not in entry or "text" not in entry:
                    raise ValueError(f"resume cache {file}:{line_no} is not a cache entry (no key/text)")
                self.entries[entry["key"]] = entry

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, text: str, record: dict[str, Any]) -> None:
        entry = {"key": key, "text": text, "record": record}
        self.entries[key] = entry
        with self.path.open("a") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")
            fh.flush()
