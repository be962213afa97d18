"""The compressor registry every model calls: name -> compressor with one signature.

A compressor maps one video's tokens ``features`` (F, P, D), a retention R in (0, 1] and a dict of
options to the kept flat indices into F*P (int64, sorted ascending). Model adapters only say where
their video tokens are and call :func:`compress_video`; they never name a method. New baselines
register with :func:`register_compressor` and slot in without touching any caller.

A compressor may also register a mask form (``mask=``): the same selection for a batch of same-shape
videos, as (B, F, P) boolean masks computed without a host synchronisation, each video on its own
budget. It lets an adapter select all of a request's videos in one go and fold the one unavoidable
sync (the kept counts) into its own layout work. Without one, :meth:`CompressionSpec.keep_masks`
builds each mask from the indices on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from llava.model import baselines
from llava.model.vidcom2 import (
    NON_FINITE_MESSAGE,
    VidCom2Config,
    check_retention,
    vidcom2_keep_indices,
    vidcom2_keep_masks,
)


class Compressor(Protocol):
    def __call__(self, features: torch.Tensor, retention: float, options: dict[str, Any]) -> torch.Tensor:
        """(F, P, D), R, options -> kept flat indices (K,) int64, ascending."""


class MaskCompressor(Protocol):
    def __call__(self, videos: Sequence[torch.Tensor], retention: float, options: dict[str, Any]) -> torch.Tensor:
        """B same-shape videos (F, P, D), R, options -> keep masks (B, F, P) bool, no host sync; a video's
        all-False mask = invalid input."""


_REGISTRY: dict[str, Compressor] = {}
_MASKS: dict[str, MaskCompressor] = {}


def register_compressor(name: str, *, mask: MaskCompressor | None = None) -> Callable[[Compressor], Compressor]:
    """Decorator: make ``fn`` available under ``name`` (unique); ``mask`` is its optional mask form."""

    def wrap(fn: Compressor) -> Compressor:
        if name in _REGISTRY:
            raise ValueError(f"compressor {name!r} is already registered")
        _REGISTRY[name] = fn
        if mask is not None:
            _MASKS[name] = mask
        return fn

    return wrap


def available_compressors() -> list[str]:
    return sorted(_REGISTRY)


def get_compressor(name: str) -> Compressor:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; valid names: {', '.join(available_compressors())}") from None


@dataclass(frozen=True)
class CompressionSpec:
    """What to do to each video of a request: compressor name, retention R and its options.

    ``none`` (the default) keeps every token. Options are compressor specific (for vidcom2 the
    fields of VidCom2Config; for random a seed).
    """

    compressor: str = "none"
    retention: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_compressor(self.compressor)  # fail early on a bad name
        check_retention(self.retention)
        if self.compressor == "vidcom2":
            VidCom2Config.from_options(self.options)  # fail early on a bad option

    @property
    def is_identity(self) -> bool:
        """True when every token is kept, whatever the video."""
        return self.compressor == "none" or float(self.retention) >= 1.0

    def keep_indices(self, features: torch.Tensor) -> torch.Tensor:
        """(F, P, D) of one video -> kept flat indices (K,) int64 ascending."""
        return get_compressor(self.compressor)(features, float(self.retention), dict(self.options))

    def keep_mask(self, features: torch.Tensor) -> torch.Tensor:
        """(F, P, D) of one video -> keep mask (F, P) bool, without a host synchronisation.

        An all-False mask means the compressor refused the input (VidCom2: non-finite features).
        """
        return self.keep_masks([features])[0]

    def keep_masks(self, videos: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each video's (F, P) keep mask, in order, without a host synchronisation.

        Videos of one shape, dtype and device go to the compressor's mask form together (one launch
        sequence, one graph replay on CUDA, for the whole group); each keeps its own budget.
        """
        for i, video in enumerate(videos):
            if not isinstance(video, torch.Tensor) or video.dim() != 3:
                got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
                raise ValueError(f"video {i}: features must be a (F, P, D) tensor of one video, got {got}")
        mask_fn = _MASKS.get(self.compressor)
        if mask_fn is None:
            return [self._mask_from_indices(video) for video in videos]
        groups: dict[tuple, list[int]] = {}
        for i, video in enumerate(videos):
            groups.setdefault((tuple(video.shape), video.dtype, video.device), []).append(i)
        masks: list[torch.Tensor] = [torch.empty(0)] * len(videos)
        for members in groups.values():
            selected = mask_fn([videos[i] for i in members], float(self.retention), dict(self.options))
            for i, mask in zip(members, selected, strict=True):
                masks[i] = mask
        return masks

    def _mask_from_indices(self, features: torch.Tensor) -> torch.Tensor:
        """The index-only compressors' mask, built on the device from their indices (checked: a broken
        plug-in must fail loudly, never run uncompressed or empty)."""
        n_frames, per_frame = features.shape[0], features.shape[1]
        indices = self.keep_indices(features)
        valid = isinstance(indices, torch.Tensor) and indices.dim() == 1 and indices.dtype == torch.int64
        if not valid or not len(indices):
            tensor = isinstance(indices, torch.Tensor)
            got = f"{tuple(indices.shape)} {indices.dtype}" if tensor else type(indices).__name__
            raise ValueError(
                f"compressor {self.compressor!r} returned {got}; expected a non-empty (K,) int64 tensor of flat indices"
            )
        mask = torch.zeros(n_frames * per_frame, dtype=torch.bool, device=features.device)
        return mask.index_fill_(0, indices.to(features.device), True).view(n_frames, per_frame)

    def check_kept(self, kept: Sequence[int]) -> None:
        """Raise for the first video of a request that kept nothing (``kept``: counts per video, read in
        the caller's one sync). Every compressor keeps at least one token per frame, so an empty
        selection means the compressor refused the input (VidCom2: non-finite features)."""
        for i, count in enumerate(kept):
            if count == 0:
                which = f"video {i} of {len(kept)}: " if len(kept) > 1 else ""
                raise ValueError(f"{which}{self.describe()} kept no video token: {NON_FINITE_MESSAGE}")

    def describe(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.compressor}@{self.retention:g}" + (f"[{opts}]" if opts else "")


def compress_video(features: torch.Tensor, spec: CompressionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, P, D) -> (kept tokens (K, D) in original order, kept flat indices (K,))."""
    indices = spec.keep_indices(features)
    return features.reshape(-1, features.shape[-1]).index_select(0, indices), indices


def _vidcom2_masks(videos: Sequence[torch.Tensor], retention: float, options: dict[str, Any]) -> torch.Tensor:
    return vidcom2_keep_masks(videos, retention, VidCom2Config.from_options(options))


@register_compressor("vidcom2", mask=_vidcom2_masks)
def _vidcom2(features: torch.Tensor, retention: float, options: dict[str, Any]) -> torch.Tensor:
    return vidcom2_keep_indices(features, retention, VidCom2Config.from_options(options))


register_compressor("none")(baselines.keep_all_indices)
register_compressor("random")(baselines.random_keep_indices)
register_compressor("uniform")(baselines.uniform_keep_indices)
