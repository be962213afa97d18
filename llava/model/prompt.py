"""The qwen_1_5 conversation template of LLaVA-OneVision / LLaVA-Video, and placeholder splitting.

Both families were trained with this template, system turn included (the transformers chat template
of the HF port has no system turn; we use the training template for both formats). The visual block
goes where the placeholder is; the text on each side is tokenised on its own, so no placeholder id
is ever needed and any number of visual tokens can be spliced in.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

CONV_TEMPLATE = "qwen_1_5"  # the name LLaVA-NeXT and lmms-eval give this template
SYSTEM_PROMPT = "You are a helpful assistant."
PLACEHOLDERS = ("<image>", "<video>")


def qwen_1_5_prompt(question: str, placeholder: str = "<image>", system: str = SYSTEM_PROMPT) -> str:
    """One user turn with the visual placeholder before the question (unless the question has one)."""
    content = question if placeholder in question else f"{placeholder}\n{question}"
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def split_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, placeholder: str = "<image>"
) -> tuple[list[int], list[int]]:
    """(ids before the visual block, ids after it) for one question about one video or image."""
    # lmms-eval style questions may carry either placeholder; normalise to ours.
    for other in PLACEHOLDERS:
        if other != placeholder:
            question = question.replace(other, placeholder)
    if question.count(placeholder) > 1:
        raise ValueError(
            f"the question holds {question.count(placeholder)} {placeholder} placeholders; expected at most 1"
        )
    before, after = qwen_1_5_prompt(question, placeholder).split(placeholder)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return list(encode(before)), list(encode(after))


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus Qwen's <|im_end|> / <|endoftext|> when present."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
    return sorted(ids)
