"""The AWQ scale search on one fold pair of a decoder layer: the one implementation AWQ and MBQ share.

For a fold pair (producer -> consumers) and a trial α, every consumer is replaced by a trial linear that
computes Qa(X / s) Q(W diag(s))ᵀ + b (for weight-only schemes Qa is the identity, so this is
X (Q(W diag(s)) diag(s)^-1)ᵀ, the paper's W'); the block whose output is the loss is run with the model's
own modules on the inputs the FP layer gave it:

- attn_in (norm -> q, k, v): the attention block (``adapter.attention``), with the keyword arguments the
  layer passes it (position embeddings, masks);
- mlp_in (norm -> gate, up): the MLP block (``adapter.mlp``) on the post-attention-norm output;
- v_o and up_down: the consumer linear itself. o_proj and down_proj are the last op of their block, so
  with only the consumer quantized the block output *is* the consumer's output (the official code's loss).

Only the pair's consumers are quantized in its search; every pair is searched on the unscaled FP layer and
the scales are folded afterwards (as the official ``auto_scale_block``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from baselines.awq.core import awq_scales, block_error_terms, pick_alpha, scaled_weight
from masquant.adapters.base import FoldPair
from masquant.engine.walker import BlockCall, StackStep
from masquant.quant.linear import ModalityPath, QuantLinear
from masquant.quant.quantizer import quantize_weight
from masquant.quant.scheme import QuantScheme


@dataclass
class ScaleSearch:
    """The outcome of one pair's search: the chosen α and s, and the loss of every α of the grid."""

    pair: str
    alpha: float
    s: torch.Tensor  # [in]
    losses: dict[float, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.losses[self.alpha]


def trial_linear(linear: nn.Module, s: torch.Tensor, scheme: QuantScheme) -> QuantLinear:
    """Y = Qa(X / s) Q(W diag(s))ᵀ + b: the linear as it deploys after folding s (no routing)."""
    W = linear.weight.data
    W_q = quantize_weight(scaled_weight(W, s).float(), scheme).to(W.dtype)
    bias = None if linear.bias is None else linear.bias.data
    return QuantLinear(W_q, bias, scheme, None, {"text": ModalityPath(smooth=s.to(W.device, W.dtype))})


@contextmanager
def swapped_linears(adapter, layer: nn.Module, modules: dict[str, nn.Module]):
    """Put ``modules`` in place of the layer's linears of those roles; the originals come back on exit."""
    originals = {role: adapter.linears(layer)[role] for role in modules}
    try:
        for role, module in modules.items():
            adapter.set_linear(layer, role, module)
        yield
    finally:
        for role, module in originals.items():
            adapter.set_linear(layer, role, module)


def loss_block(adapter, layer: nn.Module, pair: FoldPair) -> nn.Module:
    """The module whose output is the pair's loss (see the module docstring); looked up in the layer as it is
    now, so inside :func:`swapped_linears` a linear pair gets its trial linear."""
    if pair.producer_is_norm:
        return adapter.attention(layer) if pair.block == "attn" else adapter.mlp(layer)
    (consumer,) = pair.consumers
    return adapter.linears(layer)[consumer]


def pair_inputs(step: StackStep, adapter, pair: FoldPair, device) -> tuple[list[BlockCall], list[torch.Tensor]]:
    """The loss block's inputs on the FP stream (one pass of the FP layer) and its FP outputs (the targets)."""
    block = loss_block(adapter, step.layer, pair)
    calls = step.block_calls(block, "fp")
    offload = step.walker.captured.offload
    with torch.no_grad():
        targets = [call.run(block, device).to(offload) for call in calls]
    return calls, targets


@torch.no_grad()
def search_pair_scale(adapter, layer: nn.Module, pair: FoldPair, calls: Sequence[BlockCall],
                      targets: Sequence[torch.Tensor], x_mean: torch.Tensor, scheme: QuantScheme, grid: Sequence[float],
                      device, row_weights: Sequence[torch.Tensor | None] | None = None, p: int = 2) -> ScaleSearch:
    """The α of ``grid`` whose s = x̄^α (normalised) minimises Σ num / Σ den of :func:`block_error_terms` over
    the samples (AWQ: ``row_weights`` None and p = 2, the MSE; MBQ: modality row weights and p = 1).

    x_mean [in]: mean |x| per channel of the consumers' input; calls / targets: the loss block's FP inputs and
    outputs per sample; row_weights: per sample [T] or None.
    """
    consumers = {role: adapter.linears(layer)[role] for role in pair.consumers}
    losses: dict[float, float] = {}
    scales: dict[float, torch.Tensor] = {}
    for alpha in grid:
        s = awq_scales(x_mean.to(device), alpha)
        trial = {role: trial_linear(lin, s, scheme) for role, lin in consumers.items()}
        num = den = 0.0
        with swapped_linears(adapter, layer, trial):
            block = loss_block(adapter, layer, pair)
            for k, call in enumerate(calls):
                w = None if row_weights is None else row_weights[k]
                n, d = block_error_terms(call.run(block, device), targets[k].to(device), w, p)
                num, den = num + n, den + d
        losses[alpha] = num / max(den, 1.0)
        scales[alpha] = s.cpu()
    alpha = pick_alpha(losses)
    return ScaleSearch(pair.name, alpha, scales[alpha], losses)


class TokenSubsample:
    """Walker observer: every ``stride``-th input row per input group over all samples, in order (the
    official clip search's ``input[0::N // 512]``), so at most about N / stride rows are kept."""

    def __init__(self, stride: int, groups: Sequence[str]):
        self.stride = max(1, int(stride))
        self.rows: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
        self.seen: dict[str, int] = {g: 0 for g in groups}

    def observe(self, group: str, x: torch.Tensor, masks: dict[str, torch.Tensor]) -> None:
        if group not in self.rows:
            return
        first = (-self.seen[group]) % self.stride
        self.rows[group].append(x[first::self.stride].detach().float().cpu())
        self.seen[group] += x.shape[0]

    def tokens(self, group: str) -> torch.Tensor:
        """[N_sub, in] rows kept for ``group``."""
        return torch.cat(self.rows[group])
