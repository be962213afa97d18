"""Module-scoped fixtures shared by the end-to-end tests: synthetic videos and a tiny SigLIP head.

A test module may define its own fixture of the same name; pytest then uses that one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from llava.model.tiny import TINY_VISION
from llava.synthetic_videos import make_videos


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("videos")
    make_videos(out, seed=0)
    return out


@pytest.fixture(scope="module")
def siglip_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SigLIP checkpoint with its attention-pooling head (FastVID's signals on LLaVA)."""
    out = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(3)
    SiglipVisionModel(SiglipVisionConfig(**{**TINY_VISION, "vision_use_head": True})).save_pretrained(out)
    return out
