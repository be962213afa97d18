"""Small synthetic test videos with known properties (``vidcom2 make-videos --out DIR``).

Each video is drawn with numpy (coloured shapes on a flat background), encoded to H.264 mp4 with
PyAV, and described in ``manifest.json``: frame count, fps, size, the first frame of every new scene
(``scene_cuts``), the half-open frame ranges where nothing moves (``static_ranges``). A frame folder
(PNG images, one per frame) covers the "folder of frames is a video" input. Everything is
deterministic for a given seed and takes well under a second to write.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"


@dataclass
class VideoSpec:
    """What a synthetic video is; ``scene_cuts`` are first frames of new scenes, ranges are [start, end)."""

    name: str
    width: int
    height: int
    fps: int
    num_frames: int
    scene_cuts: list[int] = field(default_factory=list)
    static_ranges: list[list[int]] = field(default_factory=list)
    description: str = ""
    path: str = ""

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


def _positions(spec: VideoSpec) -> np.ndarray:
    """(N,) motion parameter in [0, 1]: increases each frame, frozen inside static ranges."""
    moving = np.ones(spec.num_frames)
    for start, end in spec.static_ranges:
        moving[start:end] = 0.0
    moving[0] = 0.0
    t = np.cumsum(moving)
    return t / max(t[-1], 1.0)


def _render(spec: VideoSpec, rng: np.random.Generator) -> np.ndarray:
    """(N, H, W, 3) uint8: each scene has its own background and shapes; shapes move with _positions."""
    n, h, w = spec.num_frames, spec.height, spec.width
    scene = np.searchsorted(np.asarray(spec.scene_cuts, dtype=np.int64), np.arange(n), side="right")
    num_scenes = int(scene.max()) + 1
    backgrounds = rng.integers(0, 256, size=(num_scenes, 3))
    colours = rng.integers(0, 256, size=(num_scenes, 2, 3))
    t = _positions(spec)[:, None, None]  # (N, 1, 1)
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = yy[None].astype(np.float64), xx[None].astype(np.float64)
    side = max(h, w) // 5
    # square: slides left to right along the upper third
    sq_x = t * (w - side)
    square = (xx >= sq_x) & (xx < sq_x + side) & (yy >= h // 4 - side // 2) & (yy < h // 4 + side // 2)
    # disc: slides right to left along the lower third
    cx, cy = (w - side / 2) - t * (w - side), np.full_like(t, 3 * h / 4)
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= (side / 2) ** 2
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    frames[:] = backgrounds[scene][:, None, None, :]
    sq_col, disc_col = colours[scene, 0][:, None, None, :], colours[scene, 1][:, None, None, :]
    frames[:] = np.where(square[..., None], sq_col, frames)
    frames[:] = np.where(disc[..., None], disc_col, frames)
    return frames


def write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    """(N, H, W, 3) uint8 RGB -> H.264 mp4 (near-lossless); H and W must be even."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "4", "preset": "ultrafast"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def default_specs() -> list[VideoSpec]:
    return [
        VideoSpec("moving", 64, 64, 8, 24, description="two shapes moving the whole time"),
        VideoSpec("scene_cut", 96, 96, 10, 30, scene_cuts=[15], description="moving shapes, hard cut at frame 15"),
        VideoSpec("static", 64, 64, 8, 32, static_ranges=[[10, 24]], description="nothing moves in [10, 24)"),
        VideoSpec(
            "mixed",
            112,
            112,
            10,
            40,
            scene_cuts=[20],
            static_ranges=[[5, 15]],
            description="moving shapes, static stretch [5, 15), cut at frame 20",
        ),
    ]


def make_videos(out_dir: str | Path, seed: int = 0) -> dict:
    """Write the default videos, a frame folder and ``manifest.json`` into ``out_dir``; return the manifest."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for spec in default_specs():
        frames = _render(spec, rng)
        spec.path = f"{spec.name}.mp4"
        write_mp4(frames, out / spec.path, spec.fps)
        entries.append({**asdict(spec), "duration": spec.duration, "kind": "mp4"})
    folder = VideoSpec("frames", 64, 64, 1, 8, scene_cuts=[4], description="frame folder (PNG), cut at frame 4")
    folder.path = "frames"
    (out / folder.path).mkdir(exist_ok=True)
    for i, frame in enumerate(_render(folder, rng)):
        Image.fromarray(frame).save(out / folder.path / f"{i:05d}.png")
    entries.append({**asdict(folder), "duration": folder.duration, "kind": "frame_folder"})
    manifest = {"seed": seed, "videos": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
