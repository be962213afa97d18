"""Plot time to first token and peak memory against retention, one line per model and compressor."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


def plot_efficiency(
    csv_path: Path, png_path: Path, *, frames: int | None = None, batch: int = 1, max_columns: int = 4
) -> Path:
    """Rows of ``vidcom2 bench`` at one frame count (default: the most common) and batch size -> PNG.

    A panel per model variant; when a CSV gathers several measurements (``date``, ``commit``, ``setup``
    columns), each panel shows one of them, so no line mixes measurements of different invocations."""
    import matplotlib

    csv_path, png_path = Path(csv_path), Path(png_path)
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
    for r in rows:  # a compressor run with options (e.g. execution=compiled_graph) is its own line
        r["compressor"] += f"[{r['compressor_options']}]" if r.get("compressor_options") else ""
        r["model"] = _variant(r)
    rows = _one_run_per_model(rows)
    models = sorted({r["model"] for r in rows})
    columns = min(len(models), max_columns)
    grid_rows = -(-len(models) // columns)
    fig, grid = plt.subplots(2 * grid_rows, columns, figsize=(4.2 * columns, 6.5 * grid_rows), squeeze=False)
    for index, model in enumerate(models):
        block, col = divmod(index, columns)
        axes = grid[2 * block : 2 * block + 2]
        mine = [r for r in rows if r["model"] == model]
        none = [r for r in mine if r["compressor"] == "none"]
        for compressor in sorted({r["compressor"] for r in mine} - {"none"}):
            pts = sorted(
                ((float(r["retention"]), r) for r in mine if r["compressor"] == compressor), key=lambda p: p[0]
            )
            pts = pts + [(1.0, none[0])] if none else pts  # ascending R, uncompressed last
            xs = [p[0] for p in pts]
            axes[0, col].plot(xs, [float(p[1]["ttft_ms"]) for p in pts], "o-", label=compressor)
            axes[1, col].plot(xs, [float(p[1]["peak_allocated_mib"]) / 1024 for p in pts], "o-", label=compressor)
            if compressor == "vidcom2":
                ideal = [(x, float(row["ideal_ttft_ms"])) for x, row in pts]
                axes[0, col].plot([i[0] for i in ideal], [i[1] for i in ideal], "k--", label="ideal")
        axes[0, col].set_title(f"{model}, {frames} frames", fontsize=9)
        axes[0, col].set_ylabel("time to first token (ms)")
        axes[1, col].set_ylabel("peak allocated (GiB)")
        for ax in axes[:, col]:
            ax.set_xlabel("retention R")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    for index in range(len(models), grid_rows * columns):  # empty cells of the last grid row
        block, col = divmod(index, columns)
        grid[2 * block, col].axis("off")
        grid[2 * block + 1, col].axis("off")
    gpu = rows[0].get("gpu", "")
    fig.suptitle(f"VidCom2 efficiency, random-weight full-size models, {gpu}, batch {batch}")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def _variant(row: dict[str, str]) -> str:
    """The model name plus what set its run apart from the defaults: each variant is its own panel."""
    extra = []
    if row.get("attn_implementation", "sdpa") != "sdpa":
        extra.append(row["attn_implementation"])
    if row["model"].startswith("qwen") and row.get("preprocess_device", "cpu").startswith("cuda"):
        extra.append("GPU processor")
    if row.get("cuda_alloc_conf"):
        extra.append(row["cuda_alloc_conf"])
    if row.get("decode_mode", "eager") != "eager":
        extra.append(f"decode {row['decode_mode']}")
    return row["model"] + (f" ({', '.join(extra)})" if extra else "")


def _run_key(row: dict[str, str]) -> tuple[str, str, str]:
    """Which measurement a row belongs to: (date, commit, setup) of the bench invocation."""
    return row.get("date", ""), row.get("commit", ""), row.get("setup", "")


def _one_run_per_model(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Per model variant, the rows of one measurement (same date, commit and setup): the latest holding a
    retention sweep (an uncompressed row and >= 3 retentions of one compressor), else the latest ("latest"
    by date, then by position in the file: rows are appended in the order they were measured)."""
    by_run: dict[tuple[str, tuple[str, str, str]], list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_run[(r["model"], _run_key(r))].append(i)
    chosen: dict[str, tuple[bool, str, int, tuple[str, str, str]]] = {}
    for (model, key), members in by_run.items():
        per_compressor: dict[str, int] = defaultdict(int)
        for i in members:
            per_compressor[rows[i]["compressor"]] += 1
        sweep = "none" in per_compressor and max(per_compressor.values()) >= 3
        rank = (sweep, key[0], max(members), key)
        chosen[model] = max(chosen.get(model, rank), rank)
    return [r for r in rows if _run_key(r) == chosen[r["model"]][3]]
