"""The weights one block deploys, rounded as the scheme asks: to nearest, MSE-clipped, or by GPTQ.

``quant.w_quantizer=gptq`` needs each linear's Hessian H = 2/N Σ xᵀx: one :class:`GramObserver` per block (one
Gram matrix per input group: q/k/v share theirs, as do gate/up) fed with the block as it is before it is
quantized, run on the walk's *quantized* stream: block i's GPTQ sees the inputs the quantized blocks 0..i-1 give
it (GPTQ's sequential setting; by default within a block the input groups come from one pass).

``quant.gptq_true_sequential`` runs GPTQ as the official QuaRot and MQuant code: the block's input groups in the
order the block calls them (found by one call on one sample: q/k/v, o, gate/up, down in a decoder layer), each
group's Hessian from its own pass of the block in which the groups before it already compute with their GPTQ
weights, on a stream without activation quantization (the engine walks it so).

Methods with ``honours_weight_options`` deploy through :func:`block_weights` and so honour ``quant.w_quantizer`` and
``quant.w_mse_clip``; the others refuse them before anything runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from masquant.calibration.stats import GramObserver
from masquant.engine.deploy import DeployWeight, WeightFn
from masquant.quant.gptq import gptq_quantize
from masquant.quant.grid import rtn_quantize_grid
from masquant.quant.quantizer import weight_global_scale, weight_grid_of
from masquant.quant.scheme import QuantScheme

log = logging.getLogger(__name__)

WeightSource = Callable[[str, nn.Module], torch.Tensor]  # (role, linear) -> the FP weight W [out, in] to round


def gptq_options(scheme: QuantScheme) -> dict:
    """``gptq_quantize`` keyword arguments for the scheme's grid and GPTQ options."""
    return dict(bits=scheme.w_bits, symmetric=scheme.w_symmetric,
                group_size=scheme.w_group_size if scheme.w_granularity == "group" else 0,
                qrange=scheme.int_range.value, blocksize=scheme.gptq_block, percdamp=scheme.gptq_damp,
                act_order=scheme.gptq_act_order, static_groups=scheme.gptq_static_groups,
                mse_clip=scheme.w_mse_clip, grid=weight_grid_of(scheme))


def permuted_groups(opts: dict) -> bool:
    """GPTQ's groups follow the act-order permutation (not consecutive columns): their group index is the grid."""
    return bool(opts["act_order"] and opts["group_size"] and not opts["static_groups"])


def rtn_weight(W: torch.Tensor, scheme: QuantScheme) -> DeployWeight:
    """Round to nearest on the scheme's grid with the MSE-clipped range (``quant.w_mse_clip``), with its grid."""
    opts = gptq_options(scheme)
    W_q, scale, zero = rtn_quantize_grid(W, group_size=opts["group_size"], mse_clip=True, grid=opts["grid"])
    return DeployWeight(W_q, quantized=True, scale=scale, zero=zero, global_scale=weight_global_scale(W, scheme))


@dataclass
class BlockWeights:
    """``weight_for`` of :func:`~masquant.engine.deploy.deploy_block_` and what it cost."""

    weight_for: WeightFn | None
    seconds: float = 0.0  # Hessian pass + GPTQ solves of this block (0 for round to nearest)
    gptq_loss: dict[str, float] = field(default_factory=dict)  # role -> GPTQ's ½ tr(ΔW H ΔWᵀ)


def group_call_order(step, block: nn.Module) -> list[str]:
    """The stack's input groups of ``block`` in the order the block calls them (one call on sample 0)."""
    order: list[str] = []
    handles = [lin.register_forward_pre_hook(lambda m, a, g=group: order.append(g) if g not in order else None)
               for group, lin in step.stack.input_group_linears(block).items()]
    try:
        step.run("quant", layer=block, keep=False, samples=[0])
    finally:
        for h in handles:
            h.remove()
    missing = [g for g in step.stack.input_groups if g not in order]
    return order + missing  # a group the block did not call (none in the supported models) goes last


def gptq_block(step, block: nn.Module, stack, source: WeightSource, opts: dict, true_sequential: bool):
    """GPTQ on every linear of ``block``: ({role: DeployWeight (W_q and its grid)}, {role: loss}). One Hessian pass
    for every input group, or (``true_sequential``, see the module docstring) one pass per group in call order, the
    groups before it computing with their GPTQ weights meanwhile; the block's weights are restored when done (the
    deploy path takes W_q)."""
    linears = stack.linears(block)
    originals = {role: lin.weight.data for role, lin in linears.items()}
    passes = [[g] for g in group_call_order(step, block)] if true_sequential else [list(stack.input_groups)]
    deployed: dict[str, torch.Tensor] = {}
    grids: dict[str, dict] = {}  # role -> the grid GPTQ rounded on (DeployWeight's scale, zero, g_idx)
    losses: dict[str, float] = {}
    try:
        for groups in passes:
            grams = GramObserver.for_block(stack, block, groups=groups)
            step.run("quant", layer=block, observers=[grams], keep=False)
            for role in (r for g in groups for r in stack.input_groups[g]):
                linear = linears[role]
                W = source(role, linear)
                Wq, info = gptq_quantize(W.float(), grams.hessian(stack.role_group[role]).to(W.device), **opts)
                deployed[role] = Wq.to(W.dtype)
                grids[role] = dict(scale=info["scale"], zero=None if opts["symmetric"] else info["zero"],
                                   g_idx=info["g_idx"] if permuted_groups(opts) else None,
                                   global_scale=info["global_scale"])
                losses[role] = info["loss"]
                if true_sequential:  # later groups see this one as deployed: W_q plus what the source kept out (RMS)
                    linear.weight.data = deployed[role] + (originals[role] - W)
    finally:
        for role, linear in linears.items():
            linear.weight.data = originals[role]
    return {role: DeployWeight(W_q, quantized=True, **grids[role]) for role, W_q in deployed.items()}, losses


def block_hessians(step) -> GramObserver:
    """Hessians of the step's block (as it is now) on the walk's quantized stream; no outputs are kept."""
    grams = GramObserver.for_block(step.stack, step.block)
    step.run("quant", observers=[grams], keep=False)
    return grams


@torch.no_grad()
def block_weights(ctx, step=None, block: nn.Module | None = None, weight_source: WeightSource | None = None,
                  stack=None) -> BlockWeights:
    """The deployed weights of a block, rounded as ``ctx.scheme`` says.

    ``step``: the walker step of the block (needed for GPTQ, whose Hessians come from its quantized stream).
    ``weight_source(role, linear)``: the FP weight to round (default: the linear's own; e.g. MQuant's RMS
    zeroes the split channel). Round to nearest returns the FP weight and lets the deploy path quantize it.
    """
    scheme = ctx.scheme
    block = step.block if block is None else block
    source = weight_source or (lambda role, linear: linear.weight.data)
    if scheme.w_quantizer == "rtn":
        if not scheme.w_mse_clip:
            return BlockWeights(None if weight_source is None else source)
        return BlockWeights(lambda role, linear: rtn_weight(source(role, linear), scheme))
    if step is None:
        raise ValueError("quant.w_quantizer=gptq needs the walker's step (its quantized stream feeds H)")
    stack = step.stack if stack is None else stack
    t0 = time.perf_counter()
    deployed, losses = gptq_block(step, block, stack, source, gptq_options(scheme), scheme.gptq_true_sequential)
    seconds = time.perf_counter() - t0
    log.debug("GPTQ %s block %d: %.2f s, loss %s", stack.name, step.index, seconds, losses)
    return BlockWeights(lambda role, linear: deployed[role], seconds, losses)
