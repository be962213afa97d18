"""Miniature, offline copies of lmms-eval's videomme, mlvu_dev, longvideobench_val_v and mvbench.

Why: the paper tables run lmms-eval's own task code (doc_to_visual, doc_to_text, process_results,
aggregation); a synthetic task of our own never exercises it. Here a few docs of each benchmark's
schema go exactly where lmms-eval looks, so ``lmms_eval --tasks videomme,mlvu_dev,...`` runs
unchanged with ``HF_HOME=<dir> HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1``:

- the docs: in the HF datasets cache (``$HF_HOME/datasets``) under the hub dataset's own name and
  config, written by ``datasets``' own JSON builder; offline, ``datasets.load_dataset(<hub id>)``
  answers from that cache;
- the videos (synthetic, from ``vidcom2 make-videos``): at the paths each task's ``doc_to_visual``
  builds from ``HF_HOME`` (videomme/data/<videoID>.mp4, mlvu/<video_name>,
  datasets/longvideobench/videos/<video_path>, mvbench_video/<folder of the subtask>/<video>). Their
  presence also makes lmms-eval skip its hub download.

``broken=True`` leaves out the video of a few docs (one per benchmark; two docs of
mvbench_action_count: one answered right, one missing), for the failure-path tests. Every doc's right
answer is returned, so a test can compute the exact score of a model that always answers "A".
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LETTERS = "ABCDE"

# hub id, config, split of each benchmark (lmms-eval 0.7.3's task YAMLs)
VIDEOMME = ("lmms-eval/Video-MME", "default", "test")
MLVU = ("sy1998/MLVU_dev", "default", "test")
LVB = ("longvideobench/LongVideoBench", "default", "validation")
MVBENCH = ("OpenGVLab/MVBench", None, "train")  # one config per subtask

MLVU_TASK_TYPES = ("anomaly_reco", "count", "ego", "needle", "order", "plotQA", "topic_reasoning")


@dataclass
class MiniBenchmarks:
    """What was written: per lmms-eval task name, each doc's right letter and the docs without a video."""

    hf_home: Path
    answers: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, list[int]] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return sorted(self.answers)


def _videos(videos_dir: Path) -> list[Path]:
    manifest = json.loads((videos_dir / "manifest.json").read_text())
    files = [videos_dir / v["path"] for v in manifest["videos"] if v.get("kind", "mp4") == "mp4"]
    if not files:
        raise ValueError(f"{videos_dir}: no mp4 in its manifest.json (run `vidcom2 make-videos --out {videos_dir}`)")
    return files


def _frame_folder(videos_dir: Path) -> Path | None:
    manifest = json.loads((videos_dir / "manifest.json").read_text())
    folders = [videos_dir / v["path"] for v in manifest["videos"] if v.get("kind") == "frame_folder"]
    return folders[0] if folders else None


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copyfile(source, target)


def write_cached_dataset(cache_dir: Path, hub_id: str, config: str, split: str, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` as the cached copy of hub dataset ``hub_id`` (config, split) that offline
    ``datasets.load_dataset(hub_id, config)`` reads: datasets' JSON builder writes the arrow file and
    dataset_info.json, which are then moved to the hub dataset's cache folder. Returns that folder."""
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.json.json import Json

    namespace, name = hub_id.split("/")
    snake = camelcase_to_snakecase(name)
    target = cache_dir / f"{namespace}___{snake}" / config / "0.0.0" / "mini"
    with tempfile.TemporaryDirectory(dir=cache_dir.parent if cache_dir.parent.exists() else None) as tmp:
        docs = Path(tmp) / f"{split}.jsonl"
        docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
        builder = Json(
            cache_dir=str(Path(tmp) / "build"),
            dataset_name=snake,
            config_name=config,
            hash="mini",
            data_files={split: str(docs)},
        )
        builder.download_and_prepare()
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(builder.cache_dir, target)
    return target


def task_module(task_dir: str):
    """lmms-eval's ``tasks/<task_dir>/utils.py``, loaded from its file: importing it as
    ``lmms_eval.tasks.<dir>.utils`` would first import lmms-eval's whole task registry (~10 s)."""
    import importlib.util

    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("lmms_eval is not installed")
    path = Path(spec.origin).parent / "tasks" / task_dir / "utils.py"
    module_spec = importlib.util.spec_from_file_location(f"_vidcom2_lmms_task_{task_dir}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def mvbench_folders() -> dict[str, str]:
    """MVBench subtask -> the folder under $HF_HOME/mvbench_video its videos are read from (the task's own table)."""
    return dict(task_module("mvbench").DATA_LIST)


def _options(n: int, right: int, words: tuple[str, ...]) -> tuple[list[str], str]:
    texts = [f"{words[i % len(words)]} {i + 1}" for i in range(n)]
    return texts, LETTERS[right]


def _videomme(hf_home: Path, videos: list[Path], cache: Path, broken: bool, out: MiniBenchmarks) -> None:
    # duration, domain, sub_category, task_type: values from the task's own category lists
    plan = [
        ("short", "Knowledge", "Humanity & History", "Temporal Perception", 0),
        ("short", "Sports Competition", "Football", "Counting Problem", 2),
        ("medium", "Life Record", "Daily Life", "Action Recognition", 0),
        ("long", "Film & Television", "Documentary", "Object Reasoning", 1),
    ]
    rows, answers = [], []
    for i, (duration, domain, sub, task_type, right) in enumerate(plan):
        video_id = f"mini{i:03d}"
        texts, letter = _options(4, right, ("a red square", "a blue circle", "nothing", "two shapes"))
        rows.append(
            {
                "video_id": f"{i + 1:03d}",
                "duration": duration,
                "domain": domain,
                "sub_category": sub,
                "url": f"https://www.youtube.com/watch?v={video_id}",
                "videoID": video_id,
                "question_id": f"{i + 1:03d}-1",
                "task_type": task_type,
                "question": "What does the video show?",
                "options": [f"{LETTERS[k]}. {t}" for k, t in enumerate(texts)],
                "answer": letter,
            }
        )
        answers.append(letter)
        if not (broken and i == 1):
            _place(videos[i % len(videos)], hf_home / "videomme" / "data" / f"{video_id}.mp4")
    (hf_home / "videomme" / "data").mkdir(parents=True, exist_ok=True)
    write_cached_dataset(cache, *VIDEOMME[:2], VIDEOMME[2], rows)
    out.answers["videomme"] = answers
    out.missing["videomme"] = [1] if broken else []


def _mlvu(hf_home: Path, videos: list[Path], cache: Path, broken: bool, out: MiniBenchmarks) -> None:
    rows, answers = [], []
    for i, task_type in enumerate(MLVU_TASK_TYPES):  # every type: the aggregation averages over all seven
        right = (0, 1, 0, 2, 0, 3, 1)[i]
        texts, letter = _options(4, right, ("yes", "no", "a cat", "a car"))
        name = f"{i + 1}_{task_type}/mini_{i}.mp4"
        rows.append(
            {
                "video_name": name,
                "duration": 3.0,
                "question": "What happens?\n" + "\n".join(f"({LETTERS[k]}) {t}" for k, t in enumerate(texts)),
                "candidates": texts,
                "answer": letter,
                "task_type": task_type,
                "question_id": f"mini_{i}",
            }
        )
        answers.append(letter)
        if not (broken and i == 2):
            _place(videos[i % len(videos)], hf_home / "mlvu" / name)
    write_cached_dataset(cache, *MLVU[:2], MLVU[2], rows)
    out.answers["mlvu_dev"] = answers
    out.missing["mlvu_dev"] = [2] if broken else []


def _longvideobench(hf_home: Path, videos: list[Path], cache: Path, broken: bool, out: MiniBenchmarks) -> None:
    plan = [(15, "S2E", 0, 4), (60, "E2O", 1, 5), (600, "TOS", 0, 4), (3600, "SSS", 2, 3)]
    rows, answers = [], []
    for i, (group, category, right, n_options) in enumerate(plan):
        texts, letter = _options(n_options, right, ("the man", "the dog", "the ball", "the door", "the sky"))
        path = f"mini_lvb_{i}.mp4"
        row = {
            "video_id": f"mini_lvb_{i}",
            "video_path": path,
            "subtitle_path": f"mini_lvb_{i}_en.json",
            "duration": 3.0,
            "duration_group": group,
            "starting_timestamp_for_subtitles": 0.0,
            "question": "Who moves first?",
            "correct_choice": right,
            "question_category": category,
            "topic_category": "NP-News-Programs",
            "level": "L1-Perception",
            "id": f"mini_lvb_{i}_0",
        }
        row.update({f"option{k}": texts[k] if k < n_options else "N/A" for k in range(5)})
        rows.append(row)
        answers.append(letter)
        if not (broken and i == 3):
            _place(videos[i % len(videos)], hf_home / "datasets" / "longvideobench" / "videos" / path)
    write_cached_dataset(cache, *LVB[:2], LVB[2], rows)
    out.answers["longvideobench_val_v"] = answers
    out.missing["longvideobench_val_v"] = [3] if broken else []


def _mvbench(
    hf_home: Path, videos: list[Path], folder: Path | None, cache: Path, broken: bool, out: MiniBenchmarks
) -> None:
    for s, (subtask, data_folder) in enumerate(sorted(mvbench_folders().items())):
        n_docs = 2 if subtask == "action_count" else 1
        rows, answers = [], []
        for d in range(n_docs):
            right = 0 if subtask == "action_count" else (s % 3)
            texts, letter = _options(3, right, ("left", "right", "up"))
            frames = subtask == "episodic_reasoning" and folder is not None  # a folder of frames, as upstream
            video = f"mini_{subtask}_{d}" + ("" if frames else ".mp4")
            rows.append({"video": video, "question": "Where does it go?", "candidates": texts, "answer": texts[right]})
            answers.append(letter)
            if not (broken and subtask == "action_count" and d == 1):
                source = folder if frames else videos[(s + d) % len(videos)]
                _place(source, hf_home / "mvbench_video" / data_folder / video)
        write_cached_dataset(cache, MVBENCH[0], subtask, MVBENCH[2], rows)
        out.answers[f"mvbench_{subtask}"] = answers
        out.missing[f"mvbench_{subtask}"] = [1] if broken and subtask == "action_count" else []


def write_mini_benchmarks(hf_home: str | Path, videos_dir: str | Path, *, broken: bool = False) -> MiniBenchmarks:
    """Write the four miniature benchmarks into ``hf_home`` (used as HF_HOME); videos from ``videos_dir``
    (a ``vidcom2 make-videos`` folder). Returns each lmms-eval task's right letters and missing docs."""
    hf_home, videos_dir = Path(hf_home).resolve(), Path(videos_dir).resolve()
    videos, folder = _videos(videos_dir), _frame_folder(videos_dir)
    cache = hf_home / "datasets"
    cache.mkdir(parents=True, exist_ok=True)
    out = MiniBenchmarks(hf_home)
    _videomme(hf_home, videos, cache, broken, out)
    _mlvu(hf_home, videos, cache, broken, out)
    _longvideobench(hf_home, videos, cache, broken, out)
    _mvbench(hf_home, videos, folder, cache, broken, out)
    (hf_home / "mini_benchmarks.json").write_text(
        json.dumps({"answers": out.answers, "missing": out.missing}, indent=1)
    )
    return out
