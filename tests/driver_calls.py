"""Both families' language models through the shared layer-wise driver, as the tests call them."""

from __future__ import annotations

import torch

from llava.model import lm_driver
from llava.model.generate import llava_stack
from llava.model.lm_driver import LMInputs, PrefillResult
from llava.model.static_decode import start_static_decode
from llava.runtime import GenerationOptions
from transformers_patched import qwen_stages as stages


def qwen_prefill(model, prepared: stages.PrefillInputs, room: int = 0) -> PrefillResult:
    return lm_driver.prefill(stages.qwen_stack(model), stages.lm_inputs(prepared), room=room)


def qwen_step(model, state: PrefillResult, tokens: torch.Tensor) -> torch.Tensor:
    return lm_driver.decode_step(stages.qwen_stack(model), state, tokens)


def qwen_generate(model, prepared: stages.PrefillInputs, options: GenerationOptions, **kwargs):
    """(ids (B, T), first logits (B, V)) laid out as transformers' generate returns them: a row that stopped
    holds its EOS, then the pad id."""
    eos = stages.eos_token_ids(model)
    out = lm_driver.generate(stages.qwen_stack(model), stages.lm_inputs(prepared), options, stop_ids=eos, **kwargs)
    pad = model.generation_config.pad_token_id
    pad = eos[0] if pad is None else int(pad)
    stopped = [row + [eos[0]] if len(row) < options.max_new_tokens else row for row in out.ids]
    width = max(len(row) for row in stopped)
    rows = [row + [pad] * (width - len(row)) for row in stopped]
    return torch.tensor(rows, device=out.first_logits.device), out.first_logits


def llava_prefill(lm, batch: LMInputs, room: int = 0) -> tuple[torch.Tensor, object]:
    state = lm_driver.prefill(llava_stack(lm), batch, room=room)
    return state.logits, state.cache


def llava_generate(lm, batch: LMInputs, options: GenerationOptions, stop_ids=()) -> list[list[int]]:
    return lm_driver.generate(llava_stack(lm), batch, options, stop_ids=list(stop_ids)).ids


def static_decoder(stack: lm_driver.DecoderStack, state: PrefillResult, steps: int, mode: str):
    """A static / compiled decoder started from a driver prefill; feed it with ``stack.static_positions``."""
    mask = state.groups[0].key_valid.long()
    return start_static_decode(stack.static_model, stack.static_step, stack.config, state.cache, mask, steps, mode)


@torch.inference_mode()
def qwen_static_logits(model, prepared, ids: torch.Tensor, mode: str) -> torch.Tensor:
    """(steps, B, V) logits of the prefill and every decode step fed ``ids``, eager or on a static cache."""
    stack = stages.qwen_stack(model)
    state = lm_driver.prefill(stack, stages.lm_inputs(prepared))
    out = [state.logits]
    decoder = static_decoder(stack, state, ids.shape[1], mode) if mode != "eager" else None
    for t in range(ids.shape[1] - 1):
        if decoder is None:
            out.append(lm_driver.decode_step(stack, state, ids[:, t]))
        else:
            out.append(decoder.step(ids[:, t], stack.static_positions(state.groups[0].next_position + t)))
    return torch.stack(out)
