"""PDrop / PyramidDrop (CVPR'25; Cooperx521/PyramidDrop): drop video tokens in stages inside the LLM.

Reference algorithm (../shared/spec/baselines.md section 6, ``pdrop_rank_drop``): at each stage boundary b
the hidden states leaving layer b-1 go through layer b's input norm, q / k projections and RoPE; the
LAST prompt token's attention over all current tokens (head mean) ranks the video tokens, and the top
int(N * rho_s) stay (N = the video tokens at the LM input), in their order. Upstream compacts positions
to 0..n-1 after each drop and decodes each stage from its own length (``positions=compact``, the
default on 1-D positions); on M-RoPE models compaction has no meaning and kept tokens keep their
(t, h, w) (``auto`` = inherit there).

Schedule (ours, labelled: the authors' schedule for the paper's 25% / 15% rows is unpublished, and
upstream's boundaries at L/4, L/2, 3L/4 cannot reach R <= 0.25): boundaries before layers 2, 6, 15 and
rho = c * (1, 1/2, 1/4), c solved so that the video tokens entering each layer, averaged over layers,
equal R. ``layers`` / ``ratios`` set the schedule directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava.model.inllm_select import ATTENTION_MODES, POSITION_RULES, cap_counts, top_visual
from llava.model.method_api import (
    LLM_ATTENTION_ROWS,
    Boundary,
    InLLMPlan,
    LayerAction,
    LayerState,
    Method,
    Stage,
    check_choice,
)


@dataclass(frozen=True)
class PDropOptions:
    """layers: stage boundaries (a drop before each). shape: rho per boundary up to the scale c solved
    from R (None: halving, 1, 1/2, 1/4, ...). ratios: rho per boundary given outright (then R must be
    the layer average they imply).
    positions: auto (compact on 1-D positions, inherit on M-RoPE), compact or inherit.
    attention: rows (the one query row) or eager (the layer's whole map, for memory comparisons)."""

    layers: tuple[int, ...] = (2, 6, 15)
    shape: tuple[float, ...] | None = None
    ratios: tuple[float, ...] | None = None
    positions: str = "auto"
    attention: str = "rows"

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 1:
            raise ValueError(f"PDrop option layers must be distinct ascending layers >= 1, got {self.layers}")
        for name, values in (("shape", self.shape), ("ratios", self.ratios)):
            if values is None:
                continue
            if len(values) != len(self.layers):
                raise ValueError(f"PDrop option {name} needs one value per boundary ({len(self.layers)}), got {values}")
            if any(not 0 < v <= 1 for v in values) or list(values) != sorted(values, reverse=True):
                raise ValueError(f"PDrop option {name} must be non-increasing values in (0, 1], got {values}")
        check_choice("PDrop", "positions", self.positions, POSITION_RULES)
        check_choice("PDrop", "attention", self.attention, ATTENTION_MODES)


def layer_average(boundaries: tuple[int, ...], ratios: tuple[float, ...], layers: int) -> float:
    """Equivalent retention of a schedule: rho of the stage each layer is in, averaged over layers."""
    ends = (*boundaries[1:], layers)
    return (boundaries[0] + sum(r * (e - b) for r, b, e in zip(ratios, boundaries, ends, strict=True))) / layers


def solve_ratios(retention: float, boundaries: tuple[int, ...], shape: tuple[float, ...], layers: int) -> tuple:
    """rho = c * shape with the layer average equal to ``retention``; raises when no c in (0, 1/shape[0]] does."""
    full = boundaries[0] / layers
    unit = layer_average(boundaries, shape, layers) - full
    scale = (retention - full) / unit
    if scale <= 0 or scale * shape[0] > 1 + 1e-9:
        lo, hi = full, full + unit / shape[0]
        raise ValueError(
            f"PDrop with boundaries {boundaries} and shape {shape} on {layers} layers reaches retentions in "
            f"({lo:.4f}, {hi:.4f}]; got {retention:g}"
        )
    return tuple(scale * s for s in shape)


class PDropPlan(InLLMPlan):
    def __init__(self, boundaries: tuple[int, ...], ratios: tuple[float, ...], positions: str, full_map: bool) -> None:
        self.boundaries = tuple(Boundary(b, rows="last", source="probe") for b in boundaries)
        self.ratio_at = dict(zip(boundaries, ratios, strict=True))
        self.positions = positions
        self.full_map = full_map

    def act(self, boundary: Boundary, state: LayerState) -> LayerAction:
        rho = self.ratio_at[boundary.layer]
        counts = cap_counts([max(1, int(n * rho)) if n else 0 for n in state.visual_before], state.visual_now)
        return LayerAction(top_visual(state.scores, state.visual, counts), counts)


def plan(layers: int, retention: float, options: PDropOptions) -> PDropPlan:
    if options.layers[-1] >= layers:
        raise ValueError(f"PDrop option layers={options.layers}: the language model has layers 0..{layers - 1}")
    if options.ratios is None:
        shape = options.shape or tuple(0.5**i for i in range(len(options.layers)))
        ratios = solve_ratios(retention, options.layers, shape, layers)
    else:
        ratios = options.ratios
        implied = layer_average(options.layers, ratios, layers)
        if abs(implied - retention) > 0.005:
            raise ValueError(
                f"PDrop ratios {ratios} at layers {options.layers} average {implied:.4f} over {layers} layers, "
                f"but retention {retention:g} was asked: pass retention {implied:.4f}"
            )
    return PDropPlan(options.layers, ratios, options.positions, options.attention == "eager")


METHOD = Method(
    name="pdrop",
    label="PDrop",
    options=PDropOptions,
    stages=(Stage.IN_LLM,),
    signals=frozenset({LLM_ATTENTION_ROWS}),
    plan=plan,
    summary="in-LLM: staged drops (before layers 2/6/15, ours) ranked by the last prompt token's attention",
)
