"""Plot time to first token and peak memory against retention, one line per model and compressor."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


def plot_efficiency(csv_path: Path, png_path: Path, *, frames: int | None = None, batch: int = 1) -> Path:
    """Rows of ``vidcom2 bench`` at one frame count (default: the most common) and batch size -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with Path(csv_path).open() as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["batch"]) == batch]
    if not rows:
        raise ValueError(f"{csv_path} has no rows with batch {batch}")
    if frames is None:
        counts: dict[int, int] = defaultdict(int)
        for r in rows:
            counts[int(r["frames"])] += 1
        frames = max(counts, key=counts.get)
    rows = [r for r in rows if int(r["frames"]) == frames]
    for r in rows:  # a compressor run with options (e.g. execution=compiled) is its own line
        r["compressor"] += f"[{r['compressor_options']}]" if r.get("compressor_options") else ""
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(2, len(models), figsize=(4 * len(models), 6.5), squeeze=False)
    for col, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        none = [r for r in mine if r["compressor"] == "none"]
        for compressor in sorted({r["compressor"] for r in mine} - {"none"}):
            pts = sorted(((float(r["retention"]), r) for r in mine if r["compressor"] == compressor),
                         key=lambda p: p[0])
            pts = pts + [(1.0, none[0])] if none else pts  # ascending R, uncompressed last
            xs = [p[0] for p in pts]
            axes[0, col].plot(xs, [float(p[1]["ttft_ms"]) for p in pts], "o-", label=compressor)
            axes[1, col].plot(xs, [float(p[1]["peak_allocated_mib"]) / 1024 for p in pts], "o-", label=compressor)
            if compressor == "vidcom2":
                ideal = [(x, float(row["ideal_ttft_ms"])) for x, row in pts]
                axes[0, col].plot([i[0] for i in ideal], [i[1] for i in ideal], "k--", label="ideal")
        axes[0, col].set_title(f"{model}, {frames} frames")
        axes[0, col].set_ylabel("time to first token (ms)")
        axes[1, col].set_ylabel("peak allocated (GiB)")
        for ax in axes[:, col]:
            ax.set_xlabel("retention R")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    gpu = rows[0].get("gpu", "")
    fig.suptitle(f"VidCom2 efficiency, random-weight full-size models, {gpu}, batch {batch}")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
