"""Running per-channel statistics at decoder-linear inputs, per modality (never stored activations)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from masquant.adapters.base import INPUT_GROUPS
from masquant.calibration.layerwise import LayerInputs, advance, run_layer

STAT_KINDS = ("absmax", "mean_abs", "cov")


@dataclass
class ChannelStats:
    """Running statistics of the rows x [N, D] seen so far."""

    dim: int
    with_cov: bool = False
    absmax: torch.Tensor = None  # [D] max |x|
    abs_sum: torch.Tensor = None  # [D] sum |x| (float64)
    cov: torch.Tensor | None = None  # [D, D] sum x^T x (float64), unnormalised
    count: int = 0

    def __post_init__(self):
        if self.absmax is None:
            self.absmax = torch.zeros(self.dim)
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(self.dim, dtype=torch.float64)
        if self.with_cov and self.cov is None:
            self.cov = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.dim)
        if x.shape[0] == 0:
            return
        xa = x.detach().abs()
        self.absmax = torch.maximum(self.absmax, xa.amax(0).float().cpu())
        self.abs_sum += xa.sum(0, dtype=torch.float64).cpu()
        if self.cov is not None:
            xd = x.detach().double()
            self.cov += (xd.T @ xd).cpu()
        self.count += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    def to_dict(self) -> dict:
        return {"absmax": self.absmax, "abs_sum": self.abs_sum, "cov": self.cov, "count": self.count}

    @classmethod
    def from_dict(cls, d: dict) -> "ChannelStats":
        return cls(dim=d["absmax"].numel(), with_cov=d["cov"] is not None, absmax=d["absmax"],
                   abs_sum=d["abs_sum"], cov=d["cov"], count=d["count"])


# stats[layer_idx][input_group][modality] -> ChannelStats; modality "all" covers every token.
LayerStats = dict[str, dict[str, ChannelStats]]


def _group_linears(adapter, layer: nn.Module) -> dict[str, nn.Module]:
    lin = adapter.linears(layer)
    return {group: lin[roles[0]] for group, roles in INPUT_GROUPS.items()}


@torch.no_grad()
def collect_layer_stats(layer: nn.Module, adapter, inputs: LayerInputs, device, modalities: tuple[str, ...],
                        with_cov: bool = False, cov_groups: tuple[str, ...] = tuple(INPUT_GROUPS)) -> LayerStats:
    """Statistics of one layer's linear inputs over all samples, split by modality."""
    stats: LayerStats = {}
    current: dict = {}
    handles = []
    for group, linear in _group_linears(adapter, layer).items():
        dim = linear.in_features
        stats[group] = {m: ChannelStats(dim, with_cov and group in cov_groups) for m in ("all",) + tuple(modalities)}

        def hook(module, args, group=group):
            x = args[0].reshape(-1, args[0].shape[-1])
            stats[group]["all"].update(x)
            for m in modalities:
                mask = current["masks"].get(m)
                if mask is not None:
                    stats[group][m].update(x[mask.reshape(-1).to(x.device)])

        handles.append(linear.register_forward_pre_hook(hook))
    try:
        for sample in inputs:
            current["masks"] = sample.masks
            run_layer(layer, sample, device)
    finally:
        for h in handles:
            h.remove()
    return stats


def collect_input_stats(adapter, inputs: LayerInputs, device, modalities: tuple[str, ...], with_cov: bool = False,
                        desc: str = "calibration statistics") -> list[LayerStats]:
    """Walk the FP decoder layer by layer and keep running input statistics of every linear group."""
    all_stats = []
    layers = adapter.decoder_layers()
    for layer in tqdm(layers, desc=desc, leave=False):
        all_stats.append(collect_layer_stats(layer, adapter, inputs, device, modalities, with_cov))
        inputs = advance(layer, inputs, device)
    return all_stats


def stats_to_state(stats: list[LayerStats]) -> list:
    return [{g: {m: s.to_dict() for m, s in per_m.items()} for g, per_m in layer.items()} for layer in stats]


def stats_from_state(state: list) -> list[LayerStats]:
    return [{g: {m: ChannelStats.from_dict(d) for m, d in per_m.items()} for g, per_m in layer.items()} for layer in state]
