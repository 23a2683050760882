"""Running per-channel statistics of decoder-linear inputs, per modality (never stored activations).

:class:`RunningInputStats` is an observer for the layer walker: one per decoder layer, it keeps a
:class:`ChannelStats` per (input group, modality), with "all" covering every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STAT_KINDS = ("absmax", "mean_abs", "cov")


@dataclass
class ChannelStats:
    """Running statistics of the rows x [N, D] seen so far."""

    dim: int
    with_cov: bool = False
    absmax: torch.Tensor = None  # [D] max |x|
    abs_sum: torch.Tensor = None  # [D] sum |x| (float64)
    min: torch.Tensor = None  # [D] min x
    max: torch.Tensor = None  # [D] max x
    cov: torch.Tensor | None = None  # [D, D] sum x^T x (float64), unnormalised
    count: int = 0
    cov_device: str | torch.device = "cpu"

    def __post_init__(self):
        if self.absmax is None:
            self.absmax = torch.zeros(self.dim)
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(self.dim, dtype=torch.float64)
        if self.min is None:
            self.min = torch.full((self.dim,), float("inf"))
        if self.max is None:
            self.max = torch.full((self.dim,), float("-inf"))
        if self.with_cov and self.cov is None:
            self.cov = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.cov_device)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.dim)
        if x.shape[0] == 0:
            return
        xa = x.detach().abs()
        self.absmax = torch.maximum(self.absmax, xa.amax(0).float().cpu())
        self.abs_sum += xa.sum(0, dtype=torch.float64).cpu()
        self.min = torch.minimum(self.min, x.detach().amin(0).float().cpu())
        self.max = torch.maximum(self.max, x.detach().amax(0).float().cpu())
        if self.cov is not None:
            xd = x.detach().to(self.cov.device, torch.float64)
            self.cov += xd.T @ xd
        self.count += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    @property
    def range(self) -> torch.Tensor:
        """max - min per channel (0 where no row was seen)."""
        return (self.max - self.min).clamp(min=0) if self.count else torch.zeros(self.dim)

    def to_dict(self) -> dict:
        return {"absmax": self.absmax, "abs_sum": self.abs_sum, "min": self.min, "max": self.max,
                "cov": None if self.cov is None else self.cov.cpu(), "count": self.count}

    @classmethod
    def from_dict(cls, d: dict) -> "ChannelStats":
        return cls(dim=d["absmax"].numel(), with_cov=d["cov"] is not None, absmax=d["absmax"],
                   abs_sum=d["abs_sum"], min=d["min"], max=d["max"], cov=d["cov"], count=d["count"])


# stats[layer_idx][input_group][modality] -> ChannelStats; modality "all" covers every token.
LayerStats = dict[str, dict[str, ChannelStats]]


class RunningInputStats:
    """Walker observer: ChannelStats per input group and modality ("all" + ``modalities``) of one layer.

    ``cov``: {group: modalities whose Gram matrix Σxᵀx is kept (float64, on ``cov_device``)}.
    """

    def __init__(self, dims: dict[str, int], modalities: tuple[str, ...], cov: dict[str, tuple[str, ...]] | None = None,
                 cov_device="cpu"):
        cov = cov or {}
        self.modalities = tuple(modalities)
        self.stats: LayerStats = {
            group: {m: ChannelStats(d, m in cov.get(group, ()), cov_device=cov_device) for m in ("all",) + self.modalities}
            for group, d in dims.items()}

    @classmethod
    def for_layer(cls, adapter, layer, modalities, cov=None, cov_device="cpu") -> "RunningInputStats":
        dims = {g: lin.in_features for g, lin in adapter.input_group_linears(layer).items()}
        return cls(dims, modalities, cov, cov_device)

    def observe(self, group: str, x: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
        per_m = self.stats[group]
        per_m["all"].update(x)
        for m in self.modalities:
            mask = masks.get(m)
            if mask is not None:
                per_m[m].update(x[mask])


class ModalityGram:
    """Walker observer: raw Gram matrices C = Σ xᵀx (float64, on ``device``) per (input group, modality)
    of one layer, for the groups and modalities asked for (CMC's whitening)."""

    def __init__(self, dims: dict[str, int], modalities: tuple[str, ...], device="cpu"):
        self.gram = {g: {m: torch.zeros(d, d, dtype=torch.float64, device=device) for m in modalities}
                     for g, d in dims.items()}

    def observe(self, group: str, x: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
        for m, C in self.gram.get(group, {}).items():
            mask = masks.get(m)
            if mask is None:
                continue
            xm = x[mask].to(C.device, torch.float64)
            if xm.shape[0]:
                C += xm.T @ xm


def stats_to_state(stats: list[LayerStats]) -> list:
    return [{g: {m: s.to_dict() for m, s in per_m.items()} for g, per_m in layer.items()} for layer in stats]


def stats_from_state(state: list) -> list[LayerStats]:
    return [{g: {m: ChannelStats.from_dict(d) for m, d in per_m.items()} for g, per_m in layer.items()} for layer in state]
