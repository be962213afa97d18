"""The KV arena (llava.model.kv_arena) against transformers' DynamicCache.

The arena must hold exactly what DynamicCache holds after any sequence of updates, keep every layer
in one allocation while the planned room lasts, and give the models bit-identical logits, prefill and
decode, in both families.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from driver_calls import llava_prefill, qwen_prefill, qwen_step
from transformers import DynamicCache, Qwen2Config

from llava.families_index import load_video_llm
from llava.model import lm_driver
from llava.model.compression import CompressionSpec
from llava.model.families import LlavaVideoLLM
from llava.model.kv_arena import ArenaLayer, arena_cache
from llava.model.lm_driver import LMInputs
from llava.model.loading import load_llava
from llava.model.prompt import split_prompt
from llava.model.tiny import write_tiny_llava
from llava.runtime import FrameSampling, StageTimer
from llava.synthetic_videos import make_videos
from llava.video_io import read_video
from transformers_patched import qwen_stages as stages
from transformers_patched.qwen_tiny import build_tiny_qwen

STEPS = 6


def small_config(layers: int = 3) -> Qwen2Config:
    return Qwen2Config(
        num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=64
    )


def kv(generator: torch.Generator, length: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (batch, 2, length, 8)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_arena_holds_what_dynamic_cache_holds_in_one_block() -> None:
    generator = torch.Generator().manual_seed(0)
    room = 3
    arena, reference = arena_cache(small_config(), room), DynamicCache(config=small_config())
    assert all(isinstance(layer, ArenaLayer) for layer in arena.layers)
    for length in [5] + [1] * (room + 2):  # the prompt, then single tokens past the planned room
        for layer in range(3):
            keys, values = kv(generator, length)
            got = arena.update(keys, values, layer)
            want = reference.update(keys, values, layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert arena.get_seq_length() == reference.get_seq_length()
        filled = arena.get_seq_length()
        if filled <= 5 + room:  # within the room: every layer's keys and values are rows of one block
            assert len({storage(layer.keys) for layer in arena.layers} | {storage(arena.layers[0].values)}) == 1
        else:  # past it, each layer moved to storage of its own, keeping its rows
            assert len({storage(layer.keys) for layer in arena.layers}) == 3
    for ours, theirs in zip(arena.layers, reference.layers, strict=True):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)


@pytest.mark.parametrize(("limit", "allocations"), [(2500, 2), (1000, 8), (1 << 20, 1)])
def test_arena_allocations_pass_the_small_pool_limit_and_no_more(
    monkeypatch: pytest.MonkeyPatch, limit: int, allocations: int
) -> None:
    """Each (B, H, capacity, D) tensor here is 2 * 2 * 8 * 8 * 4 = 1024 bytes: grouped by 3 past a 2500-byte
    limit (the last group takes the remainder), alone past a 1000-byte one, all together under 1 MiB."""
    from llava.model import kv_arena

    monkeypatch.setattr(kv_arena, "_SMALL_POOL_MAX", limit)
    generator = torch.Generator().manual_seed(2)
    cache = arena_cache(small_config(4), 3)
    for layer in range(4):
        cache.update(*kv(generator, 5), layer)
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    sizes = {storage(t): t.untyped_storage().nbytes() for t in tensors}
    assert len(sizes) == allocations
    assert allocations == 1 or all(size > limit for size in sizes.values())
    assert sum(sizes.values()) == 8 * 1024  # nothing beyond the planned rows


def test_arena_crop_and_batch_select_follow_dynamic_cache() -> None:
    generator = torch.Generator().manual_seed(1)
    arena, reference = arena_cache(small_config(1), 4), DynamicCache(config=small_config(1))
    for length in (6, 1):
        keys, values = kv(generator, length, batch=3)
        arena.update(keys, values, 0)
        reference.update(keys, values, 0)
    for cache in (arena, reference):
        cache.crop(-2)
        cache.batch_select_indices(torch.tensor([2, 0]))
    keys, values = kv(generator, 1)
    got, want = arena.update(keys, values, 0), reference.update(keys, values, 0)
    assert arena.get_seq_length() == reference.get_seq_length() == 6
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_room_must_be_a_count() -> None:
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="room"):
            arena_cache(small_config(), bad)


# ------------------------------------------------------------- the models, arena against DynamicCache


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("videos")
    make_videos(out, seed=4)
    return out


@torch.inference_mode()
def llava_logits(llm: LlavaVideoLLM, batch: LMInputs, room: int) -> tuple[torch.Tensor, DynamicCache]:
    """(steps, B, V): prefill logits, then greedy decode steps on the cache prefill returned."""
    lm = llm.model.language_model
    logits, cache = llava_prefill(lm, batch, room)
    out, mask = [logits], batch.attention_mask
    for t in range(STEPS):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = (batch.next_position[0] + t)[:, None]
        tokens = out[-1].argmax(-1)[:, None]
        step = lm(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache)
        out.append(step.logits[:, -1].float())
    return torch.stack(out), cache


@pytest.mark.parametrize("room", [0, STEPS])
def test_llava_logits_identical_to_dynamic_cache(
    tmp_path: Path, videos: Path, room: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer, _ = load_llava(write_tiny_llava(tmp_path, arch="llava_ov", seed=5))
    llm = LlavaVideoLLM(model, tokenizer)
    prompts = []
    for name, question in (("moving.mp4", "What moves?"), ("mixed.mp4", "Describe the shapes and their colours.")):
        block, _ = llm.video_block(videos / name, CompressionSpec("vidcom2", 0.5), FrameSampling(6), StageTimer())
        before, after = split_prompt(tokenizer, question, model.spec.placeholder)
        prompts.append((before, block, after))
    batch = model.build_inputs(prompts, llm.position_mode)
    assert (batch.attention_mask == 0).any()  # left padding: rows of different lengths
    ours, cache = llava_logits(llm, batch, room)
    if room >= STEPS:  # every decode step fitted the block
        assert len({storage(layer.keys) for layer in cache.layers}) == 1
    monkeypatch.setattr(lm_driver, "arena_cache", lambda config, room: DynamicCache(config=config))
    assert torch.equal(ours, llava_logits(llm, batch, room)[0])


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_qwen_logits_identical_to_dynamic_cache(
    tmp_path: Path, videos: Path, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = load_video_llm(build_tiny_qwen(arch, tmp_path, seed=6))
    frames = FrameSampling(num_frames=8)
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": read_video(videos / name, frames)},
                    {"type": "text", "text": question},
                ],
            }
        ]
        for name, question in (("moving.mp4", "What moves?"), ("mixed.mp4", "Name every colour you see."))
    ]
    inputs = llm.prepare(conversations, frames).inputs
    vision = stages.encode_vision(llm.model, inputs)
    kept = stages.select_video_tokens(llm.model, inputs, vision, CompressionSpec("vidcom2", 0.5))
    prepared = stages.build_prefill(llm.model, inputs, vision, kept)

    def run() -> tuple[torch.Tensor, DynamicCache]:
        state = qwen_prefill(llm.model, prepared, STEPS)
        out = [state.logits]
        for _ in range(STEPS):
            out.append(qwen_step(llm.model, state, out[-1].argmax(-1)))
        return torch.stack(out), state.cache

    ours, cache = run()
    assert len({storage(layer.keys) for layer in cache.layers}) == 1
    monkeypatch.setattr(lm_driver, "arena_cache", lambda config, room: DynamicCache(config=config))
    assert torch.equal(ours, run()[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("padded", [False, True])
def test_cuda_sdpa_logits_identical_to_dynamic_cache(dtype: torch.dtype, padded: bool) -> None:
    """On the GPU kernels (SDPA, grouped heads): the block's strided views give DynamicCache's logits."""
    from transformers import Qwen2ForCausalLM

    config = Qwen2Config(
        num_hidden_layers=2,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=512,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(config).to("cuda", dtype).eval()
    embeds = torch.randn(2, 37, 256, device="cuda", dtype=dtype)
    mask = torch.ones(2, 37, dtype=torch.long, device="cuda")
    if padded:
        mask[1, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    @torch.inference_mode()
    def run(cache: DynamicCache) -> torch.Tensor:
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache)
        logits, grown, position = [out.logits[:, -1]], mask, positions[:, -1:]
        for _ in range(STEPS):
            grown = torch.cat([grown, grown.new_ones(2, 1)], dim=1)
            position = position + 1
            tokens = logits[-1].argmax(-1)[:, None]
            out = lm(input_ids=tokens, attention_mask=grown, position_ids=position, past_key_values=cache)
            logits.append(out.logits[:, -1])
        return torch.stack(logits)

    assert torch.equal(run(arena_cache(config, STEPS)), run(DynamicCache(config=config)))
