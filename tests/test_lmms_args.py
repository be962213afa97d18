"""--model_args parsing of the VidCom2 lmms-eval wrappers: every knob reachable, env compatibility, errors."""

from dataclasses import fields

import pytest
from vidcom2_lmms_eval.args import DEFAULTS, parse_model_args
from vidcom2_lmms_eval.manifests import WRAPPED_IDS, manifests

from llava.model.vidcom2 import VidCom2Config

P = {"pretrained": "some/model"}


def test_every_vidcom2_knob_reaches_the_config():
    values = {
        "channel_ratio": "0.25",
        "alphas": "0.5/1.0",  # "," separates model_args, so lists use "/"
        "temperature": 0.02,
        "frame_score": "equal",
        "token_score": "-f",
        "similarity": "cosine",
        "score_dtype": "model",
        "exact_count": "true",
        "execution": "eager",
    }
    assert set(values) == {f.name for f in fields(VidCom2Config)}, "a new VidCom2Config field needs a test value"
    s = parse_model_args("llava_onevision", {**P, "compressor": "vidcom2", "retention": 0.25, **values}, environ={})
    cfg = VidCom2Config.from_options(s.compression.options)
    assert cfg == VidCom2Config(0.25, (0.5, 1.0), 0.02, "equal", "-f", "cosine", "model", True, "eager")
    assert s.compression.retention == 0.25 and s.compression_source == "model_args"


def test_env_vars_are_read_once_and_conflicts_raise():
    s = parse_model_args("qwen2_vl", dict(P), environ={"COMPRESSOR": "vidcom2", "R_RATIO": "0.15"})
    assert (s.compression.compressor, s.compression.retention, s.compression_source) == ("vidcom2", 0.15, "env")
    with pytest.raises(ValueError, match="conflicts with environment R_RATIO"):
        parse_model_args("qwen2_vl", {**P, "retention": 0.25}, environ={"COMPRESSOR": "vidcom2", "R_RATIO": "0.15"})
    with pytest.raises(ValueError, match="needs a retention"):
        parse_model_args("qwen2_vl", dict(P), environ={"COMPRESSOR": "vidcom2"})


@pytest.mark.parametrize(
    "args, match",
    [
        ({"tempreature": 0.1}, "unknown model_args \\['tempreature'\\]"),
        ({"compressor": "vidcom3", "retention": 0.2}, "unknown compressor"),
        ({"retention": 0.25}, "without a compressor"),
        ({"frame_score": "equal"}, "without a compressor"),
        ({"compressor": "random", "retention": 0.5, "frame_score": "equal"}, "VidCom2 knobs"),
        ({"compressor": "vidcom2", "retention": 0.5, "frame_score": "bogus"}, "frame_score"),
        ({"compressor": "vidcom2", "retention": 1.5}, "retention"),
        ({"on_video_error": "ignore"}, "on_video_error"),
        ({"max_pixels": 100}, "Qwen pixel budgets"),
    ],
)
def test_bad_args_name_the_parameter(args, match):
    with pytest.raises(ValueError, match=match):
        parse_model_args("llava_onevision", {**P, **args}, environ={})


def test_missing_pretrained_and_unknown_id():
    with pytest.raises(ValueError, match="pretrained"):
        parse_model_args("llava_vid", {}, environ={})
    with pytest.raises(ValueError, match="no VidCom2 wrapper"):
        parse_model_args("llava", dict(P), environ={})


def test_defaults_match_the_lmms_eval_builtins():
    ov = parse_model_args("llava_onevision", dict(P), environ={})
    assert ov.sampling.num_frames == 32 and ov.sampling.fps is None and ov.compression.is_identity
    vid = parse_model_args("llava_vid", {**P, "max_frames_num": 64}, environ={})
    assert (vid.sampling.fps, vid.sampling.max_frames, vid.sampling.force_sample) == (1.0, 64, False)
    q2 = parse_model_args("qwen2_vl", dict(P), environ={})
    assert (q2.sampling.num_frames, q2.sampling.min_pixels, q2.sampling.max_pixels) == (32, 3136, 602112)
    q3 = parse_model_args("qwen3_vl", {**P, "max_num_frames": 64, "fps": 2}, environ={})
    assert (q3.sampling.fps, q3.sampling.max_frames, q3.sampling.max_pixels) == (2.0, 64, 1605632)
    flash = parse_model_args("qwen2_vl", {**P, "use_flash_attention_2": True}, environ={})
    assert flash.attn_implementation == "flash_attention_2"


def test_manifests_replace_builtins_including_chat_classes():
    from lmms_eval.models import get_model

    assert {m.model_id for m in manifests()} == set(DEFAULTS) == set(WRAPPED_IDS)
    for model_id in DEFAULTS:
        simple = get_model(model_id, force_simple=True)
        preferred = get_model(model_id)
        assert simple.__module__ == preferred.__module__ == "vidcom2_lmms_eval.wrappers"
        assert simple.model_id == preferred.model_id == model_id


def test_device_map_and_max_memory_are_parsed_once_into_a_placement(tmp_path):
    budget = {"device_map": "auto", "max_memory": "0:70GiB/1:70GiB/cpu:100GiB"}
    s = parse_model_args("qwen2_vl", {**P, **budget}, environ={})
    assert s.placement.strategy == "auto" and s.placement.max_memory == {0: "70GiB", 1: "70GiB", "cpu": "100GiB"}
    single = parse_model_args("qwen2_vl", {**P, "device_map": "cuda:1"}, environ={})
    assert single.device == "cuda:1" and not single.placement.split  # the built-ins' single-device habit
    device_map = tmp_path / "map.json"
    device_map.write_text('{"model.visual": 0, "lm_head": 1}')
    s = parse_model_args("qwen2_vl", {**P, "device_map": str(device_map)}, environ={})
    assert s.placement.explicit == {"model.visual": "cuda:0", "lm_head": "cuda:1"}
    bad = [
        ({"device_map": "nowhere"}, "model_arg device_map"),
        ({"max_memory": "0:70GiB"}, "model_arg max_memory budgets a split: give model_arg device_map auto"),
        ({"device_map": "auto", "max_memory": "0:lots"}, "model_arg max_memory: entry '0' needs DEVICE=SIZE"),
        ({"device_map": "auto", "decode_mode": "compiled"}, "decode_mode=compiled needs the model on one device"),
    ]
    for extra, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_model_args("qwen2_vl", {**P, **extra}, environ={})
