"""Newline layouts: all-kept equals the uncompressed layout; compressed layouts per documented rule."""

from __future__ import annotations

import pytest
import torch

from llava.model.layout import (
    GRID_NEWLINES,
    block_keep_mask,
    block_sources,
    build_layout,
    full_length,
    layout_from_mask,
    pending_layout,
)

F, H, W = 3, 3, 4
NL = F * H * W  # the newline's source id


def uncompressed(newline_position: str) -> list[int]:
    out: list[int] = []
    for f in range(F):
        for r in range(H):
            out += [f * H * W + r * W + c for c in range(W)]
            if newline_position == "grid":
                out.append(NL)
        if newline_position == "frame":
            out.append(NL)
    return out + ([NL] if newline_position == "one_token" else [])


@pytest.mark.parametrize("newline_position", ["one_token", "grid", "frame", "no_token"])
@pytest.mark.parametrize("grid_newlines", GRID_NEWLINES)
def test_all_kept_is_the_uncompressed_layout(newline_position: str, grid_newlines: str) -> None:
    layout = build_layout(torch.arange(NL), F, H, W, newline_position, grid_newlines)
    expected = uncompressed(newline_position)
    assert layout.source.tolist() == expected
    assert layout.full_length == len(expected) == full_length(F, H, W, newline_position)
    assert layout.original_offsets.tolist() == list(range(len(expected)))


KEPT = torch.tensor([1, 2, 9, 14, 30, 35])  # frame 0 rows 0 and 2; frame 1 row 0; frame 2 rows 1 and 2


def test_grid_frame_newlines() -> None:
    layout = build_layout(KEPT, F, H, W, "grid", "frame")
    assert layout.source.tolist() == [1, 2, 9, NL, 14, NL, 30, 35, NL]
    # newline offsets: the last row's newline of each frame in the uncompressed grid layout
    assert layout.original_offsets[layout.source == NL].tolist() == [14, 29, 44]
    assert layout.stats()["achieved_retention_with_newlines"] == pytest.approx(9 / 45)
    assert layout.stats()["achieved_retention_without_newlines"] == pytest.approx(6 / 36)


def test_grid_row_newlines() -> None:
    layout = build_layout(KEPT, F, H, W, "grid", "rows")
    assert layout.source.tolist() == [1, 2, NL, 9, NL, 14, NL, 30, NL, 35, NL]
    assert layout.original_offsets.tolist() == [1, 2, 4, 11, 14, 17, 19, 37, 39, 43, 44]


def test_grid_all_row_newlines_regrouped_after_the_frame() -> None:
    layout = build_layout(KEPT, F, H, W, "grid", "all_rows")
    assert layout.source.tolist() == [1, 2, 9, NL, NL, NL, 14, NL, NL, NL, 30, 35, NL, NL, NL]


def test_one_token_keeps_one_newline() -> None:
    layout = build_layout(KEPT, F, H, W, "one_token")
    assert layout.source.tolist() == KEPT.tolist() + [NL]
    assert layout.original_offsets.tolist() == KEPT.tolist() + [NL]


def test_bad_choice_raises() -> None:
    with pytest.raises(ValueError, match="grid_newlines"):
        build_layout(KEPT, F, H, W, "grid", "some")


def _layouts_agree(mask: torch.Tensor, newline_position: str, grid_newlines: str) -> None:
    kept = mask.reshape(-1).nonzero().squeeze(1)
    expected = build_layout(kept, F, H, W, newline_position, grid_newlines)
    block = block_keep_mask(mask, H, W, newline_position, grid_newlines)
    table = torch.arange(NL + 1.0)[:, None] * torch.tensor([1.0, -1.0])
    got, rows = layout_from_mask(block, F, H, W, newline_position, table)
    assert torch.equal(rows, table[expected.source])
    assert got.source.tolist() == expected.source.tolist()
    assert got.original_offsets.tolist() == expected.original_offsets.tolist()
    assert (got.full_length, got.total_tokens, got.kept_tokens) == (
        expected.full_length, expected.total_tokens, expected.kept_tokens
    )


MASK_CHOICES = [("one_token", "frame"), ("no_token", "frame"), ("frame", "frame"), ("grid", "frame"), ("grid", "rows")]


@pytest.mark.parametrize(("newline_position", "grid_newlines"), MASK_CHOICES)
def test_layout_from_mask_equals_build_layout(newline_position: str, grid_newlines: str) -> None:
    """The sync-free construction keeps the same entries in the same order as the sort-based one,
    for random masks (some frames and rows empty), the all-kept mask and a single kept token."""
    generator = torch.Generator().manual_seed(0)
    masks = [torch.rand(F, H * W, generator=generator) < p for p in (0.1, 0.3, 0.6, 0.9) for _ in range(5)]
    masks.append(torch.ones(F, H * W, dtype=torch.bool))
    one = torch.zeros(F, H * W, dtype=torch.bool)
    one[1, 5] = True
    masks.append(one)
    for mask in masks:
        _layouts_agree(mask, newline_position, grid_newlines)


@pytest.mark.parametrize(("newline_position", "grid_newlines"), MASK_CHOICES)
@pytest.mark.parametrize("padding", [0, 3])
def test_compact_merged_rows_give_the_full_blocks(newline_position: str, grid_newlines: str, padding: int) -> None:
    """A merging method's compact rows ``[values; newline]`` indexed through its rank give the same block as
    the full table with the values at their sources, from a layout sized to M plus the newline slots."""
    from llava.model.compression import SelectedVideo, splice

    generator = torch.Generator().manual_seed(1)
    features, newline = torch.randn(F, H * W, 2, generator=generator), torch.tensor([[7.0, -7.0]])
    for p in (0.1, 0.5, 1.0):
        mask = torch.rand(F, H * W, generator=generator) < p
        mask[1, 5] = True
        kept = mask.reshape(-1).nonzero().squeeze(1)
        padded = torch.cat([kept, torch.full((padding,), NL)])
        new = torch.randn(len(padded), 2, generator=generator)
        got_mask, sources, values, rank = splice(features, padded, new, torch.tensor(len(kept)))
        assert torch.equal(got_mask, mask) and torch.equal(values[rank[kept]], new[: len(kept)])
        table = SelectedVideo(got_mask, values, sources, rank, features).table
        block = block_keep_mask(mask, H, W, newline_position, grid_newlines)
        expected, expected_rows = layout_from_mask(block, F, H, W, newline_position, torch.cat([table, newline]))
        pending = pending_layout(block, F, H, W, newline_position, torch.cat([values, newline]), rank)
        assert pending.sources.shape[0] == min(block.numel(), len(padded) + block.numel() - NL)
        got, rows = pending.finish(int(pending.count))
        assert torch.equal(rows, expected_rows)
        assert got.source.tolist() == expected.source.tolist()
        assert got.original_offsets.tolist() == expected.original_offsets.tolist()
    with pytest.raises(ValueError, match="more than the"):
        pending.finish(pending.sources.shape[0] + 1)


def test_block_mask_of_a_refused_selection_is_empty_and_all_rows_falls_back() -> None:
    nothing = torch.zeros(F, H * W, dtype=torch.bool)
    for newline_position, grid_newlines in MASK_CHOICES:
        block = block_keep_mask(nothing, H, W, newline_position, grid_newlines)
        assert not block.any() and layout_from_mask(block, F, H, W, newline_position)[0].length == 0
    assert block_keep_mask(nothing, H, W, "grid", "all_rows") is None
    assert block_sources(F, H, W, "grid", torch.device("cpu")).tolist() == uncompressed("grid")
    assert block_sources(F, H, W, "frame", torch.device("cpu")).tolist() == uncompressed("frame")
