"""The weights one decoder layer deploys, rounded as the scheme asks: to nearest, MSE-clipped, or by GPTQ.

``quant.w_quantizer=gptq`` needs each linear's Hessian H = 2/N Σ xᵀx. :class:`LayerHessians` is a walker
observer (one :class:`HessianAccumulator` per input group: q/k/v share theirs, as do gate/up) that
:func:`layer_hessians` feeds with the layer as it is before it is quantized, run on the walker's
*quantized* stream: layer i's GPTQ sees the inputs the quantized layers 0..i-1 give it (GPTQ's sequential
setting; within a layer the four input groups come from one pass, not GPTQ's "true sequential" passes).

Methods that deploy through :func:`layer_weight_fn` honour ``quant.w_quantizer`` and ``quant.w_mse_clip``
(``Method.honours_weight_options``): rtn (= plain GPTQ with gptq), quarot, mquant. The others refuse them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from masquant.methods.base import DeployWeight, QuantContext
from masquant.adapters.base import ROLE_TO_GROUP
from masquant.quant.gptq import HessianAccumulator, gptq_quantize, rtn_quantize
from masquant.quant.scheme import QuantScheme

log = logging.getLogger(__name__)

WeightSource = Callable[[str, nn.Module], torch.Tensor]  # (role, linear) -> the FP weight W [out, in] to round


class LayerHessians:
    """Walker observer: H per input group of one layer, from the rows its linears' weights multiply."""

    def __init__(self, dims: dict[str, int]):
        self.acc = {group: HessianAccumulator(dim) for group, dim in dims.items()}

    @classmethod
    def for_layer(cls, adapter, layer: nn.Module) -> "LayerHessians":
        return cls({g: lin.in_features for g, lin in adapter.input_group_linears(layer).items()})

    def observe(self, group: str, x: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
        self.acc[group].add(x)

    def H(self, group: str) -> torch.Tensor:
        return self.acc[group].H


def layer_hessians(step) -> LayerHessians:
    """Hessians of the step's layer (as it is now) on the walker's quantized stream; no outputs are kept."""
    hessians = LayerHessians.for_layer(step.walker.adapter, step.layer)
    step.run("quant", observers=[hessians], keep=False)
    return hessians


def gptq_options(scheme: QuantScheme) -> dict:
    """``gptq_quantize`` keyword arguments for the scheme's grid and GPTQ options."""
    return dict(bits=scheme.w_bits, symmetric=scheme.w_symmetric,
                group_size=scheme.w_group_size if scheme.w_granularity == "group" else 0,
                qrange=scheme.int_range.value, blocksize=scheme.gptq_block, percdamp=scheme.gptq_damp,
                act_order=scheme.gptq_act_order, mse_clip=scheme.w_mse_clip)


def rtn_weight(W: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Round to nearest on the scheme's grid with the MSE-clipped range (``quant.w_mse_clip``)."""
    opts = gptq_options(scheme)
    return rtn_quantize(W, bits=opts["bits"], symmetric=opts["symmetric"], group_size=opts["group_size"],
                        qrange=opts["qrange"], mse_clip=True)


@dataclass
class LayerWeights:
    """``weight_for`` of :func:`~masquant.methods.base.quantize_layer_` and what it cost."""

    weight_for: Callable[[str, nn.Module], "DeployWeight | torch.Tensor | None"] | None
    seconds: float = 0.0  # Hessian pass + GPTQ solves of this layer (0 for round to nearest)
    gptq_loss: dict[str, float] = field(default_factory=dict)  # role -> GPTQ's ½ tr(ΔW H ΔWᵀ)


@torch.no_grad()
def layer_weight_fn(ctx: QuantContext, step=None, layer: nn.Module | None = None,
                    weight_source: WeightSource | None = None) -> LayerWeights:
    """The deployed weights of a layer, rounded as ``ctx.scheme`` says.

    ``step``: the walker step of the layer (needed for GPTQ, whose Hessians come from its quantized stream).
    ``weight_source(role, linear)``: the FP weight to round (default: the linear's own; e.g. MQuant's RMS
    zeroes the split channel). Round to nearest returns the FP weight and lets the deploy path quantize it.
    """
    scheme = ctx.scheme
    layer = step.layer if layer is None else layer
    source = weight_source or (lambda role, linear: linear.weight.data)
    if scheme.w_quantizer == "rtn":
        if not scheme.w_mse_clip:
            return LayerWeights(None if weight_source is None else source)
        return LayerWeights(lambda role, linear: DeployWeight(rtn_weight(source(role, linear), scheme), quantized=True))
    if step is None:
        raise ValueError("quant.w_quantizer=gptq needs the layer walker's step (its quantized stream feeds H)")
    t0 = time.perf_counter()
    hessians = layer_hessians(step)
    opts = gptq_options(scheme)
    deployed: dict[str, torch.Tensor] = {}
    losses: dict[str, float] = {}
    for role, linear in ctx.adapter.linears(layer).items():
        W = source(role, linear)
        H = hessians.H(ROLE_TO_GROUP[role]).to(W.device)
        Wq, info = gptq_quantize(W.float(), H, **opts)
        deployed[role] = Wq.to(W.dtype)
        losses[role] = info["loss"]
    seconds = time.perf_counter() - t0
    log.debug("GPTQ layer %d: %.2f s, loss %s", step.index, seconds, losses)
    return LayerWeights(lambda role, linear: DeployWeight(deployed[role], quantized=True), seconds, losses)


def summarize(per_layer: list[LayerWeights], prefix: str) -> dict:
    """Report entries: GPTQ time per layer and its loss per layer (nothing for round to nearest)."""
    timed = [w for w in per_layer if w.seconds > 0]
    if not timed:
        return {}
    out = {f"{prefix}/gptq_s_per_layer": sum(w.seconds for w in timed) / len(timed),
           f"{prefix}/gptq_s_total": sum(w.seconds for w in timed)}
    for i, w in enumerate(per_layer):
        if w.gptq_loss:
            out[f"{prefix}/gptq_loss/layer_{i}"] = sum(w.gptq_loss.values())
    return out
