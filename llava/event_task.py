"""The brief-event task: a small coloured square flashes for two frames; its colour is the answer.

Why: a compression method is only as good as what it keeps, and a task whose answer lives in one token
of one frame shows that directly. Everything else in the video is grey and lasts (a grey ramp with
grain, grey squares that drift across every frame), so the square is the only colour: a model can learn
to read it in CPU minutes, a method that keeps what is unique in time and space keeps it, and one that
keeps tokens blindly keeps it about R of the time.

The square lies inside one cell of the frame's ``GRID`` x ``GRID`` token grid (the 4 x 4 grid of
LLaVA-OV's pooled tokens and of Qwen's merged tokens at 112 px), so exactly one token per event frame
shows it: whether a method kept the event is a yes or no per video, and the trained model
(llava.train_tiny) answers from that token, at chance without it.

Each video (``vidcom2 make-videos --task event``): ``NUM_FRAMES`` frames at ``FPS``; the event covers
frames [start, start + 2) with an even ``start``, so uniform 8-frame sampling shows it in exactly one
sampled frame and Qwen's temporal patches (two frames each) hold it in exactly one patch. The manifest
records each video's event frames, colour and box (pixels, [x0, y0, x1, y1)), which is the ground truth
for the share of event tokens a method keeps (:func:`event_token_mask`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llava.synthetic_videos import MANIFEST, write_mp4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 30),
}
LETTERS = "ABCD"
QUESTION = "What colour is the small square that appears only briefly?"
PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
SIZE, NUM_FRAMES, FPS = 112, 16, 8
EVENT_LENGTH, EVENT_SIDE = 2, 16  # frames, pixels
GRID = 4  # token cells per side at SIZE; the square lies inside one cell (SIZE // GRID = 28 px)
DISTRACTORS = 3
TRAIN_SEED, EVAL_SEED = 1, 0  # disjoint video sets: the checkpoint never sees an evaluation video


@dataclass(frozen=True)
class EventVideo:
    """One video's ground truth: event frames [start, start + length), colour, box [x0, y0, x1, y1)."""

    name: str
    path: str
    width: int
    height: int
    fps: int
    num_frames: int
    start: int
    length: int
    colour: str
    box: tuple[int, int, int, int]

    @property
    def answer(self) -> str:
        return LETTERS[list(COLOURS).index(self.colour)]


def _draw_square(frame: np.ndarray, x: int, y: int, side: int, colour: Sequence[int]) -> None:
    frame[max(y, 0) : max(y + side, 0), max(x, 0) : max(x + side, 0)] = colour


def render(rng: np.random.Generator, colour: str) -> tuple[np.ndarray, int, tuple[int, int, int, int]]:
    """-> ((N, H, W, 3) uint8 frames, event start, event box). One random scene; the event on top."""
    n, size = NUM_FRAMES, SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    grey = rng.uniform(70, 180, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    background = grey[0] + (grey[1] - grey[0]) * (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    base = np.clip(background + rng.normal(0, 4, size=(size, size)), 0, 255)[..., None].repeat(3, axis=-1)
    frames = np.repeat(base[None], n, axis=0)
    for _ in range(DISTRACTORS):  # neutral shapes that drift through every frame
        side = int(rng.integers(12, 24))
        level = float(rng.choice([15.0, 60.0, 200.0, 245.0]) + rng.uniform(-10, 10))
        start_xy = rng.uniform(0, size - side, size=2)
        velocity = rng.uniform(-2.5, 2.5, size=2)
        for t in range(n):
            x, y = np.clip(start_xy + velocity * t, 0, size - side).astype(int)
            _draw_square(frames[t], int(x), int(y), side, (level, level, level))
    start = 2 * int(rng.integers(1, (n - EVENT_LENGTH) // 2 + 1))  # even, >= 2: never the first frame
    cell = size // GRID  # the square inside one token cell: the cell's column and row, then the offset in it
    corner = rng.integers(0, GRID, size=2) * cell + rng.integers(0, cell - EVENT_SIDE + 1, size=2)
    x0, y0 = (int(v) for v in corner)
    for t in range(start, start + EVENT_LENGTH):
        _draw_square(frames[t], x0, y0, EVENT_SIDE, COLOURS[colour])
    return frames.round().astype(np.uint8), start, (x0, y0, x0 + EVENT_SIDE, y0 + EVENT_SIDE)


def event_videos(count: int, seed: int) -> list[tuple[EventVideo, np.ndarray]]:
    """``count`` videos (colours balanced: video i has colour i mod 4) with their frames, in memory."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        frames, start, box = render(rng, colour)
        name = f"event_{i:04d}"
        spec = EventVideo(name, f"{name}.mp4", SIZE, SIZE, FPS, NUM_FRAMES, start, EVENT_LENGTH, colour, box)
        out.append((spec, frames))
    return out


def make_event_videos(out_dir: str | Path, count: int = 48, seed: int = EVAL_SEED) -> dict[str, Any]:
    """Write ``count`` event videos (H.264 mp4) and ``manifest.json`` into ``out_dir``; return the manifest."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for spec, frames in event_videos(count, seed):
        write_mp4(frames, out / spec.path, spec.fps)
        entries.append(asdict(spec))
    manifest = {"task": "event", "seed": seed, "videos": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(videos_dir: str | Path) -> list[EventVideo]:
    """The event videos of a ``make-videos --task event`` folder; a folder of another kind raises."""
    path = Path(videos_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {videos_dir}; run `vidcom2 make-videos --task event --out DIR`")
    manifest = json.loads(path.read_text())
    if manifest.get("task") != "event":
        raise ValueError(f"{path} describes no event videos (task={manifest.get('task')!r}); use --task event")
    return [EventVideo(**{**e, "box": tuple(e["box"])}) for e in manifest["videos"]]


def options() -> list[str]:
    return [f"{LETTERS[i]}. {name}" for i, name in enumerate(COLOURS)]


def prompt_text(question: str, choices: Sequence[str]) -> str:
    """The user turn of a multiple-choice question (what lmms-eval's doc_to_text gives the model)."""
    return "\n".join([question, *choices, PROMPT_SUFFIX])


def parse_letter(response: str, n_options: int) -> str | None:
    """First standalone option letter in the response (``B``, ``(B)``, ``B.``, ``Answer: B``)."""
    valid = LETTERS[:n_options]
    match = re.search(rf"(?<![A-Za-z])([{valid}])(?![A-Za-z])", response.strip())
    return match.group(1) if match else None


def event_token_mask(video: EventVideo, frame_groups: Sequence[Sequence[int]], grid_hw: tuple[int, int]) -> np.ndarray:
    """(F, h, w) bool: the tokens that show the event.

    ``frame_groups[f]``: the source frame indices token-frame f was made from (LLaVA: one frame; Qwen:
    the two frames of a temporal patch). A token shows the event when one of its frames does and its
    cell (the frame split into an h x w grid; every family resizes whole frames, no crop) overlaps the
    event's box.
    """
    h, w = grid_hw
    x0, y0, x1, y1 = (v / s for v, s in zip(video.box, (video.width, video.height) * 2, strict=True))
    rows = (np.arange(h) + 1) / h > y0 + 1e-9  # cell [i/h, (i+1)/h) overlaps [y0, y1)
    rows &= np.arange(h) / h < y1 - 1e-9
    cols = ((np.arange(w) + 1) / w > x0 + 1e-9) & (np.arange(w) / w < x1 - 1e-9)
    cell = rows[:, None] & cols[None, :]
    shown = np.array(
        [any(video.start <= i < video.start + video.length for i in group) for group in frame_groups], dtype=bool
    )
    return shown[:, None, None] & cell[None]
