"""AWQ baseline (mit-han-lab/llm-awq) on the layer walker and the adapters' fold pairs.

The method in docs/methods/awq.md. Per decoder layer, on the FP stream (the official
code's cached inputs come from the FP model):

1. Statistics: x̄ = mean |x| per channel of each input group (the walk's running statistics, cached).
2. Scale search per fold pair of the adapter (attn_in, v_o only without GQA, mlp_in, up_down), each on the
   unscaled FP layer with only the pair's consumers quantized (``baselines.awq.search``): α ∈ {0, 0.05, ...,
   0.95}, s = x̄^α clamped at 1e-4 and normalised by sqrt(max(s) min(s)), loss = MSE (fp32) of the loss
   block's output. Then every chosen s is folded by ``adapter.fold_scales_`` (exact for the norm kind).
3. Clip search on the scaled layer, for every linear but q and k (the official code leaves them out: the
   q·k product makes their error hard to measure): per (output channel, group of the scheme's input
   channels) the shrink 1.0, 0.95, ..., 0.55 of the group's absmax with the lowest error of the group's
   partial output on about ``clip_n_tokens`` tokens, taken evenly over all calibration tokens (the
   official ``[0::N // 512]``) from a pass of the scaled FP layer. Output channels in batches of
   ``clip_oc_batch``.
4. Deploy: the clipped weights through the shared quantize step (asymmetric uint with a zero point per
   group for ``w4a16_g128`` / ``w3a16_g128``; any ``quant.w_group_size``, partial last groups included).

Memory: the loss blocks' inputs and targets of one layer, recorded in one pass (``capture_per_pair``: one
block's at a time, one pass per pair), plus the subsampled clip tokens. Speed (docs/methods/awq.md, "Speed"):
the samples are joined into calls of ``batch_tokens`` rows, and the clip error is a quadratic form in each
group's second moments (``clip_gram``); both equal the plain computation up to float rounding. Opt-in and not
equal: ``search_precision="bf16"`` runs the scale search's trial passes with bfloat16 matrix products (the
chosen α can change; the targets, loss, clip search and deployed weights are computed as without it).

Where this departs from the official code, on purpose:
- the attention block is called with the keyword arguments the layer itself passes it (each layer's own
  position embeddings and masks, M-RoPE included), not layer 0's;
- the trial linear computes Q(W diag(s)) on X diag(s)^-1 rather than Q(W diag(s)) diag(s)^-1 on X
  (equal in exact arithmetic), which is also exactly the deployed linear after the fold;
- the clip search evaluates partial last groups (in % group != 0) instead of asserting them away.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from baselines.awq.core import alpha_grid, clip_group_size, clip_weight, search_clip, shrink_grid
from baselines.awq.search import (
    SEARCH_PRECISIONS,
    ScaleSearch,
    TokenSubsample,
    layer_pair_inputs,
    pair_inputs,
    search_pair_scale,
)
from masquant.adapters.base import ROLE_TO_GROUP
from masquant.engine.deploy import DeployWeight
from masquant.methods.base import BlockPlan, Method, MethodConfigError
from masquant.methods.registry import register_method
from masquant.quant.scheme import QuantScheme

log = logging.getLogger(__name__)

CLIP_SKIPPED_ROLES = ("q", "k")  # official auto_clip: "due to qk bmm, it is hard to clip precisely"
VALID_SCHEMES = "quant=w4a16_g128 or quant=w3a16_g128 (any quant.w_group_size, e.g. quant.w_group_size=64)"


@dataclass
class AWQConfig:
    id: str = "awq"
    n_grid: int = 20  # α ∈ {0, 1/n_grid, ..., (n_grid-1)/n_grid}
    clip: bool = True  # the clip search after scaling (official mse_range)
    clip_n_tokens: int = 512  # tokens of the clip search, subsampled evenly over the calibration set
    clip_max_shrink: float = 0.5  # shrinks 1.0, 0.95, ..., down to 1 - clip_max_shrink (excluded)
    clip_oc_batch: int = 256  # output channels per batch of the clip search (memory bound)
    clip_gram: bool = True  # clip error as a quadratic form in each group's second moments (False: on the tokens)
    batch_tokens: int = 4096  # scale search: samples joined into calls of at most this many rows (0: per sample)
    capture_per_pair: bool = False  # one pass of the layer per fold pair (less memory) instead of one for all
    # scale search: "model" (the model's dtype, official) or "bf16" (the trial passes' matrix products in bfloat16;
    # faster on CPUs with bf16 instructions; can change the chosen α; docs/methods/awq.md, "Speed")
    search_precision: str = "model"

    def __post_init__(self):
        if self.n_grid < 1:
            raise ValueError(f"method.n_grid={self.n_grid}: must be >= 1")
        if self.clip_n_tokens < 1 or self.clip_oc_batch < 1:
            raise ValueError("method.clip_n_tokens and method.clip_oc_batch must be >= 1")
        if self.batch_tokens < 0:
            raise ValueError(f"method.batch_tokens={self.batch_tokens}: must be >= 0 (0: one call per sample)")
        if self.search_precision not in SEARCH_PRECISIONS:
            raise ValueError(f"method.search_precision={self.search_precision!r}: valid choices are "
                             f"{list(SEARCH_PRECISIONS)}")
        if not 0.0 < self.clip_max_shrink < 1.0:
            raise ValueError(f"method.clip_max_shrink={self.clip_max_shrink}: must be in (0, 1)")


def search_layer_scales(ctx, step, grid, row_weights_for=None, p: int = 2, batch_tokens: int = 0,
                        capture_per_pair: bool = True, precision: str = "model") -> dict[str, ScaleSearch]:
    """Step 2 without the fold: every fold pair searched on the unscaled FP layer (FP stream inputs).

    ``row_weights_for(pair)`` gives per-sample row weights of the loss (MBQ); None: every row, AWQ's MSE.
    ``batch_tokens``: see :func:`baselines.awq.search.search_pair_scale`. ``capture_per_pair``: one pass of the
    layer per pair, holding one loss block's inputs and targets at a time; False: one pass for all pairs.
    ``precision``: the trial passes' arithmetic (:func:`baselines.awq.search.search_precision`).
    """
    pairs = list(ctx.adapter.fold_pairs(step.layer))
    captured = {} if capture_per_pair else dict(zip([pair.name for pair in pairs], layer_pair_inputs(step, ctx.adapter,
                                                                                                    pairs)))
    found: dict[str, ScaleSearch] = {}
    for pair in pairs:
        calls, targets = captured.pop(pair.name) if pair.name in captured else pair_inputs(step, ctx.adapter, pair,
                                                                                            step.device)
        x_mean = step.stats[pair.input_group]["all"].mean_abs
        weights = None if row_weights_for is None else row_weights_for(pair)
        found[pair.name] = search_pair_scale(ctx.adapter, step.layer, pair, calls, targets, x_mean, ctx.scheme, grid,
                                             step.device, weights, p, batch_tokens, precision)
        del calls, targets
    return found


def fold_layer_scales_(ctx, layer, found: dict[str, ScaleSearch]) -> None:
    """Fold every chosen s through the adapter (exact for the model's norm kind)."""
    for pair in ctx.adapter.fold_pairs(layer):
        if pair.name in found:
            ctx.adapter.fold_scales_(layer, pair, found[pair.name].s)


def search_report(found: dict[str, ScaleSearch]) -> dict:
    """Per-layer report entries of the scale searches: the chosen α, its loss and the loss at α = 0, per pair."""
    out = {}
    for name, r in found.items():
        out.update({f"alpha/{name}": r.alpha, f"loss/{name}": r.loss, f"loss_alpha0/{name}": r.losses[0.0]})
    return out


@register_method("awq", config=AWQConfig, order=30)
class AWQ(Method):
    activations = "refused"

    def check_config(self, scheme: QuantScheme, modalities) -> None:
        if scheme.w_granularity == "tensor":
            raise MethodConfigError(f"method={self.id} searches clips per group of input channels; "
                                    f"quant.w_granularity=tensor has none; use {VALID_SCHEMES}")

    def prepare(self, ctx):
        self.alphas: list[float] = []
        self.ratios: list[torch.Tensor] = []

    # --- steps ------------------------------------------------------------------------------------
    def scale_layer_(self, ctx, step) -> dict[str, ScaleSearch]:
        """Step 2: search every pair's s on the FP layer, then fold them all; returns the searches."""
        found = search_layer_scales(ctx, step, alpha_grid(self.cfg.n_grid), batch_tokens=self.cfg.batch_tokens,
                                    capture_per_pair=self.cfg.capture_per_pair,
                                    precision=self.cfg.search_precision)
        fold_layer_scales_(ctx, step.layer, found)
        return found

    def clip_layer(self, ctx, step) -> dict:
        """Step 3 on the (scaled) layer: {role: ClipResult} for every linear but q and k."""
        cfg = self.cfg
        n_total = sum(s.hidden.shape[:-1].numel() for s in step.walker.captured.samples)
        linears = ctx.adapter.linears(step.layer)
        roles = [r for r in linears if r not in CLIP_SKIPPED_ROLES]
        sampler = TokenSubsample(n_total // cfg.clip_n_tokens, {ROLE_TO_GROUP[r] for r in roles})
        step.run("fp", observers=[sampler], keep=False)
        shrinks = shrink_grid(cfg.n_grid, cfg.clip_max_shrink)
        out = {}
        for role in roles:
            X = sampler.tokens(ROLE_TO_GROUP[role]).to(step.device)
            out[role] = search_clip(linears[role].weight.data, X, ctx.scheme, shrinks, cfg.clip_oc_batch, cfg.clip_gram)
        return out

    @staticmethod
    def clipped_weights(scheme, clips: dict):
        """Step 4's ``weight_for``: each linear clamped to its chosen clip values (the deploy step rounds it)."""

        def weight_for(role, linear):
            if role not in clips:
                return None
            W = linear.weight.data
            return DeployWeight(clip_weight(W, clips[role].max_val.to(W.device), clip_group_size(scheme, W.shape[1])))

        return weight_for

    # --- hooks ------------------------------------------------------------------------------------
    def plan_block(self, ctx, step) -> BlockPlan:
        found = self.scale_layer_(ctx, step)
        clips = self.clip_layer(ctx, step) if self.cfg.clip else {}
        report = search_report(found)
        self.alphas += [r.alpha for r in found.values()]
        if clips:
            ratio = torch.cat([c.ratio.reshape(-1) for c in clips.values()])
            err = sum(float(c.err.sum()) for c in clips.values())
            err0 = sum(float(c.err_noclip.sum()) for c in clips.values())
            report.update({"clip_ratio_mean": float(ratio.mean()),
                           "clip_frac_clipped": float((ratio < 1.0).float().mean()),
                           "clip_err_reduction": 1.0 - err / err0 if err0 > 0 else 0.0})
            self.ratios.append(ratio)
        return BlockPlan(weight_for=self.clipped_weights(ctx.scheme, clips), report=report)

    def finish(self, ctx) -> dict:
        report = {"awq/n_grid": self.cfg.n_grid, "awq/clip": self.cfg.clip,
                  "awq/alpha_mean": sum(self.alphas) / max(len(self.alphas), 1)}
        if self.ratios:
            ratios = torch.cat(self.ratios)
            report["awq/clip_ratio_mean"] = float(ratios.mean())
            report["awq/clip_frac_clipped"] = float((ratios < 1.0).float().mean())
        return report
