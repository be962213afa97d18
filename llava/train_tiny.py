"""Train a tiny LLaVA checkpoint on the brief-event task (``vidcom2 train-tiny``), on the CPU, in minutes.

Why: random weights never answer, so a task run on them says nothing about what a compression method
kept. A tiny model of the real architecture (SigLIP -> projector -> pooling -> Qwen2, the same code that
serves the 7B checkpoints), trained on the event task, answers far above chance uncompressed; its
accuracy under a method then falls back to chance exactly when the method drops the event's token.

Training runs the inference code path with gradients: frames are read from H.264 files as at
evaluation, preprocessed, encoded, laid out as a compressed visual block and spliced into the qwen_1_5
prompt by ``build_inputs``; the loss is the cross-entropy of the answer letter and the end-of-turn
token that follows it.

Token dropout (:func:`dropout_keep`): each training video keeps a random ``k = R * P`` of each frame's
other tokens, R drawn from ``DROPOUT_RETENTIONS``, so a shortened sequence is not out of distribution.
The event's tokens are kept, except in a share ``EVENT_DROP_SHARE`` of the videos, which lose exactly
them and are trained towards a uniform answer over the four letters. Why: SigLIP's self-attention
spreads a trace of the colour over every token of the event frame, and a model trained on blind
dropout learns to read the colour from that trace, so it answers right whatever a method keeps; these
videos teach that the trace is no evidence, so the answer depends on the event's own token and the
accuracy column of the default job measures what a method kept. The dropout never imitates a method.
Two more aids, for training only: a token loss at the video tokens (``_Batcher.loss``) and a curriculum
of short clips (``_clip``), one length after another, each until the answer is learnt at that length.
Deterministic for a seed on one machine.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llava.event_task import (
    COLOURS,
    EVAL_SEED,
    LETTERS,
    QUESTION,
    TRAIN_SEED,
    EventVideo,
    event_token_mask,
    make_event_videos,
    options,
    prompt_text,
    read_manifest,
)
from llava.kept_tokens import sampled_indices
from llava.model.baselines import uniform_budget
from llava.model.compression import CompressionSpec
from llava.model.layout import build_layout
from llava.model.llava_arch import VisualBlock
from llava.model.llava_config import parse_spec
from llava.model.loading import build_random
from llava.model.prompt import split_prompt
from llava.model.tiny import save_llava_checkpoint, tiny_lmms_lab_config, tiny_tokenizer
from llava.runtime import FrameSampling
from llava.video_io import read_videos

DROPOUT_RETENTIONS = (1.0, 1.0, 0.5, 0.25, 0.1)
EVENT_DROP_SHARE = 0.25  # training videos that lose exactly the event's tokens (target: uniform answer)
AUX_WEIGHT, NO_EVENT_WEIGHT, NO_EVENT = 1.0, 0.05, "-"  # the token loss (see _Batcher.loss)
TRAINING_FILE = "training.json"


@dataclass(frozen=True)
class OracleCase:
    """One keep rule of :func:`event_oracle`: the event's tokens kept or not, and the retention of the
    other tokens (per frame, drawn at random; 1.0 keeps them all)."""

    name: str
    event: bool
    others: float = 1.0


ORACLE_CASES = (
    OracleCase("all", True),
    OracleCase("no_event", False),
    OracleCase("no_event_r0.25", False, 0.25),
    OracleCase("event_r0.25", True, 0.25),
    OracleCase("event_r0.1", True, 0.1),
)


@dataclass(frozen=True)
class TrainConfig:
    """Every training choice; written next to the weights (``training.json``) with the results."""

    arch: str = "llava_ov"
    image_size: int = 112  # 8x8 SigLIP patches -> 4x4 tokens per frame after OV's bilinear pooling
    lm_layers: int = 17  # Qwen2 depth: SparseVLM's default layers (2, 6, 15) need at least 17
    frames: int = 8
    train_videos: int = 768
    eval_videos: int = 48
    steps: int = 600
    batch_size: int = 12
    lr: float = 1e-2
    weight_decay: float = 0.01
    warmup: int = 20
    seed: int = 0
    short_clips: tuple[int, ...] = (1, 2, 4)  # clip lengths of the curriculum, in turn (see _clip)
    advance_below: float = 0.3  # move to the next clip length once the answer loss (mean of 10 steps) is below

    def __post_init__(self) -> None:
        for name in ("frames", "train_videos", "eval_videos", "steps", "batch_size", "lm_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"train-tiny: {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"train-tiny: lr must be > 0, got {self.lr}")
        if any(not 1 <= n <= self.frames for n in self.short_clips):
            raise ValueError(f"train-tiny: short_clips must lie in [1, frames], got {self.short_clips}")


def _clip(
    frames: np.ndarray, events: np.ndarray, length: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A batch's videos cut to ``length`` of their sampled frames, the event's frame always among them:
    (B, F, H, W, 3), (B, F, T) -> (B, length, H, W, 3), (B, length * T). The curriculum: in a short clip
    the event is one token among a few dozen, so the answer's gradient finds it; among the ~350 tokens of
    a full clip it barely reaches it, and training on full clips alone stalls at chance."""
    batch, n_frames = frames.shape[:2]
    if length >= n_frames:
        return frames, events.reshape(batch, -1)
    shown = events.any(axis=2)  # (B, F): frames showing the event
    noise = rng.random((batch, n_frames)) + 2.0 * shown  # the event's frame first, the others at random
    chosen = np.sort(np.argsort(-noise, axis=1)[:, :length], axis=1)
    rows = np.arange(batch)[:, None]
    return frames[rows, chosen], events[rows, chosen].reshape(batch, -1)


def _read_frames(folder: Path, frames: int) -> tuple[np.ndarray, np.ndarray, list[EventVideo], list[list[int]]]:
    """Every video of an event folder decoded as evaluation reads it -> ((N, F, H, W, 3) uint8 frames,
    (N,) labels, the ground truth, the sampled frame indices per video)."""
    videos = read_manifest(folder)
    clips = read_videos([folder / v.path for v in videos], FrameSampling(num_frames=frames))
    labels = np.array([list(COLOURS).index(v.colour) for v in videos])
    return np.stack([c.frames for c in clips]), labels, videos, [sampled_indices(c) for c in clips]


def dropout_keep(
    events: np.ndarray, retentions: np.ndarray, drop_event: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(B, F, P) event-token masks -> (B, F, P) keep masks: per frame, k = max(1, round(R * P)) random
    tokens among those not showing the event (R = ``retentions[b]``, all of them at R = 1), plus the
    event's tokens unless ``drop_event[b]``. So a kept event is never a matter of luck, and a dropped
    event leaves everything else a method could keep, the colour's trace in the other tokens included."""
    if events.ndim != 3 or retentions.shape != events.shape[:1] or drop_event.shape != events.shape[:1]:
        raise ValueError(
            f"dropout_keep: events must be (B, F, P) with (B,) retentions and drop_event, got {events.shape}, "
            f"{retentions.shape}, {drop_event.shape}"
        )
    per_frame = events.shape[2]
    budget = np.array([uniform_budget(float(r), per_frame) for r in retentions])[:, None, None]
    noise = np.where(events, np.inf, rng.random(events.shape))  # the event's tokens rank last: never drawn
    ranks = np.argsort(np.argsort(noise, axis=2), axis=2)
    return ((ranks < budget) & ~events) | (events & ~drop_event[:, None, None])


def masked_blocks(model: torch.nn.Module, features: torch.Tensor, keep: np.ndarray) -> list[VisualBlock]:
    """(B, F, h, w, D) features and (B, F * h * w) keep masks -> each video's visual block: the kept
    tokens in video order with the family's newlines, laid out as a select-only method's output is."""
    batch, frames, h, w, dim = features.shape
    newline = model.image_newline.to(features.dtype)[None]
    blocks = []
    for i in range(batch):
        kept = torch.from_numpy(np.flatnonzero(keep[i])).to(features.device)
        layout = build_layout(kept, frames, h, w, model.spec.newline_position)
        table = torch.cat([features[i].reshape(-1, dim), newline])
        blocks.append(VisualBlock(table.index_select(0, layout.source), layout))
    return blocks


class _Batcher:
    """Builds the LM inputs of a batch with gradients through the vision tower and the projector."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.model = model
        question = prompt_text(QUESTION, options())
        self.before, self.after = split_prompt(tokenizer, question, model.spec.placeholder)
        letters = [tokenizer(letter, add_special_tokens=False)["input_ids"] for letter in LETTERS]
        if any(len(ids) != 1 for ids in letters):
            raise ValueError("the tiny tokenizer must spell each option letter as one token")
        self.letters = torch.tensor([ids[0] for ids in letters])
        self.end = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self.no_event = int(tokenizer.convert_tokens_to_ids(NO_EVENT))

    def features(self, frames: np.ndarray) -> torch.Tensor:
        """(B, F, H, W, 3) uint8 -> (B, F, h, w, D) pooled features, with gradients."""
        batch, n_frames = frames.shape[:2]
        features = self.model.encode_video(self.model.preprocess(frames.reshape(-1, *frames.shape[2:])))
        return features.reshape(batch, n_frames, *features.shape[1:])

    def logits(self, blocks: list[VisualBlock], tail: list[list[int]]) -> torch.Tensor:
        """(B, L, V) float32 logits of the prompts ``before + block + after + tail[b]`` (left-padded)."""
        prompts = [(self.before, block, [*self.after, *ids]) for block, ids in zip(blocks, tail, strict=True)]
        inputs = self.model.build_inputs(prompts)
        return self.model.language_model(
            inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
        ).logits.float()

    def loss(
        self, frames: np.ndarray, labels: np.ndarray, events: np.ndarray, keep: np.ndarray
    ) -> tuple[torch.Tensor, float]:
        """(training loss, answer loss of the videos that keep their event) over a batch of (F, H, W, 3)
        videos with their (F * h * w,) event-token masks ``events`` and keep masks ``keep``.

        Answer loss: the cross-entropy of (letter, end of turn); the letter's target is the label where
        the video keeps an event token and uniform over the four letters where it keeps none (the
        evidence is gone). The token loss (``AUX_WEIGHT``) reads the logits at each kept video token's
        own position: the colour's letter where the token shows the event, ``NO_EVENT`` elsewhere
        (weighted down by the event share). It gives the tower and the LM a direct signal of where the
        colour is; without it, the answer's gradient reaches the one event token among some 130 only
        through near-uniform attention, and training stalls."""
        batch = frames.shape[0]
        blocks = masked_blocks(self.model, self.features(frames), keep)
        logits = self.logits(blocks, [[int(self.letters[label])] for label in labels])
        seen = torch.as_tensor((keep & events).any(axis=1))  # (B,) the event reaches the LM
        target = torch.zeros(batch, logits.shape[-1])
        target[:, self.letters] = torch.where(seen[:, None], 0.0, 1.0 / len(self.letters))
        target[torch.arange(batch)[seen], self.letters[torch.as_tensor(labels)][seen]] = 1.0
        letter = F.cross_entropy(logits[:, -2], target, reduction="none")
        end = F.cross_entropy(logits[:, -1], torch.full((batch,), self.end), reduction="none")
        per_video = (letter + end) / 2
        length = logits.shape[1]
        rows, cols, wanted, weights = [], [], [], []
        for i, block in enumerate(blocks):
            source = block.layout.source
            visual = source < events.shape[1]  # newlines index past the video tokens
            start = length - (len(self.before) + len(source) + len(self.after) + 1) + len(self.before)
            shows = torch.as_tensor(events[i])[source[visual]]
            rows.append(torch.full((int(visual.sum()),), i))
            cols.append(start + torch.nonzero(visual).squeeze(1))
            wanted.append(torch.where(shows, self.letters[labels[i]], self.no_event))
            weights.append(torch.where(shows, 1.0, NO_EVENT_WEIGHT))
        token_logits = logits[torch.cat(rows), torch.cat(cols)]
        per_token = F.cross_entropy(token_logits, torch.cat(wanted), reduction="none")
        weight = torch.cat(weights)
        shown = per_video[seen] if bool(seen.any()) else per_video
        return per_video.mean() + AUX_WEIGHT * (per_token * weight).sum() / weight.sum(), float(shown.detach().mean())


def _lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, constant, then over the last fifth a cosine decay to a tenth."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    tail = config.steps // 5
    progress = max(0.0, (step - (config.steps - tail)) / max(1, tail))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_tiny(out_dir: str | Path, config: TrainConfig = TrainConfig(), *, log: Any = print) -> dict[str, Any]:
    """Train, save the checkpoint (lmms-lab format) and ``training.json`` into ``out_dir``; return its content.

    The evaluation set (seed EVAL_SEED) is disjoint from the training set (seed TRAIN_SEED); the reported
    accuracy is greedy decoding through the model's own ``answer_batch``, uncompressed, and beside it the
    accuracies of :func:`event_oracle` (with and without the event's tokens).
    """
    started = time.time()
    torch.manual_seed(config.seed)
    lmms_config = tiny_lmms_lab_config(config.arch, image_size=config.image_size, lm_layers=config.lm_layers)
    model = build_random(parse_spec(lmms_config), seed=config.seed).train()
    tokenizer = tiny_tokenizer()
    with tempfile.TemporaryDirectory(prefix="vidcom2_train_") as tmp:
        make_event_videos(Path(tmp) / "train", count=config.train_videos, seed=TRAIN_SEED)
        frames, labels, videos, sampled = _read_frames(Path(tmp) / "train", config.frames)
    with torch.no_grad():
        grid = model.encode_video(model.preprocess(frames[0, :1])).shape[1:3]
    pairs = zip(videos, sampled, strict=True)
    events = np.stack([event_token_mask(v, [[i] for i in index], grid).reshape(len(index), -1) for v, index in pairs])
    batcher = _Batcher(model, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    losses: list[float] = []
    lengths = [*config.short_clips, config.frames]
    stage, history = 0, []  # the curriculum's position and the steps at which it advanced
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        pick = rng.choice(len(frames), size=config.batch_size, replace=False)
        retentions = rng.choice(DROPOUT_RETENTIONS, size=config.batch_size)
        drop_event = rng.random(config.batch_size) < EVENT_DROP_SHARE
        length = lengths[stage]
        clip, clip_events = _clip(frames[pick], events[pick], length, rng)
        shaped = clip_events.reshape(config.batch_size, length, -1)
        keep = dropout_keep(shaped, retentions, drop_event, rng).reshape(config.batch_size, -1)
        loss, answer = batcher.loss(clip, labels[pick], clip_events, keep)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(answer)
        if stage < len(lengths) - 1 and len(losses) >= 10 and np.mean(losses[-10:]) < config.advance_below:
            stage += 1
            history.append(step)
            losses.clear()
        if step % 25 == 0 or step == config.steps - 1:
            recent = np.mean(losses[-25:]) if losses else float("nan")
            seconds = time.time() - started
            log(f"step {step:4d}  answer loss {recent:.4f} (chance 0.69)  clip {length}  {seconds:.0f} s")
    model.eval()
    out = save_llava_checkpoint(model, lmms_config, out_dir, fmt="lmms-lab")
    accuracy = evaluate_accuracy(out, config.eval_videos, config.frames)
    oracle = event_oracle(out, config.eval_videos, config.frames)
    report = {
        "config": asdict(config),
        "dropout_retentions": list(DROPOUT_RETENTIONS),
        "event_drop_share": EVENT_DROP_SHARE,
        "clip_lengths": lengths,
        "advanced_at_steps": history,
        "final_answer_loss": float(np.mean(losses[-25:])),
        "eval_accuracy_uncompressed": accuracy,
        "eval_accuracy_oracle": oracle,
        "eval_videos_seed": EVAL_SEED,
        "train_videos_seed": TRAIN_SEED,
        "seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }
    (out / TRAINING_FILE).write_text(json.dumps(report, indent=2) + "\n")
    log(f"uncompressed accuracy on {config.eval_videos} evaluation videos: {accuracy:.3f}; oracle: {oracle}")
    return report


def evaluate_accuracy(
    model_dir: str | Path,
    count: int,
    frames: int,
    compression: CompressionSpec = CompressionSpec(),
    videos_dir: str | Path | None = None,
) -> float:
    """Share of the ``count`` evaluation videos the checkpoint answers right (greedy, the model's own
    ``answer_batch``), under ``compression``. ``videos_dir``: an existing event folder to use."""
    from llava.event_task import parse_letter
    from llava.families_index import load_video_llm
    from llava.runtime import GenerationOptions

    llm = load_video_llm(model_dir)
    with tempfile.TemporaryDirectory(prefix="vidcom2_eval_") as tmp:
        folder = Path(videos_dir) if videos_dir is not None else Path(tmp)
        if videos_dir is None:
            make_event_videos(folder, count=count, seed=EVAL_SEED)
        videos = read_manifest(folder)[:count]
        question = prompt_text(QUESTION, options())
        right = 0
        generation = GenerationOptions(max_new_tokens=4)
        for start in range(0, len(videos), 16):
            chunk = videos[start : start + 16]
            results = llm.answer_batch(
                [folder / v.path for v in chunk],
                [question] * len(chunk),
                compression=compression,
                generation=generation,
                sampling=FrameSampling(num_frames=frames),
            )
            right += sum(parse_letter(r.answer, len(COLOURS)) == v.answer for r, v in zip(results, chunk, strict=True))
    return right / len(videos)


def event_oracle(
    model_dir: str | Path,
    count: int,
    frames: int,
    cases: tuple[OracleCase, ...] = ORACLE_CASES,
    videos_dir: str | Path | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """{case name: share of the ``count`` evaluation videos answered right} with the tokens each case
    keeps (:func:`dropout_keep`, drawn with ``seed``), chosen from the ground truth rather than by a
    method. It shows what the checkpoint reads: near chance (0.25) without the event's tokens and near
    its uncompressed accuracy with them means the answer lives in the event's own tokens, so a
    method's accuracy measures whether it kept them. Answered = the greedy first token is the letter."""
    from llava.families_index import load_video_llm

    llm = load_video_llm(model_dir)
    model, batcher = llm.model, _Batcher(llm.model, llm.tokenizer)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="vidcom2_oracle_") as tmp:
        folder = Path(videos_dir) if videos_dir is not None else Path(tmp)
        if videos_dir is None:
            make_event_videos(folder, count=count, seed=EVAL_SEED)
        pixels, labels, videos, sampled = _read_frames(folder, frames)
    pixels, labels, videos, sampled = pixels[:count], labels[:count], videos[:count], sampled[:count]
    right = dict.fromkeys((case.name for case in cases), 0)
    with torch.no_grad():
        for start in range(0, len(videos), 16):
            chunk = slice(start, start + 16)
            features = batcher.features(pixels[chunk])
            grid = tuple(features.shape[2:4])
            events = np.stack(
                [
                    event_token_mask(v, [[i] for i in index], grid).reshape(len(index), -1)
                    for v, index in zip(videos[chunk], sampled[chunk], strict=True)
                ]
            )
            n = len(events)
            for case in cases:
                retentions, drop = np.full(n, case.others), np.full(n, not case.event)
                keep = dropout_keep(events, retentions, drop, rng).reshape(n, -1)
                first = batcher.logits(masked_blocks(model, features, keep), [[] for _ in range(n)])[:, -1]
                answers = first.argmax(dim=-1).cpu()
                right[case.name] += int((answers == batcher.letters[torch.as_tensor(labels[chunk])]).sum())
    return {name: hits / len(videos) for name, hits in right.items()}
