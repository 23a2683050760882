"""The method plugin interface. Every method (ours and the baselines) has this shape.

- ``<Name>Config``: typed dataclass (registered in Hydra's ConfigStore by masquant.config).
- ``check(scheme, modalities)``: refuse what the method cannot do, before any expensive work.
- ``collect(ctx)``: calibration statistics (through ``ctx.input_stats``: cached by config hash).
- ``apply(ctx, stats)``: function-preserving transforms, then the shared quantize step; returns a
  report dict (extra parameters, ranks, timings) that is written with the results.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from masquant.calibration.cache import StatsCache
from masquant.calibration.layerwise import LayerInputs
from masquant.calibration.stats import LayerStats, collect_input_stats, stats_from_state, stats_to_state
from masquant.quant.linear import ModalityPath, ModalityRouter, QuantLinear
from masquant.quant.quantizer import quantize_weight
from masquant.quant.scheme import QuantScheme


class MethodConfigError(ValueError):
    """A method was asked for something it cannot do (raised before calibration)."""


@dataclass
class QuantContext:
    """Everything a method may use; methods never see file paths or model names."""

    model: nn.Module
    adapter: Any
    scheme: QuantScheme
    router: ModalityRouter
    device: torch.device
    modalities: tuple[str, ...]
    calib: LayerInputs | None = None  # decoder layer-0 inputs of the calibration samples
    cache: StatsCache = field(default_factory=lambda: StatsCache(None))
    cache_key: dict = field(default_factory=dict)  # identifies model + calibration set
    report: dict = field(default_factory=dict)

    def input_stats(self, with_cov: bool = False) -> list[LayerStats]:
        """Per-layer, per-input-group, per-modality running statistics of the FP model (cached)."""
        if self.calib is None:
            raise MethodConfigError("this method needs calibration data (calib.n_samples > 0)")
        key = {**self.cache_key, "kind": "input_stats", "modalities": list(self.modalities), "cov": with_cov}
        return self.cache.get_or_compute(
            key,
            lambda: collect_input_stats(self.adapter, self.calib, self.device, self.modalities, with_cov),
            to_state=stats_to_state,
            from_state=stats_from_state,
        )


class Method(ABC):
    id: ClassVar[str]
    needs_calibration: ClassVar[bool] = True

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

    def check(self, scheme: QuantScheme, modalities: tuple[str, ...]) -> None:
        """Raise MethodConfigError for an unsupported scheme/modality set. Default: accept all."""

    @abstractmethod
    def collect(self, ctx: QuantContext) -> Any:
        ...

    @abstractmethod
    def apply(self, ctx: QuantContext, stats: Any) -> dict:
        ...

    def run(self, ctx: QuantContext) -> dict:
        t0 = time.perf_counter()
        stats = self.collect(ctx)
        t1 = time.perf_counter()
        report = self.apply(ctx, stats) or {}
        t2 = time.perf_counter()
        report.update({"time/collect_s": t1 - t0, "time/apply_s": t2 - t1})
        return report


def quantize_decoder_linears_(
    ctx: QuantContext,
    paths_for=None,
    shared_weight_for=None,
    desc: str = "quantize",
) -> int:
    """The shared quantize step: replace every decoder linear by a QuantLinear.

    ``shared_weight_for(layer_idx, role, linear) -> W`` gives the FP weight to quantize (default: the
    linear's weight); ``paths_for(layer_idx, role, linear) -> {modality: ModalityPath}`` adds
    per-modality paths. Returns the number of replaced linears.
    """
    n = 0
    for i, layer in enumerate(tqdm(ctx.adapter.decoder_layers(), desc=desc, leave=False)):
        for role, linear in ctx.adapter.linears(layer).items():
            W = linear.weight.data if shared_weight_for is None else shared_weight_for(i, role, linear)
            Wq = quantize_weight(W.float(), ctx.scheme).to(linear.weight.dtype)
            paths = {} if paths_for is None else paths_for(i, role, linear)
            bias = None if linear.bias is None else linear.bias.data
            ctx.adapter.set_linear(layer, role, QuantLinear(Wq, bias, ctx.scheme, ctx.router, paths))
            n += 1
    return n


def count_lowrank(model: nn.Module) -> dict:
    """Extra parameters of low-rank branches and the extra MACs per non-text token summed over linears."""
    params = 0
    macs: dict[str, int] = {}
    ranks: list[int] = []
    for m in model.modules():
        if isinstance(m, QuantLinear):
            for name, p in m.paths.items():
                if p.L1 is not None:
                    extra = p.L1.numel() + p.L2.numel()
                    params += extra
                    macs[name] = macs.get(name, 0) + extra
                    ranks.append(p.rank)
    out = {"cmc/extra_params": params}
    for name, v in macs.items():
        out[f"cmc/extra_macs_per_{name}_token"] = v
    if ranks:
        out["cmc/rank_min"] = min(ranks)
        out["cmc/rank_max"] = max(ranks)
    return out


__all__ = ["Method", "MethodConfigError", "QuantContext", "quantize_decoder_linears_", "count_lowrank", "ModalityPath"]
