"""SmoothQuant baseline (mit-han-lab/smoothquant) through the model adapter.

Smoothing is folded only at norm -> linear boundaries (input_layernorm -> q,k,v and
post_attention_layernorm -> gate,up); o_proj and down_proj are quantized but not smoothed. Nothing is
quantized in place on shared inputs (the official code does, which corrupts q/k/v inputs in general).
Options: alpha (0.5; the official Llama recipes use 0.8-0.9), a per-layer alpha grid search on the
layer's output error, and static per-tensor activation scales (quant.a_dynamic=false).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from baselines.smoothquant.core import fold_smoothing_into_norm_, smooth_factors
from masquant.adapters.base import ROLE_TO_GROUP
from masquant.calibration.layerwise import LayerInputs, advance, run_layer
from masquant.methods.base import Method, MethodConfigError, ModalityPath, QuantContext
from masquant.quant.linear import QuantLinear
from masquant.quant.quantizer import quantize_weight, static_act_scale


@dataclass
class SmoothQuantConfig:
    id: str = "smoothquant"
    alpha: float = 0.5
    alpha_grid: list[float] = field(default_factory=list)  # non-empty: per-layer search over these alphas

    def __post_init__(self):
        for a in [self.alpha, *self.alpha_grid]:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"method.alpha / method.alpha_grid value {a}: must be in [0, 1]")


def _smooth_layer_(adapter, layer, layer_stats, alpha: float) -> dict[str, torch.Tensor]:
    """Fold smoothing at each norm group of one layer; returns s per input group."""
    lin = adapter.linears(layer)
    factors = {}
    for group in adapter.norm_groups:
        targets = [lin[r] for r in group.roles]
        s = smooth_factors(layer_stats[group.input_group]["all"].absmax, [t.weight for t in targets], alpha)
        fold_smoothing_into_norm_(adapter.norm(layer, group), targets, s)
        factors[group.input_group] = s
    return factors


def _quantize_layer_(ctx: QuantContext, layer, layer_stats, factors) -> None:
    scheme = ctx.scheme
    for role, linear in ctx.adapter.linears(layer).items():
        group = ROLE_TO_GROUP[role]
        paths = {}
        if scheme.quantize_acts and not scheme.a_dynamic:
            absmax = layer_stats[group]["all"].absmax
            if group in factors:
                absmax = absmax / factors[group].cpu()
            scale = static_act_scale(absmax.max(), scheme.a_bits, scheme.a_clip_ratio).to(linear.weight.device)
            paths["text"] = ModalityPath(act_scale=scale)
        Wq = quantize_weight(linear.weight.data.float(), scheme).to(linear.weight.dtype)
        bias = None if linear.bias is None else linear.bias.data
        ctx.adapter.set_linear(layer, role, QuantLinear(Wq, bias, scheme, None, paths))


def _layer_error(layer, inputs: LayerInputs, targets: list[torch.Tensor], device) -> float:
    err = 0.0
    for sample, target in zip(inputs, targets):
        err += float((run_layer(layer, sample, device) - target.to(device)).pow(2).mean())
    return err


class SmoothQuant(Method):
    id = "smoothquant"

    def check(self, scheme, modalities) -> None:
        if scheme.is_dense:
            raise MethodConfigError("method=smoothquant with quant=fp16 quantizes nothing; use method=dense")
        if not scheme.quantize_acts:
            raise MethodConfigError(
                f"method=smoothquant targets activation quantization; quant={scheme.name} is weight-only (use awq or rtn)"
            )

    def collect(self, ctx: QuantContext):
        return ctx.input_stats()

    def apply(self, ctx: QuantContext, stats) -> dict:
        layers = ctx.adapter.decoder_layers()
        chosen = []
        inputs = ctx.calib if self.cfg.alpha_grid else None
        for i, layer in enumerate(tqdm(layers, desc="smoothquant", leave=False)):
            alpha = self.cfg.alpha
            if self.cfg.alpha_grid:
                targets = [run_layer(layer, s, ctx.device).cpu() for s in inputs]
                errors = {}
                for a in self.cfg.alpha_grid:
                    trial = copy.deepcopy(layer)
                    _quantize_layer_(ctx, trial, stats[i], _smooth_layer_(ctx.adapter, trial, stats[i], a))
                    errors[a] = _layer_error(trial, inputs, targets, ctx.device)
                    del trial
                alpha = min(errors, key=errors.get)
            factors = _smooth_layer_(ctx.adapter, layer, stats[i], alpha)
            _quantize_layer_(ctx, layer, stats[i], factors)
            if inputs is not None:
                inputs = advance(layer, inputs, ctx.device)  # statistics stay FP; the search sees quantized inputs
            chosen.append(alpha)
        return {"smoothquant/alpha_mean": sum(chosen) / len(chosen), "smoothquant/alphas": chosen}
