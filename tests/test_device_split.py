"""A model split over devices (accelerate's device map) answers as the unsplit model does, for both families.

On the CPU there is one device, so the split that runs everywhere keeps the vision tower, the embedding and
the first half of the LM's layers on ``cpu`` and puts the second half on ``disk``: accelerate offloads those
weights to a folder and its hooks load them into each layer as it runs (the weights sit on the meta device
in between), the same hooks that move a layer's inputs between GPUs. Greedy ids and the first-token logits
(float32) must equal the unsplit run's for every registry method. Where CUDA is available, a cuda:0 + cpu
split, and with two GPUs a cuda:0 + cuda:1 split, check the same (skipped otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llava.model.lm_driver as driver
from llava.families_index import load_video_llm
from llava.model.compression import CompressionSpec, available_compressors
from llava.model.tiny import write_tiny_llava
from llava.placement import make_placement, parse_device_map, parse_max_memory
from llava.runtime import FrameSampling, GenerationOptions
from transformers_patched.qwen_tiny import build_tiny_qwen

FAMILIES = ("llava_ov", "qwen2_vl", "qwen3_vl")  # qwen3_vl: DeepStack rows cross the split
FRAMES = FrameSampling(num_frames=8)
GEN = GenerationOptions(max_new_tokens=4, ignore_eos=True)
# DyCoke keeps whole anchor frames: at 8 frames (Qwen: 4 temporal patches) its floor is 0.5
RETENTION = {"dycoke": 0.6}
# the tiny LMs have 16 layers: SparseVLM's default boundaries (2, 6, 15) need 17; 2 / 6 / 10 cross the split
OPTIONS = {"sparsevlm": {"layers": "2/6/10"}}
PREFIX = {"llava_ov": "language_model.model.", "qwen2_vl": "model.language_model.", "qwen3_vl": "model.language_model."}


def entry_map(family: str) -> dict[str, str]:
    """The modules besides the decoder layers, all on the CPU (the entry device)."""
    if family == "llava_ov":
        return {"vision": "cpu", "projector": "cpu", "image_newline": "cpu", "language_model.model.embed_tokens": "cpu",
                "language_model.model.rotary_emb": "cpu", "language_model.model.norm": "cpu",
                "language_model.lm_head": "cpu"}  # fmt: skip
    return {"model.visual": "cpu", "model.language_model.embed_tokens": "cpu",
            "model.language_model.rotary_emb": "cpu", "model.language_model.norm": "cpu", "lm_head": "cpu"}  # fmt: skip


def layer_map(family: str, layers: int, first: str, second: str) -> dict[str, str]:
    body = PREFIX[family]
    return {f"{body}layers.{i}": first if i < layers // 2 else second for i in range(layers)}


def decoder_layers(llm) -> torch.nn.ModuleList:
    if llm.family.startswith("llava"):
        return llm.model.language_model.model.layers
    return llm.model.model.language_model.layers


def lm_layers(llm) -> int:
    return len(decoder_layers(llm))


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory, siglip_head) -> tuple:
    """(family, checkpoint, unsplit model, cpu + disk split model) of one family."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    if family == "llava_ov":
        path = write_tiny_llava(root / "ckpt", arch="llava_ov", seed=1)
    else:
        path = build_tiny_qwen(family, root / "ckpt", seed=1)
    whole = load_video_llm(path)
    device_map = {**entry_map(family), **layer_map(family, lm_layers(whole), "cpu", "disk")}
    placement = make_placement(device_map=json.dumps(device_map), offload_dir=str(root / "offload"))
    split = load_video_llm(path, placement=placement)
    for llm in (whole, split):
        if hasattr(llm, "load_vision_head"):
            llm.load_vision_head(siglip_head)
    return family, path, whole, split


def run(llm, videos: Path, spec: CompressionSpec, monkeypatch, generation: GenerationOptions = GEN):
    """(result, first-token logits (1, V) float32) of one request."""
    seen: list[torch.Tensor] = []
    original = driver.prefill

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.logits.clone())
        return out

    monkeypatch.setattr(driver, "prefill", recording)
    result = llm.answer(videos / "mixed.mp4", "What happens?", compression=spec, generation=generation, sampling=FRAMES)
    return result, seen[0]


def test_the_split_really_offloads(pair):
    _, _, _, split = pair
    assert "disk" in split.model.hf_device_map.values()
    layers = decoder_layers(split)
    last = layers[-1].self_attn.q_proj
    assert last.weight.device.type == "meta" and hasattr(last, "_hf_hook")  # loaded by the hook at each call
    assert layers[0].self_attn.q_proj.weight.device.type == "cpu"


@pytest.mark.parametrize("method", available_compressors())
def test_split_equals_unsplit_for_every_method(pair, videos, method, monkeypatch):
    _, _, whole, split = pair
    spec = CompressionSpec(method, RETENTION.get(method, 0.25), OPTIONS.get(method, {}))
    ref, ref_logits = run(whole, videos, spec, monkeypatch)
    got, got_logits = run(split, videos, spec, monkeypatch)
    assert got.output_ids == ref.output_ids
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert (got.visual_tokens_after, got.visual_tokens_before) == (ref.visual_tokens_after, ref.visual_tokens_before)
    assert got.extra["layer_average_retention"] == pytest.approx(ref.extra["layer_average_retention"])


def test_decode_time_pruning_on_a_split_model(pair, videos, monkeypatch):
    _, _, whole, split = pair
    spec = CompressionSpec("dycoke", 0.6, {"dycoke.decode_prune": True})
    ref, ref_logits = run(whole, videos, spec, monkeypatch, GenerationOptions(max_new_tokens=6, ignore_eos=True))
    got, got_logits = run(split, videos, spec, monkeypatch, GenerationOptions(max_new_tokens=6, ignore_eos=True))
    assert got.output_ids == ref.output_ids
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_static_decoding_is_refused_and_auto_decodes_eagerly(pair, videos, monkeypatch):
    _, _, _, split = pair
    for mode in ("static", "compiled"):
        with pytest.raises(ValueError, match=rf"decode_mode='{mode}' .* split over devices .* use decode_mode=eager"):
            run(split, videos, CompressionSpec(), monkeypatch, GenerationOptions(max_new_tokens=3, decode_mode=mode))
    result, _ = run(split, videos, CompressionSpec(), monkeypatch, GenerationOptions(max_new_tokens=3))
    assert result.extra["decode_mode"] == "eager"


def test_auto_map_under_a_memory_budget_spills_layers_and_answers_the_same(pair, videos, monkeypatch, tmp_path):
    """``auto`` with a CPU budget of a few layers: accelerate's planner offloads the rest to disk."""
    family, path, whole, _ = pair
    size = sum(p.numel() * p.element_size() for p in whole.model.parameters())
    placement = make_placement(device_map="auto", max_memory=f"cpu={int(size * 0.6)}B", offload_dir=str(tmp_path))
    split = load_video_llm(path, placement=placement)
    values = list(split.model.hf_device_map.values())
    assert "disk" in values and values[0] == "cpu"
    spec = CompressionSpec("vidcom2", 0.25)
    ref, ref_logits = run(whole, videos, spec, monkeypatch)
    got, got_logits = run(split, videos, spec, monkeypatch)
    assert got.output_ids == ref.output_ids
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_bad_maps_fail_at_load_naming_what_is_wrong(pair, tmp_path):
    family, path, whole, _ = pair
    layers = layer_map(family, lm_layers(whole), "cpu", "cpu")
    apart = {**entry_map(family), **layers}
    embed = f"{PREFIX[family]}embed_tokens"
    apart[embed] = "disk"
    with pytest.raises(ValueError, match="vision tower and the text embedding must share one device"):
        load_video_llm(path, placement=make_placement(device_map=apart, offload_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"device map names modules the model lacks: \['nosuch.module'\]"):
        stray = {**entry_map(family), **layers, "nosuch.module": "cpu"}
        load_video_llm(path, placement=make_placement(device_map=stray))
    missing = dict(entry_map(family))
    with pytest.raises(ValueError, match="device map leaves parameters unplaced"):
        load_video_llm(path, placement=make_placement(device_map=missing))


def test_option_parsing_names_the_parameter(tmp_path):
    assert parse_device_map("auto") == ("auto", {})
    assert parse_device_map("cuda:1") == (None, {})
    assert parse_device_map('{"vision": 0, "rest": "disk"}') == (None, {"vision": "cuda:0", "rest": "disk"})
    file = tmp_path / "map.json"
    file.write_text(json.dumps({"a": "cpu"}))
    assert parse_device_map(str(file)) == (None, {"a": "cpu"})
    assert parse_max_memory("0=70GiB,1=70GiB,cpu=100GiB") == {0: "70GiB", 1: "70GiB", "cpu": "100GiB"}
    assert make_placement("cpu", "cuda:1").device == "cuda:1" and not make_placement("cpu", "cuda:1").split
    assert make_placement("cpu", "balanced", "0=1GiB").max_memory == {0: "1GiB"}
    bad = [
        (("cpu", "{not json"), "--device-map: not valid JSON"),
        (("cpu", '{"vision": "gpu7"}'), "--device-map entry 'vision': 'gpu7' is not a device"),
        (("cpu", "sideways"), r"--device-map \(a device, auto, balanced, JSON or a JSON file\): 'sideways'"),
        (("cpu", "{}"), "--device-map: a device map must be a non-empty JSON object"),
        (("cpu", None, "0=70GiB"), "--max-memory budgets a split: give --device-map auto or balanced"),
        (("cpu", "auto", "0=lots"), "--max-memory: entry '0' needs DEVICE=SIZE"),
        (("cpu", "auto", "gpu=1GiB"), "--max-memory: 'gpu' is not a GPU index, cpu or disk"),
        (("cpu", '{"a": "disk"}'), "--device-map puts modules on disk: an offload folder is needed"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            make_placement(*args)
    with pytest.raises(ValueError, match="model_arg device_map: not valid JSON"):
        make_placement("cpu", "{x", names=("model_arg device_map", "model_arg max_memory"))


def _gpu_split(family: str, layers: int, second: str) -> dict[str, str]:
    entry = {k: "cuda:0" for k in entry_map(family)}
    return {**entry, **layer_map(family, layers, "cuda:0", second)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("second", ["cpu", "cuda:1"])
@pytest.mark.parametrize("method", ["none", "vidcom2", "holitom", "fastv"])
def test_cuda_split_equals_unsplit(pair, videos, method, second, monkeypatch):
    """cuda:0 + cpu (the second half's weights streamed to cuda:0 by the hooks) and, with two GPUs, a
    cuda:0 + cuda:1 split (the driver moves the sequence state between the GPUs)."""
    if second == "cuda:1" and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    family, path, whole, _ = pair
    base = load_video_llm(path, device="cuda:0")
    split = load_video_llm(path, placement=make_placement(device_map=_gpu_split(family, lm_layers(whole), second)))
    spec = CompressionSpec(method, 0.25, OPTIONS.get(method, {}))
    ref, ref_logits = run(base, videos, spec, monkeypatch)
    got, got_logits = run(split, videos, spec, monkeypatch)
    assert got.output_ids == ref.output_ids and got.extra["decode_mode"] == "eager"
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["vidcom2", "fastv"])
def test_a_map_naming_a_parent_module_answers_the_same(pair, videos, method, monkeypatch, tmp_path):
    """All decoder layers offloaded as one entry (``...layers``: the ModuleList, not each layer): the driver
    finds where each layer runs from the hooks accelerate placed below that entry."""
    family, path, whole, _ = pair
    device_map = {**entry_map(family), f"{PREFIX[family]}layers": "disk"}
    split = load_video_llm(path, placement=make_placement(device_map=device_map, offload_dir=str(tmp_path)))
    assert decoder_layers(split)[0].self_attn.q_proj.weight.device.type == "meta"  # offloaded
    spec = CompressionSpec(method, 0.25)
    ref, ref_logits = run(whole, videos, spec, monkeypatch)
    got, got_logits = run(split, videos, spec, monkeypatch)
    assert got.output_ids == ref.output_ids
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-5, atol=1e-5)
