"""FastV (ECCV'24; pkunlp-icler/FastV): drop video tokens inside the LLM by the last prompt token's attention.

Reference algorithm (../shared/spec/baselines.md section 5): after layer K-1 runs, take its attention
probabilities of the LAST prompt token over all keys (head mean), keep the top video tokens, drop the
rest for layers K..L-1; layers below K keep their full cache. Kept tokens keep their original positions
(``positions=inherit``, upstream's rule; decoding continues from the uncompressed length);
``positions=compact`` renumbers them.

R is the paper's "equivalent retention": video tokens entering each layer, averaged over all L layers.
With K layers at full size, the fraction kept from layer K on is r = (R L - K) / (L - K) (L = 28, K = 2:
R = 0.25 -> 0.1923); ``keep_ratio`` sets r directly instead. R <= K / L cannot be reached.

The attention row is computed from layer K-1's own query and keys while it runs on SDPA / flash
(llava.model.attention_rows); ``attention=eager`` materialises the layer's whole map first, as the
authors' code does, for memory comparisons.
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
    check_range,
)


@dataclass(frozen=True)
class FastVOptions:
    """layer: K, the first layer that sees the shorter sequence (scored by layer K-1's attention).
    keep_ratio: the fraction of video tokens kept from layer K on; None = solved from R.
    positions: inherit (original positions, upstream), compact, or auto (= inherit).
    attention: rows (one row from the layer's query and keys) or eager (the whole map, as upstream)."""

    layer: int = 2
    keep_ratio: float | None = None
    positions: str = "inherit"
    attention: str = "rows"

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise ValueError(f"FastV option layer must be >= 1 (layer 0 has no earlier attention), got {self.layer}")
        if self.keep_ratio is not None:
            check_range("FastV", "keep_ratio", self.keep_ratio, 0.0, 1.0, low_open=True)
        check_choice("FastV", "positions", self.positions, POSITION_RULES)
        check_choice("FastV", "attention", self.attention, ATTENTION_MODES)


def after_ratio(retention: float, layers: int, k: int) -> float:
    """The kept fraction from layer ``k`` on that makes the layer average ``retention``."""
    return (retention * layers - k) / (layers - k)


class FastVPlan(InLLMPlan):
    def __init__(self, layer: int, ratio: float, positions: str, full_map: bool) -> None:
        self.boundaries = (Boundary(layer, rows="last", source="previous"),)
        self.ratio = ratio
        self.positions = "inherit" if positions == "auto" else positions
        self.full_map = full_map

    def act(self, boundary: Boundary, state: LayerState) -> LayerAction:
        wanted = [max(1, round(self.ratio * n)) if n else 0 for n in state.visual_before]
        counts = cap_counts(wanted, state.visual_now)
        return LayerAction(top_visual(state.scores, state.visual, counts), counts)


def plan(layers: int, retention: float, options: FastVOptions) -> FastVPlan:
    k = options.layer
    if k >= layers:
        raise ValueError(f"FastV option layer={k}: the language model has {layers} layers (valid 1..{layers - 1})")
    ratio = options.keep_ratio
    if ratio is None:
        ratio = after_ratio(retention, layers, k)
        if ratio <= 0:
            raise ValueError(
                f"FastV cannot reach retention {retention:g} with layer={k} on {layers} layers: the first {k} layers "
                f"alone average {k / layers:.4f}; use a retention above that or a smaller layer"
            )
    return FastVPlan(k, min(ratio, 1.0), options.positions, options.attention == "eager")


METHOD = Method(
    name="fastv",
    label="FastV",
    options=FastVOptions,
    stages=(Stage.IN_LLM,),
    signals=frozenset({LLM_ATTENTION_ROWS}),
    plan=plan,
    summary="in-LLM: after layer K-1, keep the video tokens the last prompt token attends to most (R layer-averaged)",
)
