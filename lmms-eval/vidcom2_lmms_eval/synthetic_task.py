"""A synthetic multiple-choice video task with known answers, built from ``vidcom2 make-videos`` output.

Why: the whole evaluation path (lmms-eval CLI, our wrappers, compression, meter, collector) must run
offline on a CPU in minutes. Questions are facts written in the videos' manifest (scene cut? static
stretch? duration?), so the answers are known without any labelling. A tiny random model answers at
chance; the point is the plumbing and the efficiency figures, not the accuracy.
"""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

TASK = "vidcom2_synth_mc"
LETTERS = "ABCD"
PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
DURATIONS = (2, 3, 4, 8)  # seconds offered as options; every default synthetic video has one of them


def _questions(entry: dict[str, Any]) -> list[tuple[str, list[str], int]]:
    """(question, options, index of the right option) for one manifest entry."""
    duration = round(float(entry["duration"]))
    if duration not in DURATIONS:
        raise ValueError(f"synthetic video {entry['name']} lasts {entry['duration']} s, not one of {DURATIONS}")
    yes_no = ["Yes", "No"]
    return [
        ("Is there a hard cut to a new scene in this video?", yes_no, 0 if entry["scene_cuts"] else 1),
        ("Is there a stretch of this video where nothing moves?", yes_no, 0 if entry["static_ranges"] else 1),
        ("How long is this video?", [f"{d} seconds" for d in DURATIONS], DURATIONS.index(duration)),
    ]


def build_task(out_dir: str | Path, videos_dir: str | Path, *, broken: bool = False) -> Path:
    """Write docs.jsonl and the task YAML into ``out_dir`` (pass it to --include_path); return it.

    ``broken`` adds one doc whose video is missing and one whose file is not a video, for the
    failure-path tests.
    """
    out, videos = Path(out_dir), Path(videos_dir).resolve()
    manifest_file = videos / "manifest.json"
    if not manifest_file.is_file():
        raise FileNotFoundError(f"no manifest.json in {videos}; run `vidcom2 make-videos --out {videos}` first")
    manifest = json.loads(manifest_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    docs = []
    for entry in manifest["videos"]:
        for question, options, right in _questions(entry):
            docs.append(
                {
                    "doc_id": len(docs),
                    "video": str(videos / entry["path"]),
                    "video_name": entry["name"],
                    "question": question,
                    "options": [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)],
                    "answer": LETTERS[right],
                }
            )
    if broken:
        corrupt = out / "corrupt.mp4"
        corrupt.write_bytes(b"this is not an mp4 file\n" * 8)
        for name, path in (("missing", out / "does_not_exist.mp4"), ("corrupt", corrupt)):
            docs.append(
                {
                    "doc_id": len(docs),
                    "video": str(path),
                    "video_name": name,
                    "question": "Is there a hard cut to a new scene in this video?",
                    "options": ["A. Yes", "B. No"],
                    "answer": "B",
                }
            )
    (out / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    template = resources.files("vidcom2_lmms_eval") / "tasks" / f"{TASK}.yaml"
    with resources.as_file(template) as src:
        shutil.copyfile(src, out / f"{TASK}.yaml")
    return out


def doc_to_visual(doc: dict[str, Any]) -> list[str]:
    return [doc["video"]]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return "\n".join([doc["question"], *doc["options"], PROMPT_SUFFIX])


def parse_letter(response: str, n_options: int) -> str | None:
    """First standalone option letter in the response (``B``, ``(B)``, ``B.``, ``Answer: B``)."""
    valid = LETTERS[:n_options]
    match = re.search(rf"(?<![A-Za-z])([{valid}])(?![A-Za-z])", response.strip())
    return match.group(1) if match else None


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    response = results[0] if results else ""
    return {"accuracy": float(parse_letter(response, len(doc["options"])) == doc["answer"])}
