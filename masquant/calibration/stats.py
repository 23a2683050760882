"""Running statistics of the inputs of a block's linears, per input group and modality (never stored activations).

Both kinds are observers for the walker (:mod:`masquant.engine.walker`), one per block:

- :class:`RunningInputStats`: per-channel abs-max, mean |x|, min and max (:class:`ChannelStats`) per (input group,
  modality), with "all" covering every token;
- :class:`GramObserver`: Gram matrices C = Σ xᵀx (:class:`Gram`, float64, accumulated in place) per (input group,
  modality) for the groups and modalities asked for: GPTQ's Hessians (2/N C), CMC's whitening, LaRoSA's rotations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STAT_KINDS = ("absmax", "mean_abs")
ALL = "all"  # the statistics of every row, whatever its modality


@dataclass
class ChannelStats:
    """Running statistics of the rows x [N, D] seen so far."""

    dim: int
    absmax: torch.Tensor = None  # [D] max |x|
    abs_sum: torch.Tensor = None  # [D] sum |x| (float64)
    min: torch.Tensor = None  # [D] min x
    max: torch.Tensor = None  # [D] max x
    count: int = 0

    def __post_init__(self):
        if self.absmax is None:
            self.absmax = torch.zeros(self.dim)
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(self.dim, dtype=torch.float64)
        if self.min is None:
            self.min = torch.full((self.dim,), float("inf"))
        if self.max is None:
            self.max = torch.full((self.dim,), float("-inf"))

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.dim)
        if x.shape[0] == 0:
            return
        xa = x.detach().abs()
        self.absmax = torch.maximum(self.absmax, xa.amax(0).float().cpu())
        self.abs_sum += xa.sum(0, dtype=torch.float64).cpu()
        self.min = torch.minimum(self.min, x.detach().amin(0).float().cpu())
        self.max = torch.maximum(self.max, x.detach().amax(0).float().cpu())
        self.count += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    @property
    def range(self) -> torch.Tensor:
        """max - min per channel (0 where no row was seen)."""
        return (self.max - self.min).clamp(min=0) if self.count else torch.zeros(self.dim)

    def to_dict(self) -> dict:
        return {"absmax": self.absmax, "abs_sum": self.abs_sum, "min": self.min, "max": self.max, "cov": None,
                "count": self.count}  # "cov": always None, kept so that earlier caches and this one read alike

    @classmethod
    def from_dict(cls, d: dict) -> "ChannelStats":
        return cls(dim=d["absmax"].numel(), absmax=d["absmax"], abs_sum=d["abs_sum"], min=d["min"], max=d["max"],
                   count=d["count"])


# stats[layer_idx][input_group][modality] -> ChannelStats; modality "all" covers every token.
LayerStats = dict[str, dict[str, ChannelStats]]


class RunningInputStats:
    """Walker observer: ChannelStats per input group and modality ("all" + ``modalities``) of one block."""

    def __init__(self, dims: dict[str, int], modalities: tuple[str, ...]):
        self.modalities = tuple(modalities)
        self.stats: LayerStats = {group: {m: ChannelStats(d) for m in (ALL,) + self.modalities}
                                  for group, d in dims.items()}

    @classmethod
    def for_block(cls, stack, block, modalities) -> "RunningInputStats":
        return cls({g: lin.in_features for g, lin in stack.input_group_linears(block).items()}, modalities)

    def observe(self, group: str, x: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
        per_m = self.stats[group]
        per_m[ALL].update(x)
        for m in self.modalities:
            mask = masks.get(m)
            if mask is not None:
                per_m[m].update(x[mask])


class Gram:
    """Running C = Σ xᵀx over the rows x [N, D] seen so far and their count N, in float64, accumulated in place
    (no D × D temporary: at D = 18944 a temporary would be another 2.9 GB)."""

    def __init__(self, dim: int, device=None):
        self.dim = dim
        self.device = device  # None: the device of the first rows
        self.count = 0
        self.gram: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """C += x2ᵀ x2, x2 = x [..., D] flattened to [rows, D]."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected inputs [..., {self.dim}], got {tuple(x.shape)}")
        x2 = x.detach().reshape(-1, self.dim)
        if self.gram is None:
            device = x2.device if self.device is None else self.device
            self.gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        if x2.shape[0]:
            x2 = x2.to(self.gram.device, torch.float64)
            self.gram.addmm_(x2.T, x2)
            self.count += x2.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ's layer Hessian H = 2/N Σ xᵀx [D, D] (float64). The official code divides by the number of
        sequences instead of rows: a constant factor that changes no GPTQ result (its dampening is relative)."""
        if self.gram is None or self.count == 0:
            raise ValueError("this Gram matrix has no inputs yet")
        return self.gram * (2.0 / self.count)


class GramObserver:
    """Walker observer: a :class:`Gram` per (input group, modality) of one block, for ``groups`` and
    ``modalities`` ("all" = every row, a modality = the rows of its mask; a row of no listed mask adds nothing)."""

    def __init__(self, dims: dict[str, int], modalities: tuple[str, ...] = (ALL,), device=None):
        self.modalities = tuple(modalities)
        self.grams = {g: {m: Gram(d, device) for m in self.modalities} for g, d in dims.items()}

    @classmethod
    def for_block(cls, stack, block, groups=None, modalities: tuple[str, ...] = (ALL,), device=None) -> "GramObserver":
        """Over the input groups ``groups`` (default: every group) of ``block`` in ``stack``."""
        dims = {g: lin.in_features for g, lin in stack.input_group_linears(block).items()
                if groups is None or g in groups}
        return cls(dims, modalities, device)

    def observe(self, group: str, x: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
        for m, acc in self.grams.get(group, {}).items():
            if m == ALL:
                acc.add(x)
            elif masks.get(m) is not None:
                acc.add(x[masks[m]])

    def gram(self, group: str, modality: str = ALL) -> torch.Tensor:
        """Σ xᵀx of ``group``'s rows of ``modality`` [D, D] (zeros when no row was seen)."""
        acc = self.grams[group][modality]
        if acc.gram is None:
            return torch.zeros(acc.dim, acc.dim, dtype=torch.float64,
                               device="cpu" if acc.device is None else acc.device)
        return acc.gram

    def hessian(self, group: str) -> torch.Tensor:
        """GPTQ's H = 2/N Σ xᵀx of ``group`` over every row."""
        return self.grams[group][ALL].hessian


def stats_to_state(stats: list[LayerStats]) -> list:
    return [{g: {m: s.to_dict() for m, s in per_m.items()} for g, per_m in layer.items()} for layer in stats]


def stats_from_state(state: list) -> list[LayerStats]:
    return [{g: {m: ChannelStats.from_dict(d) for m, d in per_m.items()} for g, per_m in layer.items()} for layer in state]
