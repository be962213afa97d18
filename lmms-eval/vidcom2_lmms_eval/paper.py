"""Which paper model a run is, and the paper's numbers for its rows.

Why a module: the paper tables (results/paper/paper_accuracy.csv, paper_efficiency.csv) name models
("LLaVA-OV-7B") and methods ("Upper bound", "FastV") their own way, while a run knows its lmms-eval id,
its ``pretrained`` (a hub id, an HF cache snapshot or any local directory) and our method name. A run
is matched, in this order, by an explicit name (``PAPER_MODEL=`` / ``--paper-model``), the hub id, the
hub id inside an HF cache path (``models--org--name``), ``_name_or_path`` in the checkpoint's
config.json, and the checkpoint's architecture fingerprint (lmms-eval id + language-model width and
depth). How it matched is kept beside every row.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

# hub id -> the paper's model name
PAPER_MODEL_NAMES = {
    "lmms-lab/llava-onevision-qwen2-7b-ov": "LLaVA-OV-7B",
    "lmms-lab/LLaVA-Video-7B-Qwen2": "LLaVA-Video-7B",
    "Qwen/Qwen3-VL-8B-Instruct": "Qwen3-VL-8B-Instruct",
}
# (lmms-eval id, LM hidden size, LM layers) -> paper model: the checkpoints' config.json values
FINGERPRINTS = {
    ("llava_onevision", 3584, 28): "LLaVA-OV-7B",
    ("llava_vid", 3584, 28): "LLaVA-Video-7B",
    ("qwen3_vl", 4096, 36): "Qwen3-VL-8B-Instruct",
}
# our method name -> the paper's
PAPER_METHOD_NAMES = {
    "none": "Upper bound",
    "vidcom2": "VidCom2",
    "random": "Random",
    "fastv": "FastV",
    "pdrop": "PDrop",
    "sparsevlm": "SparseVLM",
    "dycoke": "DyCoke",
    "visionzip": "VisionZip",
    "fastvid": "FastVID",
    "holitom": "HoliTom",
}
EFFICIENCY_METHOD_NAMES = {**PAPER_METHOD_NAMES, "none": "Vanilla"}
_HF_CACHE = re.compile(r"models--([^/]+?)--([^/]+)")


class PaperModel(NamedTuple):
    name: str  # the paper's model name, or the checkpoint's own name when unmatched
    how: str  # how it matched; "" when it did not


def _config(path: Path) -> dict[str, Any] | None:
    file = path / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError:
        return None


def paper_model(model_id: str, pretrained: str, override: str | None = None) -> PaperModel:
    """The paper model a run of ``model_id`` on ``pretrained`` is (see the module docstring)."""
    if override:
        return PaperModel(override, "PAPER_MODEL override")
    if pretrained in PAPER_MODEL_NAMES:
        return PaperModel(PAPER_MODEL_NAMES[pretrained], "hub id")
    cached = _HF_CACHE.search(pretrained)
    if cached and f"{cached[1]}/{cached[2]}" in PAPER_MODEL_NAMES:
        return PaperModel(PAPER_MODEL_NAMES[f"{cached[1]}/{cached[2]}"], "HF cache path")
    config = _config(Path(pretrained))
    if config is not None:
        named = str(config.get("_name_or_path", ""))
        if named in PAPER_MODEL_NAMES:
            return PaperModel(PAPER_MODEL_NAMES[named], "config.json _name_or_path")
        text = config.get("text_config") or config
        key = (model_id, text.get("hidden_size"), text.get("num_hidden_layers"))
        if key in FINGERPRINTS:
            return PaperModel(FINGERPRINTS[key], "config.json fingerprint (lmms-eval id, LM width and depth)")
    return PaperModel(pretrained.rstrip("/").split("/")[-1], "")


def read_paper(path: Path) -> list[dict[str, str]]:
    with Path(path).open() as fh:
        return list(csv.DictReader(fh))


def paper_key(model: str, frames: Any, method: str, retention: float) -> tuple:
    return (model, int(frames) if frames is not None else None, method, round(float(retention), 2))


def index_accuracy(rows: list[dict[str, str]]) -> dict[tuple, dict[str, str]]:
    """paper_accuracy.csv rows by (model, frames, paper method name, retention)."""
    return {paper_key(r["model"], r["frames"], r["method"], float(r["retention"])): r for r in rows}


def efficiency_model(rows: list[dict[str, str]], path: Path) -> str:
    """The one model of paper_efficiency.csv (the first field of every row's note)."""
    models = {r["note"].split(",")[0].strip() for r in rows}
    if len(models) != 1:
        raise ValueError(f"{path}: expected one model in the notes, found {sorted(models)}")
    return models.pop()
