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

from contextlib import contextmanager, nullcontext
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
    """The loss block's inputs on the FP stream and its FP outputs (the targets), from one pass of the FP layer."""
    return step.block_calls_and_outputs(loss_block(adapter, step.layer, pair), "fp")


def layer_pair_inputs(step: StackStep, adapter, pairs: Sequence[FoldPair]
                      ) -> list[tuple[list[BlockCall], list[torch.Tensor]]]:
    """:func:`pair_inputs` of every pair from one pass of the FP layer (all loss blocks' inputs held at once)."""
    return step.parts_calls_and_outputs([loss_block(adapter, step.layer, pair) for pair in pairs], "fp")


def is_token_wise(pair: FoldPair) -> bool:
    """The pair's loss block maps each token on its own (a linear consumer, the MLP), so samples can be joined
    along the tokens; the attention mixes the tokens of a sequence."""
    return not pair.producer_is_norm or pair.block != "attn"


def _same_arguments(a: BlockCall, b: BlockCall) -> bool:
    """Two calls with equal arguments (tensors equal in shape, dtype and value), inputs aside."""
    def same(x, y):
        if torch.is_tensor(x) or torch.is_tensor(y):
            return (torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape and x.dtype == y.dtype
                    and torch.equal(x, y))
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return type(x) is type(y) and x == y
    return a.by_keyword == b.by_keyword and same(a.args, b.args) and same(a.kwargs, b.kwargs)


def sample_chunks(calls: Sequence[BlockCall], max_tokens: int) -> list[list[int]]:
    """Consecutive samples grouped into chunks of at most ``max_tokens`` input rows (at least one sample each)."""
    chunks: list[list[int]] = []
    size = 0
    for k, call in enumerate(calls):
        n = call.input.shape[:-1].numel()
        if not chunks or size + n > max_tokens:
            chunks.append([])
            size = 0
        chunks[-1].append(k)
        size += n
    return chunks


def joinable(calls: Sequence[BlockCall], token_wise: bool) -> bool:
    """Samples that one call can carry: batch 1 each; a token-wise block without other arguments (joined along
    the tokens), or equal arguments and equal input shapes (joined along the batch)."""
    if len(calls) < 2 or any(c.input is None or c.input.dim() < 2 or c.input.shape[0] != 1 for c in calls):
        return False
    if token_wise:
        return all(not c.args and not c.kwargs for c in calls)
    return all(c.input.shape == calls[0].input.shape and _same_arguments(c, calls[0]) for c in calls[1:])


def _join(tensors: Sequence[torch.Tensor], token_wise: bool) -> torch.Tensor:
    if token_wise:  # [1, T_k, D] -> [1, Σ T_k, D]
        return torch.cat([t.reshape(1, -1, t.shape[-1]) for t in tensors], dim=1)
    return torch.cat(list(tensors), dim=0)  # [1, T, D] -> [n, T, D]


def join_samples(calls: Sequence[BlockCall], targets: Sequence[torch.Tensor],
                 row_weights: Sequence[torch.Tensor | None] | None, token_wise: bool, max_tokens: int):
    """(calls, targets, row_weights) with the samples of each chunk of ``max_tokens`` rows joined into one call
    (fewer, larger matrix products; the same rows, so the same loss up to float rounding); unchanged when
    ``max_tokens`` <= 0 or the samples cannot be joined (:func:`joinable`)."""
    if max_tokens <= 0 or not joinable(calls, token_wise):
        return list(calls), list(targets), row_weights
    out_calls, out_targets, out_weights = [], [], []
    for chunk in sample_chunks(calls, max_tokens):
        first = calls[chunk[0]]
        out_calls.append(BlockCall(first.args, first.kwargs, _join([calls[k].input for k in chunk], token_wise),
                                   first.by_keyword))
        out_targets.append(_join([targets[k] for k in chunk], token_wise))
        if row_weights is not None:
            w = [row_weights[k] for k in chunk]
            out_weights.append(None if all(x is None for x in w) else torch.cat(
                [torch.ones(calls[k].input.shape[:-1].numel()) if x is None else x.reshape(-1).float()
                 for k, x in zip(chunk, w)]))
    return out_calls, out_targets, (out_weights if row_weights is not None else None)


@torch.no_grad()
def joined_block_matches(block: nn.Module, calls: Sequence[BlockCall], targets: Sequence[torch.Tensor], device,
                         rtol: float = 1e-4) -> bool:
    """The FP block on the joined calls gives the targets (relative max error below ``rtol``): a block that does
    not broadcast its arguments over a batch is caught before the search relies on it."""
    for call, target in zip(calls, targets):
        y = call.run(block, device).float()
        t = target.to(device).float()
        if y.shape != t.shape or float((y - t).abs().max()) > rtol * max(float(t.abs().max()), 1e-12):
            return False
    return True


SEARCH_PRECISIONS = ("model", "bf16")


def search_precision(device, precision: str = "model"):
    """The context of a trial pass: "model" runs the loss block in the model's dtype (nothing changes); "bf16"
    runs its matrix products (linears, attention) in bfloat16 under ``torch.autocast``, whose elementwise ops
    follow their inputs. Only the trial outputs change; the targets, the loss (float32) and the weights do not."""
    if precision == "model":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"search precision {precision!r}: valid choices are {SEARCH_PRECISIONS}")


@torch.no_grad()
def search_pair_scale(adapter, layer: nn.Module, pair: FoldPair, calls: Sequence[BlockCall],
                      targets: Sequence[torch.Tensor], x_mean: torch.Tensor, scheme: QuantScheme, grid: Sequence[float],
                      device, row_weights: Sequence[torch.Tensor | None] | None = None, p: int = 2,
                      batch_tokens: int = 0, precision: str = "model") -> ScaleSearch:
    """The α of ``grid`` whose s = x̄^α (normalised) minimises Σ num / Σ den of :func:`block_error_terms` over
    the samples (AWQ: ``row_weights`` None and p = 2, the MSE; MBQ: modality row weights and p = 1).

    x_mean [in]: mean |x| per channel of the consumers' input; calls / targets: the loss block's FP inputs and
    outputs per sample; row_weights: per sample [T] or None. ``batch_tokens`` > 0: the samples are joined into
    calls of at most that many rows (:func:`join_samples`; the attention only when its arguments are equal
    across samples and the joined FP block reproduces the targets); 0: one call per sample. ``precision``: the
    trial passes' arithmetic (:func:`search_precision`; the join check runs in the model's dtype).
    """
    consumers = {role: adapter.linears(layer)[role] for role in pair.consumers}
    if batch_tokens > 0:
        token_wise = is_token_wise(pair)
        joined = join_samples(calls, targets, row_weights, token_wise, batch_tokens)
        if len(joined[0]) < len(calls) and (
                token_wise or joined_block_matches(loss_block(adapter, layer, pair), joined[0], joined[1], device)):
            calls, targets, row_weights = joined
    targets = [t.to(device) for t in targets]
    x_mean = x_mean.to(device)
    losses: dict[float, float] = {}
    scales: dict[float, torch.Tensor] = {}
    for alpha in grid:
        s = awq_scales(x_mean, alpha)
        trial = {role: trial_linear(lin, s, scheme) for role, lin in consumers.items()}
        num = den = 0.0
        with swapped_linears(adapter, layer, trial), search_precision(device, precision):
            block = loss_block(adapter, layer, pair)
            for k, call in enumerate(calls):
                w = None if row_weights is None else row_weights[k]
                n, d = block_error_terms(call.run(block, device), targets[k], w, p)
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
