"""A picture of what compression methods keep (``vidcom2 visualize``): one row per method.

Each row shows the sampled frames (Qwen: the first frame of each two-frame temporal patch) with the
token grid drawn on them: a dropped token is dimmed, a kept token is shown as is, and the tokens of a
merged group are tinted in the group's colour (its source, where the merged token sits, is outlined).
A bar under each frame is its budget (kept / P), the caption gives the achieved retention, and a method
that cannot run on the model gets its reason in place of the frames. Optional ground-truth cells
(e.g. the brief event of llava.event_task) are outlined in magenta.

Rendered with Pillow only (a dependency of torchvision), so the picture needs no plotting library.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from llava.event_task import EventVideo, event_token_mask, read_manifest
from llava.kept_tokens import EncodedVideo, KeptTokens, encode_video, kept_tokens, tower_signals
from llava.model.compression import CompressionSpec
from llava.runtime import FrameSampling

CELL_MIN = 12  # pixels per token cell at least, so a 4x4 tiny grid is still readable
PANEL = 168  # target panel width in pixels
LABEL_W, BAR_H, LINE_H, GAP = 150, 10, 14, 6
DIM, TINT = 0.25, 0.55  # brightness of dropped tokens; weight of a group's colour
MARK = (255, 0, 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def group_colour(k: int) -> np.ndarray:
    """A distinct, saturated RGB colour for merged group ``k`` (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 1.0)
    return np.array([r, g, b]) * 255.0


def _panel(picture: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """The frame resized so that every token cell is a whole number of pixels: (image, cell h, cell w)."""
    h, w = grid
    height, width = picture.shape[:2]
    cell_w = max(CELL_MIN, round(PANEL / w))
    cell_h = max(CELL_MIN, round(cell_w * (height / h) / (width / w)))
    image = Image.fromarray(picture).resize((cell_w * w, cell_h * h), Image.BILINEAR)
    return np.asarray(image, dtype=np.float64), cell_h, cell_w


def _shade(frame: np.ndarray, kept: np.ndarray, group: np.ndarray, merged: np.ndarray, cell: tuple[int, int]):
    """Dim dropped cells and tint merged groups: per-cell factors expanded to pixels (vectorised)."""
    cell_h, cell_w = cell
    up = lambda a: np.repeat(np.repeat(a, cell_h, axis=0), cell_w, axis=1)  # noqa: E731
    in_merge = (group >= 0) & merged[np.clip(group, 0, None)] if merged.size else np.zeros_like(kept)
    colours = np.stack([group_colour(int(k)) for k in range(max(int(merged.size), 1))])
    tint = colours[np.clip(group, 0, None)]  # (h, w, 3)
    brightness = np.where(kept | in_merge, 1.0, DIM)[..., None]
    weight = np.where(in_merge, TINT, 0.0)[..., None]
    shaded = frame * up(brightness) * (1 - up(weight)) + up(tint) * up(weight)
    return shaded.clip(0, 255).astype(np.uint8)


def _outline(draw: ImageDraw.ImageDraw, x: int, y: int, cells: np.ndarray, cell: tuple[int, int], colour, width: int):
    for i, j in zip(*np.nonzero(cells), strict=True):
        x0, y0 = x + j * cell[1], y + i * cell[0]
        draw.rectangle([x0, y0, x0 + cell[1] - 1, y0 + cell[0] - 1], outline=colour, width=width)


def render_rows(
    encoded: EncodedVideo,
    rows: Sequence[KeptTokens],
    out: str | Path,
    *,
    title: str = "",
    marked: np.ndarray | None = None,
) -> Path:
    """Draw one row per selection in ``rows`` and save a PNG at ``out``; ``marked`` (F, h, w) bool cells
    are outlined (ground truth). Returns the path."""
    frames, h, w = encoded.tokens.grid
    sample, cell_h, cell_w = _panel(encoded.pictures[0], (h, w))
    panel_h, panel_w = sample.shape[:2]
    full_h, error_h = panel_h + 3 + BAR_H + 2 * LINE_H + 2 * GAP, 3 * LINE_H + 2 * GAP
    heights = [error_h if row.error or row.unavailable else full_h for row in rows]
    title_h = 24 if title else 0
    width = LABEL_W + frames * (panel_w + GAP) + GAP
    canvas = Image.new("RGB", (width, title_h + sum(heights) + GAP), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(13), _font(10)
    if title:
        draw.text((GAP, 5), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        top = title_h + sum(heights[:r]) + GAP
        name = row.method if row.method == "none" else f"{row.method}\nR = {row.retention:g}"
        draw.multiline_text((GAP, top + 4), name, fill=(0, 0, 0), font=font)
        if row.error or row.unavailable:
            text, colour = (f"cannot run: {row.error}", (170, 0, 0)) if row.error else (row.unavailable, (90, 90, 90))
            draw.multiline_text((LABEL_W, top + 4), _wrap(text, 150), fill=colour, font=small)
            continue
        per_frame = row.per_frame
        for f in range(frames):
            x = LABEL_W + f * (panel_w + GAP)
            picture, _, _ = _panel(encoded.pictures[f], (h, w))
            shaded = _shade(picture, row.kept[f], row.group[f], row.merged, (cell_h, cell_w))
            canvas.paste(Image.fromarray(shaded), (x, top))
            sources = row.kept[f] & row.merged[np.clip(row.group[f], 0, None)] if row.merged.size else None
            if sources is not None:
                _outline(draw, x, top, sources, (cell_h, cell_w), (255, 255, 255), 2)
            if marked is not None:
                _outline(draw, x, top, marked[f], (cell_h, cell_w), MARK, 2)
            bar_y = top + panel_h + 3
            share = per_frame[f] / float(h * w)
            draw.rectangle([x, bar_y, x + panel_w - 1, bar_y + BAR_H], outline=(120, 120, 120))
            draw.rectangle([x, bar_y, x + round(share * (panel_w - 1)), bar_y + BAR_H], fill=(40, 110, 200))
            frames_text = "-".join(str(i) for i in dict.fromkeys(encoded.frame_groups[f]))
            label = f"{per_frame[f]}/{h * w} kept, frame {frames_text}"
            draw.text((x, bar_y + BAR_H + 2), label, fill=(60, 60, 60), font=small)
        merged = int(row.merged.sum())
        kept = f"kept {int(row.kept.sum())} of {row.kept.size} tokens"
        caption = f"{kept}: achieved retention {row.achieved_retention:.3f}"
        if merged:
            caption += f"; {merged} merged tokens (tinted groups, source outlined)"
        if row.note:
            caption += f"; {row.note}"
        draw.text((LABEL_W, top + panel_h + 3 + BAR_H + LINE_H + 4), caption, fill=(0, 0, 0), font=font)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def visualize(
    model: object,
    video: str | Path,
    specs: Sequence[CompressionSpec],
    out: str | Path,
    sampling: FrameSampling,
) -> tuple[Path, list[KeptTokens]]:
    """Encode ``video`` once (with every signal the methods need and the model supplies), select with each
    spec, draw the rows; event videos (a manifest beside them) get their event cells outlined."""
    if not specs:
        raise ValueError("visualize needs at least one compressor")
    supplied = set(model.supplied_signals)
    signals = set().union(*(tower_signals(spec) for spec in specs)) & supplied
    encoded = encode_video(model, video, sampling, signals)
    rows = [kept_tokens(model, encoded, spec) for spec in specs]
    marked, note = None, ""
    truth = event_of(video)
    if truth is not None:
        marked = event_token_mask(truth, encoded.frame_groups, encoded.tokens.grid[1:])
        note = f"; event ({truth.colour}, frames {truth.start}-{truth.start + truth.length - 1}) outlined in magenta"
    frames, h, w = encoded.tokens.grid
    title = f"{Path(str(video)).name} on {encoded.family}: {frames} x {h}x{w} tokens{note}"
    return render_rows(encoded, rows, out, title=title, marked=marked), rows


def event_of(video: str | Path) -> EventVideo | None:
    """The ground truth of ``video`` when its folder is a brief-event task folder, else None."""
    path = Path(video)
    try:
        entries = read_manifest(path.parent)
    except (FileNotFoundError, ValueError):
        return None
    return next((e for e in entries if e.path == path.name), None)
