"""SmoothQuant baseline (mit-han-lab/smoothquant) on the layer walker and the adapters' folds.

Smoothing is folded only at norm -> linear boundaries (the adapter's ``attn_in`` and ``mlp_in`` pairs:
input norm -> q,k,v and the MLP's input norm -> gate,up), exactly for the model's norm formula; o_proj
and down_proj are quantized but not smoothed. Nothing is quantized in place on shared inputs (the
official code does, which corrupts q/k/v inputs in general). Options: alpha (0.5; the official Llama
recipes use 0.8-0.9), a per-layer alpha grid search on the layer's output error (inputs from the
quantized stream, target: the FP layer on the same inputs), and static per-tensor activation scales
(quant.a_dynamic=false).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from baselines.smoothquant.core import smoothquant_factors
from masquant.adapters.base import ROLE_TO_GROUP
from masquant.engine.deploy import deploy_block_
from masquant.methods.base import BlockPlan, Method, Walk
from masquant.methods.registry import register_method
from masquant.quant.linear import ModalityPath
from masquant.quant.quantizer import static_act_scale


ACT_STATISTICS = ("absmax", "range")


@dataclass
class SmoothQuantConfig:
    id: str = "smoothquant"
    alpha: float = 0.5
    alpha_grid: list[float] = field(default_factory=list)  # non-empty: per-layer search over these alphas
    # per-channel activation statistic of the factor: absmax (the paper's Eq. 4) or max - min (llm-compressor's)
    act_statistic: str = "absmax"
    search_samples: int = 16  # calibration samples whose layer-output error scores each alpha of the grid

    def __post_init__(self):
        for a in [self.alpha, *self.alpha_grid]:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"method.alpha / method.alpha_grid value {a}: must be in [0, 1]")
        if self.search_samples < 1:
            raise ValueError(f"method.search_samples={self.search_samples}: must be >= 1")
        if self.act_statistic not in ACT_STATISTICS:
            raise ValueError(f"method.act_statistic={self.act_statistic!r}: valid choices are {list(ACT_STATISTICS)}")


def smooth_layer_(adapter, layer, layer_stats, alpha: float, act_statistic: str = "absmax") -> dict[str, torch.Tensor]:
    """Fold SmoothQuant factors at each norm→linear pair of one layer; returns s per input group."""
    lin = adapter.linears(layer)
    factors = {}
    for pair in adapter.norm_fold_pairs(layer):
        stats = layer_stats[pair.input_group]["all"]
        act = stats.absmax if act_statistic == "absmax" else stats.range
        s = smoothquant_factors(act, [lin[r].weight for r in pair.consumers], alpha)
        adapter.fold_scales_(layer, pair, s)
        factors[pair.input_group] = s
    return factors


def static_paths_for(scheme, layer_stats, factors):
    """``paths_for`` of one layer: with static activations, one per-tensor scale from the smoothed abs-max
    (nothing for dynamic activations)."""

    def paths_for(role, linear, W_q):
        if not (scheme.quantize_acts and not scheme.a_dynamic):
            return {}
        group = ROLE_TO_GROUP[role]
        absmax = layer_stats[group]["all"].absmax
        if group in factors:
            absmax = absmax / factors[group].cpu()
        scale = static_act_scale(absmax.max(), scheme.a_bits, scheme.a_clip_ratio, scheme.int_range, scheme.a_format)
        return {"text": ModalityPath(act_scale=scale.to(linear.weight.device))}

    return paths_for


def _layer_error(step, trial, targets, samples) -> float:
    outs = step.run("quant", layer=trial, samples=samples)
    return sum(float((y - t).pow(2).mean()) for y, t in zip(outs, targets))


def _evenly(n: int, k: int) -> list[int]:
    """``k`` evenly spaced indices of ``n`` (all when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


@register_method("smoothquant", config=SmoothQuantConfig, order=20)
class SmoothQuant(Method):
    activations = "required"
    activation_scales = "either"

    def walk(self, ctx, stack):
        return Walk(stats=True, quantized_stream=bool(self.cfg.alpha_grid))

    def prepare(self, ctx):
        self.alphas: list[float] = []

    def search_alpha(self, ctx, step) -> float:
        """The alpha of the grid whose smoothed, quantized layer best reproduces the FP layer on the quantized
        stream's inputs of ``search_samples`` calibration samples."""
        picked = _evenly(step.n_samples, self.cfg.search_samples)
        targets = step.run("quant", samples=picked)  # the FP layer on the quantized stream's inputs
        errors = {}
        for a in self.cfg.alpha_grid:
            trial = copy.deepcopy(step.layer)
            factors = smooth_layer_(ctx.adapter, trial, step.stats, a, self.cfg.act_statistic)
            deploy_block_(ctx, trial, paths_for=static_paths_for(ctx.scheme, step.stats, factors))
            errors[a] = _layer_error(step, trial, targets, picked)
            del trial
        return min(errors, key=errors.get)

    def plan_block(self, ctx, step) -> BlockPlan:
        alpha = self.search_alpha(ctx, step) if self.cfg.alpha_grid else self.cfg.alpha
        factors = smooth_layer_(ctx.adapter, step.layer, step.stats, alpha, self.cfg.act_statistic)
        self.alphas.append(alpha)
        return BlockPlan(paths_for=static_paths_for(ctx.scheme, step.stats, factors), report={"alpha": alpha})

    def finish(self, ctx) -> dict:
        return {"smoothquant/alpha_mean": sum(self.alphas) / len(self.alphas), "smoothquant/alphas": self.alphas}
