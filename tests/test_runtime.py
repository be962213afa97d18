"""Shared run-time pieces: the stage timer and request options."""

from __future__ import annotations

import time

import pytest
import torch

from llava.runtime import GenerationOptions, InferenceResult, StageTimer


def test_stage_timer_accumulates_and_adds():
    timer = StageTimer("cpu")
    for _ in range(2):
        with timer.stage("read_video"):
            time.sleep(0.01)
    timer.add("compress", 0.0)
    seconds = timer.seconds
    assert seconds["read_video"] >= 0.02 and seconds["compress"] == 0.0
    assert set(seconds) == {"read_video", "compress"}


def test_stage_timer_charges_time_even_when_the_stage_raises():
    timer = StageTimer("cpu")
    with pytest.raises(RuntimeError), timer.stage("vision"):
        time.sleep(0.005)
        raise RuntimeError("boom")
    assert timer.seconds["vision"] >= 0.005


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stage_timer_cuda_events_see_asynchronous_work():
    timer = StageTimer("cuda")
    x = torch.randn(4096, 4096, device="cuda")
    with timer.stage("prefill"):
        for _ in range(20):
            x = x @ x.T / 4096
    with timer.stage("decode"):
        pass
    seconds = timer.seconds
    assert seconds["prefill"] > 10 * seconds["decode"]


def test_generation_options_and_result():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationOptions(max_new_tokens=0)
    result = InferenceResult("a", [1], visual_tokens_before=200, visual_tokens_after=50)
    assert result.achieved_retention == 0.25
    assert '"achieved_retention": 0.25' in result.to_json()
