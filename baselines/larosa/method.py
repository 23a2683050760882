"""LaRoSA (arXiv 2507.01299; code github alibaba/EfficientAI ``larosa/``): layerwise rotated Top-K activation sparsity.

``apply`` walks the decoder once. Per layer, the walker's FP pass observes the Gram matrices C = Σ xᵀx (float64,
over every calibration token) of the attention input (q/k/v's, the input norm's output) and of the MLP input
(gate/up's), each with its own rotation Q = eigenvectors of C (:func:`~baselines.larosa.core.covariance_rotation`;
the official inference code reuses the attention's Q for the MLP, a bug corrected here). Then the layer is
changed in place (:func:`sparsify_layer_`):

- block inputs: the norm becomes ``SparsifiedNorm`` (norm, then TopK(x Q)) and its consumers' weights W -> W Q
  (the paper's Qᵀ W), so the inverse rotation costs nothing at run time (see ``core``'s docstring);
- o_proj and down_proj inputs: magnitude Top-K without rotation, as the official code (its ``top_k_new`` on the
  unrotated attention output and SwiGLU product). A full rotation there would cost an online D×D product per token
  (down: 1536² MACs on the testbed, more than down_proj itself) and there is no norm to carry it;
- per-token sparsity ``block_in_scale`` · ``sparsity`` on the block inputs and ``block_out_scale`` · ``sparsity`` on
  o/down (0.8 and 1.2, the official code's; their mean must be 1, so ``sparsity`` is the mean per-position level).
  The report also gives the MAC-weighted level (the fraction of the decoder linears' multiply-adds skipped), which
  is lower because the block inputs feed more weights (0.375 at 0.4 on the testbed).

``rotate=false`` is the TEAL-style ablation: the same Top-K at the same positions without any rotation.
With a quantization scheme the sparsity comes first: the activation quantizer of each linear runs on its
sparsified input, and the weights (W Q for the block inputs) are rounded as ``quant.w_quantizer`` says (GPTQ's
Hessians then come from the sparsified inputs of the walker's quantized stream). ``quant=fp16`` is sparsity alone.

Report: per layer and position the realised sparsity of the deployed model on the quantized stream of the
calibration set (``larosa/realised_sparsity/<group>/layer_<i>``) and, per modality, the fraction of the input's
energy the Top-K drops (``larosa/energy_dropped/<modality>/<group>/layer_<i>`` and its mean over layers); the
fidelity stage adds the per-modality SQNR of the hidden states.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from baselines.larosa.core import (
    RotatedTopK,
    SparsifiedNorm,
    covariance_rotation,
    kept_count,
    mac_weighted_sparsity,
    position_sparsities,
    rotated_input_weight,
)
from masquant.adapters.base import INPUT_GROUPS
from masquant.calibration.stats import GramObserver
from masquant.engine.weights import block_weights
from masquant.methods.base import BlockPlan, Method, MethodConfigError, Walk
from masquant.methods.registry import register_method
from masquant.transforms.rotation import OnlineRotatedLinear

log = logging.getLogger(__name__)

BLOCK_OUTPUTS = ("o", "down")  # roles whose input is sparsified without rotation


@dataclass
class LaRoSAConfig:
    id: str = "larosa"
    sparsity: float = 0.4  # model-level target: the mean of the per-position levels
    rotate: bool = True  # False: TEAL-style magnitude Top-K on the unrotated inputs (ablation)
    block_in_scale: float = 0.8  # × sparsity on the q/k/v and gate/up inputs
    block_out_scale: float = 1.2  # × sparsity on the o_proj and down_proj inputs

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:  # also refuses NaN
            raise ValueError(f"method.sparsity={self.sparsity}: must be in [0, 1) (the fraction of each token's "
                             "entries set to zero, e.g. 0.4)")
        if not (self.block_in_scale > 0 and self.block_out_scale > 0):
            raise ValueError(f"method.block_in_scale={self.block_in_scale} and method.block_out_scale="
                             f"{self.block_out_scale}: both must be > 0")
        if abs((self.block_in_scale + self.block_out_scale) / 2 - 1.0) > 1e-9:
            raise ValueError(f"method.block_in_scale={self.block_in_scale} and method.block_out_scale="
                             f"{self.block_out_scale} must average to 1 (method.sparsity is their mean level)")
        for key, scale in (("block_in_scale", self.block_in_scale), ("block_out_scale", self.block_out_scale)):
            if scale * self.sparsity >= 1.0:
                raise ValueError(f"method.sparsity={self.sparsity} with method.{key}={scale} gives a position level "
                                 f"of {scale * self.sparsity:.3g}; every level must stay below 1: use method.sparsity"
                                 f" < {1 / max(self.block_in_scale, self.block_out_scale):.4g}")


def block_input_pairs(adapter, layer) -> dict[str, object]:
    """{input group: the norm fold pair feeding it} for the attention and MLP inputs (qkv, gate_up)."""
    return {pair.input_group: pair for pair in adapter.norm_fold_pairs(layer)}


@torch.no_grad()
def sparsify_layer_(adapter, layer, sparsity: dict[str, float], rotations: dict[str, torch.Tensor] | None) -> dict:
    """Put LaRoSA's sparsifiers into one decoder layer (function-preserving when every sparsity is 0).

    ``rotations``: {input group: Q [D, D]} for the block inputs (qkv, gate_up); None = no rotation (TEAL-style).
    Returns {input group: kept count per token}.
    """
    lin = adapter.linears(layer)
    kept = {}
    for group, pair in block_input_pairs(adapter, layer).items():
        width = lin[pair.consumers[0]].in_features
        Q = None if rotations is None else rotations[group]
        if Q is not None:
            for role in pair.consumers:
                W = lin[role].weight
                W.data = rotated_input_weight(W.data, Q).to(W.dtype).contiguous()
        kept[group] = kept_count(width, sparsity[group])
        norm = adapter.norm(layer, pair.producer)
        adapter.replace_norm_(layer, pair.producer, SparsifiedNorm(norm, RotatedTopK(Q, kept[group], width)))
    for role in BLOCK_OUTPUTS:
        linear, group = lin[role], next(g for g, roles in INPUT_GROUPS.items() if role in roles)
        if getattr(linear, "input_transform", None) is not None:
            raise MethodConfigError(f"{role} already has an input transform; LaRoSA needs an untransformed model")
        kept[group] = kept_count(linear.in_features, sparsity[group])
        adapter.set_linear(layer, role, OnlineRotatedLinear(
            linear.weight.data, None if linear.bias is None else linear.bias.data,
            RotatedTopK(None, kept[group], linear.in_features)))
    return kept


def layer_sparsifiers(adapter, layer) -> dict[str, RotatedTopK]:
    """{input group: the sparsifier in front of it} of a layer that :func:`sparsify_layer_` changed."""
    out = {group: adapter.norm(layer, pair.producer).sparsify for group, pair in block_input_pairs(adapter, layer).items()}
    lin = adapter.linears(layer)
    for role in BLOCK_OUTPUTS:
        out[next(g for g, roles in INPUT_GROUPS.items() if role in roles)] = lin[role].input_transform
    return out


def group_macs(adapter, layer) -> dict[str, int]:
    """Multiply-adds per token of each input group's linears: in_features · Σ out_features."""
    lin = adapter.linears(layer)
    return {group: lin[roles[0]].in_features * sum(lin[r].out_features for r in roles) for group, roles in INPUT_GROUPS.items()}


class SparsityMeter:
    """Forward hooks on the sparsifiers: zero fraction of their outputs, and per modality the energy they drop.

    The zero fraction counts the rows whose input is not all zero (such rows, e.g. the zero embeddings of some
    placeholder tokens, cost nothing and are not the Top-K's doing).

    The energy of the input u and of the output s = TopK(u Q) are summed per modality of the router's masks
    (‖u Q‖ = ‖u‖ for orthogonal Q); dropped = 1 − Σ‖s‖² / Σ‖u‖².
    """

    def __init__(self, router):
        self.router = router
        self.zeros: dict[tuple[str, int], list[int]] = {}  # (group, layer) -> [zeros, elements]
        self.energy: dict[tuple[str, str, int], list[float]] = {}  # (modality, group, layer) -> [Σ‖u‖², Σ‖s‖²]

    def _hook(self, group: str, index: int):
        def hook(module, args, out):
            u = args[0].reshape(-1, args[0].shape[-1]).float()
            s = out.reshape(-1, out.shape[-1]).float()
            live = (u != 0).any(-1)  # all-zero input rows (e.g. masked or padded tokens) skip the product anyway
            z = self.zeros.setdefault((group, index), [0, 0])
            z[0] += int((s[live] == 0).sum())
            z[1] += s[live].numel()
            masks = dict(self.router.masks or {})
            masks["all"] = None
            eu, es = u.pow(2).sum(-1), s.pow(2).sum(-1)
            for m, mask in masks.items():
                if mask is not None:
                    if mask.numel() != eu.numel() or not mask.any():
                        continue
                    mask = mask.to(eu.device)
                e = self.energy.setdefault((m, group, index), [0.0, 0.0])
                e[0] += float(eu.sum() if mask is None else eu[mask].sum())
                e[1] += float(es.sum() if mask is None else es[mask].sum())
        return hook

    @contextmanager
    def observing(self, index: int, sparsifiers: dict[str, RotatedTopK]):
        handles = [m.register_forward_hook(self._hook(g, index)) for g, m in sparsifiers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def report(self, macs: dict[str, int]) -> dict:
        out: dict = {}
        realised: dict[str, list[float]] = {}
        for (group, i), (zeros, n) in sorted(self.zeros.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            value = zeros / n if n else 0.0
            out[f"larosa/realised_sparsity/{group}/layer_{i}"] = value
            realised.setdefault(group, []).append(value)
        means = {g: sum(v) / len(v) for g, v in realised.items()}
        out.update({f"larosa/realised_sparsity/{g}": v for g, v in means.items()})
        if means:
            out["larosa/realised_sparsity_macs"] = mac_weighted_sparsity(means, {g: macs[g] for g in means})
        dropped: dict[tuple[str, str], list[float]] = {}
        for (m, group, i), (eu, es) in sorted(self.energy.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
            value = 1.0 - es / eu if eu > 0 else 0.0
            out[f"larosa/energy_dropped/{m}/{group}/layer_{i}"] = value
            dropped.setdefault((m, group), []).append(value)
        out.update({f"larosa/energy_dropped/{m}/{g}": sum(v) / len(v) for (m, g), v in dropped.items()})
        return out


@register_method("larosa", config=LaRoSAConfig, order=90)
class LaRoSA(Method):
    export_refusal = "its Top-K activation sparsity and online rotations run at inference; the format has neither"
    honours_weight_options = True  # weights of a quantization scheme go through masquant.engine.weights
    fp16 = "allowed"  # sparsity alone
    function_preserving = False  # the Top-K drops entries by design
    dynamic_only_reason = "its Top-K changes every token's range"

    def prepare(self, ctx):
        cfg = self.cfg
        self.sparsity = position_sparsities(cfg.sparsity, cfg.block_in_scale, cfg.block_out_scale)
        self.meter = SparsityMeter(ctx.router)
        self.kept, self.macs = {}, {}

    def walk(self, ctx, stack):
        return Walk(quantized_stream=True, stats=False)

    def observers(self, ctx, step) -> list:
        # C = Σ xᵀx (float64) over every calibration token of the attention and MLP inputs: their rotations
        self.grams = None
        if self.cfg.rotate:
            self.grams = GramObserver.for_block(step.stack, step.block, groups=("qkv", "gate_up"))
        return [self.grams] if self.grams is not None else []

    def plan_block(self, ctx, step) -> BlockPlan:
        rotations = None
        if self.grams is not None:  # observed in this block's FP pass
            rotations = {g: covariance_rotation(self.grams.gram(g)) for g in self.grams.grams}
            self.grams = None
        self.kept = sparsify_layer_(ctx.adapter, step.layer, self.sparsity, rotations)
        self.macs = group_macs(ctx.adapter, step.layer)
        return BlockPlan(weights=block_weights(ctx, step))

    def after_deploy(self, ctx, step, plan) -> dict:
        with self.meter.observing(step.index, layer_sparsifiers(ctx.adapter, step.layer)):
            step.quant_outputs()  # the walk advances the quantized stream with these outputs
        return {}

    def finish(self, ctx) -> dict:
        cfg, sparsity, macs = self.cfg, self.sparsity, self.macs
        return {"larosa/rotate": cfg.rotate, "larosa/sparsity_target": cfg.sparsity,
                "larosa/sparsity_macs": mac_weighted_sparsity(sparsity, macs) if macs else 0.0,
                **{f"larosa/sparsity/{g}": s for g, s in sparsity.items()},
                **{f"larosa/kept/{g}": k for g, k in self.kept.items()},
                **self.meter.report(macs)}
