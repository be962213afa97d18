"""The synthetic multiple-choice video tasks of the default job, built from ``vidcom2 make-videos`` output.

Why: the whole evaluation path (lmms-eval CLI, our wrappers, compression, meter, collector) must run
offline on a CPU in minutes, on questions whose answers are known without labelling.

- ``vidcom2_synth_event`` (the default job): one question per brief-event video (llava.event_task):
  the colour of a small square shown in two frames. The tiny checkpoint trained on it answers far above
  chance, so the accuracy under a method shows whether the method kept the event.
- ``vidcom2_synth_mc`` (plumbing): facts written in the plumbing videos' manifest (scene cut? static
  stretch? duration?). A random-weight model answers it at chance; its tests exercise the failure paths.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from llava.event_task import LETTERS, QUESTION, parse_letter, prompt_text, read_manifest
from llava.event_task import options as event_options

TASK = "vidcom2_synth_mc"
EVENT_TASK = "vidcom2_synth_event"
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
    return _write_task(out, docs, TASK)


def build_event_task(out_dir: str | Path, videos_dir: str | Path) -> Path:
    """Write the brief-event task (docs.jsonl + YAML) for a ``make-videos --task event`` folder; return it.
    Each doc carries its video's ground truth (colour, event frames, box) for the event-token share."""
    out, videos = Path(out_dir), Path(videos_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    docs = [
        {
            "doc_id": i,
            "video": str(videos / video.path),
            "video_name": video.name,
            "question": QUESTION,
            "options": event_options(),
            "answer": video.answer,
            "colour": video.colour,
            "event_frames": [video.start, video.start + video.length],
            "box": list(video.box),
        }
        for i, video in enumerate(read_manifest(videos))
    ]
    return _write_task(out, docs, EVENT_TASK)


def _write_task(out: Path, docs: list[dict[str, Any]], task: str) -> Path:
    """docs.jsonl and the task's YAML template (lmms-eval resolves data_files next to the YAML)."""
    (out / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    template = resources.files("vidcom2_lmms_eval") / "tasks" / f"{task}.yaml"
    with resources.as_file(template) as src:
        shutil.copyfile(src, out / f"{task}.yaml")
    return out


def doc_to_visual(doc: dict[str, Any]) -> list[str]:
    return [doc["video"]]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return prompt_text(doc["question"], doc["options"])


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    response = results[0] if results else ""
    return {"accuracy": float(parse_letter(response, len(doc["options"])) == doc["answer"])}
