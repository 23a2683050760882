"""The deployable variant of a quantized model: what a compressed-tensors checkpoint can hold.

A checkpoint holds, per linear, one integer weight on a grid of scales (and zero points) and the activation
quantizer of the format (dynamic per token or per tensor, or a static per-tensor scale). What a
:class:`~masquant.quant.linear.QuantLinear` can hold beyond that is turned into it here, in place, or refused:

- a smoothing vector s on the default path (``x / s`` before the activation quantizer: MASQuant's text path) is
  folded into the producer of the linear's input (a norm's weight, or the rows of the producing linear's grid),
  exactly as :meth:`~masquant.adapters.base.ModelAdapter.fold_scales_` folds: the linear then computes the same
  function with no division. A producer folds one vector c (:meth:`FoldGroup.common`): its consumers' common
  vector when they share one (tied scales), or, for v_proj → o_proj under grouped-query attention (v's outputs are
  shared by several heads), the geometric mean of o's factors per key-value head. A consumer left with s_i / c ≠ 1
  (untied scales, o_proj under GQA, no producer) has that ratio re-rounded into its weight,
  ``Q(W_q diag(c / s_i))`` on the scheme's grid (``export.unfoldable_smoothing=reround``: a second rounding,
  reported), or is refused (``refuse``);
- per-modality paths (MASQuant's non-text paths, MQuant's per-modality static scales) are dropped: every token
  takes the default (text) path. A low-rank branch (CMC) is kept aside as a LoRA adapter
  (:mod:`masquant.export.lora`) before its path is dropped;
- an online transform before the activation quantizer (an online Hadamard of a rotation method), and a
  full-precision low-rank product on every token (MQuant's RMS), are refused, naming the linears.

The gap between the in-memory model and this variant is what the export measures (``export.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from masquant.adapters.norms import fold_scales_into_norm_
from masquant.errors import ConfigError
from masquant.quant.linear import DEFAULT_PATH, ModalityPath, QuantLinear
from masquant.quant.quantizer import quantize_weight_grid, sqnr_db, weight_global_scale

UNFOLDABLE_CHOICES = ("reround", "refuse")


@dataclass
class LowRankBranch:
    """One CMC branch kept aside: y += (x / s_m) L1 L2 for the modality's tokens, x the linear's input."""

    modality: str
    smooth: torch.Tensor | None  # s_m [in] (None: no smoothing)
    L1: torch.Tensor  # [in, r]
    L2: torch.Tensor  # [r, out]


@dataclass
class DeployableReport:
    """What :func:`make_deployable_` changed: folded and re-rounded linears, dropped paths, kept branches."""

    folded: dict[str, str] = field(default_factory=dict)  # linear -> where its smoothing went
    rerounded: dict[str, float] = field(default_factory=dict)  # linear -> weight SQNR (dB) of the second rounding
    dropped_paths: dict[str, list[str]] = field(default_factory=dict)  # linear -> modalities whose path was dropped
    branches: dict[str, list[LowRankBranch]] = field(default_factory=dict)  # linear -> CMC branches
    input_smoothing: dict[str, torch.Tensor] = field(default_factory=dict)  # linear -> s its producer now divides by

    def as_dict(self) -> dict:
        return {"folded_smoothing": self.folded, "rerounded_weight_sqnr_db": self.rerounded,
                "dropped_paths": self.dropped_paths,
                "lowrank_branches": {k: [b.modality for b in v] for k, v in self.branches.items()}}


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def refuse_online_transforms(model: nn.Module) -> None:
    """An online transform before the activation quantizer has no place in the checkpoint: refuse, naming it."""
    found = {name: type(m.input_transform).__name__ for name, m in quant_linears(model).items()
             if m.input_transform is not None}
    if found:
        first = dict(list(found.items())[:4])
        raise ConfigError(
            f"export=compressed_tensors: {len(found)} linears apply an online transform to their input before "
            f"quantizing it ({first}{' ...' if len(found) > 4 else ''}); masquant does not write compressed-tensors' "
            "transform config for it, so the checkpoint would compute another function. Export a method without "
            "online rotations (e.g. rtn, gptq, awq, smoothquant, mbq, masquant)")


@torch.no_grad()
def _reround_(lin: QuantLinear, W_exact: torch.Tensor) -> float:
    """Round ``W_exact`` on the linear's scheme (its grid recorded); returns the weight SQNR (dB) of that rounding."""
    W_q, scale, zero = quantize_weight_grid(W_exact, lin.scheme)
    lin.weight.copy_(W_q.to(lin.weight.dtype))
    lin.weight_scale, lin.weight_g_idx = scale.float(), None
    lin.weight_zero = None if zero is None else zero.float()
    lin.weight_global_scale = weight_global_scale(W_exact, lin.scheme)
    return sqnr_db(W_exact, W_q)


def _divide_output_rows_(producer: QuantLinear, s: torch.Tensor) -> float | None:
    """Producer output ÷ s on its grid: the rows' scales ÷ s, the weight re-made from its integer codes (so the
    weight stays exactly on the grid the export writes). A block float format's scales cannot take any value
    (MXFP4: powers of two; NVFP4: E4M3 values over the global scale): its weight ÷ s is re-rounded instead, and the
    SQNR of that rounding returned."""
    from masquant.export.grid import integer_codes, dequantize_codes

    s = s.to(producer.weight.device).float()
    rerounded = None
    if producer.weight_scale is not None and producer.scheme.w_format in ("mxfp4", "nvfp4"):
        rerounded = _reround_(producer, producer.weight.float() / s[:, None])
    elif producer.weight_scale is None:
        producer.weight.copy_((producer.weight.float() / s[:, None]).to(producer.weight.dtype))
    else:
        codes = integer_codes(producer)
        producer.weight_scale = producer.weight_scale / s[:, None]
        producer.weight.copy_(dequantize_codes(producer, codes).to(producer.weight.dtype))
    if producer.bias is not None:
        producer.bias.copy_((producer.bias.float() / s).to(producer.bias.dtype))
    return rerounded


@torch.no_grad()
def make_deployable_(model: nn.Module, adapter, unfoldable: str = "reround") -> DeployableReport:
    """Turn ``model`` (quantized in memory) into the variant a checkpoint holds, in place (see the module doc)."""
    if unfoldable not in UNFOLDABLE_CHOICES:
        raise ConfigError(f"export.unfoldable_smoothing={unfoldable!r}: valid choices are {list(UNFOLDABLE_CHOICES)}")
    refuse_online_transforms(model)
    report = DeployableReport()
    linears = quant_linears(model)
    every_token = [name for name, lin in linears.items() if lin.paths[DEFAULT_PATH].L1 is not None]
    if every_token:
        raise ConfigError(
            f"export=compressed_tensors: {len(every_token)} linears add a full-precision low-rank product on every "
            f"token beside their quantized weight ({every_token[:3]}{' ...' if len(every_token) > 3 else ''}: e.g. "
            "MQuant's RMS); the checkpoint has no place for it (method.rms=false quantizes the whole weight)")
    own_weight = [name for name, lin in linears.items() if lin.paths[DEFAULT_PATH].weight is not None]
    if own_weight:
        raise ConfigError(f"export=compressed_tensors: the default path of {own_weight[:3]} computes with a weight of "
                          "its own, not the linear's recorded grid; nothing in the checkpoint would hold it")
    for name, lin in linears.items():  # keep the low-rank branches, then route every token to the default path
        others = [m for m in lin.paths if m != DEFAULT_PATH]
        for m in others:
            path = lin.paths[m]
            if path.L1 is not None:
                report.branches.setdefault(name, []).append(LowRankBranch(m, path.smooth, path.L1, path.L2))
        if others:
            report.dropped_paths[name] = others
            for m in others:
                del lin.paths[m]
    smoothed = {name: lin.paths[DEFAULT_PATH].smooth for name, lin in linears.items()
                if lin.paths[DEFAULT_PATH].smooth is not None}
    if not smoothed:
        return report
    for i, layer in enumerate(adapter.decoder_layers()):
        names = adapter.linear_names(i)
        for group in _fold_groups(adapter, layer):
            consumers = [names[r] for r in group.consumers if names[r] in smoothed]
            if len(consumers) != len(group.consumers):
                continue  # a consumer without smoothing: the producer cannot change; each is re-rounded below
            c = group.common([smoothed[n].float() for n in consumers])
            if c is None:
                continue
            rerounded = group.fold(adapter, layer, c)
            if rerounded is not None:
                report.rerounded[names[group.producer]] = rerounded
            where = f"layer {i} {group.producer}" if group.norm else names[group.producer]
            for n in consumers:
                report.folded[n] = where
                report.input_smoothing[n] = group.expand(c)
                smoothed[n] = smoothed[n].float() / group.expand(c).to(smoothed[n].device)  # what is left to absorb
    left = {n: s for n, s in smoothed.items() if not bool(torch.all(s == 1))}
    if left and unfoldable == "refuse":
        raise ConfigError(
            f"export.unfoldable_smoothing=refuse: {len(left)} linears divide their input by a smoothing vector "
            f"that no producer can absorb exactly ({list(left)[:4]}{' ...' if len(left) > 4 else ''}: consumers "
            "of one producer with different vectors (method.tie_scales=false), or o_proj under grouped-query "
            "attention); export.unfoldable_smoothing=reround re-rounds them instead")
    for name in smoothed:
        lin = linears[name]
        if name in left:
            if not lin.scheme.quantize_weights:
                raise ConfigError(f"export: {name} divides its input by a smoothing vector but its weight is not "
                                  "quantized; nothing to re-round it on")
            W_exact = lin.weight.float() / left[name].float()[None, :]
            if not torch.isfinite(W_exact).all():
                raise ConfigError(f"export: re-rounding {name} gives non-finite weights (a zero smoothing factor?)")
            report.rerounded[name] = _reround_(lin, W_exact)
        lin.paths[DEFAULT_PATH] = _without_smooth(lin.paths[DEFAULT_PATH])
    return report


@dataclass
class FoldGroup:
    """A producer and the consumers of its output, with the vectors it can divide its output by: any vector
    (``rep`` = 1), or one constant over the ``rep`` query heads that share a key-value head (v_proj → o_proj under
    grouped-query attention: v's output channel kv·d feeds o's input channels (kv·rep + j)·d for j < rep)."""

    producer: str  # a norm's path in the layer, or a role
    consumers: tuple[str, ...]
    norm: bool
    rep: int = 1
    head_dim: int = 0

    def common(self, vectors: list[torch.Tensor]) -> torch.Tensor | None:
        """The vector the producer divides by, or None (it keeps its output):

        - every consumer has the same vector (tied scales): that vector, folded exactly;
        - v_proj → o_proj under GQA: the geometric mean of o's factors over the heads sharing a key-value head
          (magnitudes; the first head's signs, since learned factors may be negative); o keeps the ratio;
        - consumers with different vectors (untied q/k/v, gate/up): None, each re-rounds its own whole vector.
          Folding their geometric mean instead measured worse on the testbed (MASQuant W4A8: text SQNR 1.57 dB
          against 1.84, perplexity 56.8 against 53.7; docs/export.md)."""
        first = self.reduce(vectors[0], lambda t: t[:, 0])
        if all(torch.equal(self.expand(first), v) for v in vectors):
            return first  # one vector for all (tied scales): folded exactly, nothing left to re-round
        if self.rep == 1:
            return None
        log_mean = torch.stack([v.abs().clamp_min(1e-12).log() for v in vectors]).mean(0)
        sign = torch.where(first < 0, -1.0, 1.0).to(log_mean.dtype)
        return sign * self.reduce(log_mean, lambda t: t.mean(1)).exp()

    def reduce(self, v: torch.Tensor, over_heads) -> torch.Tensor:
        """A consumer-side vector [rep · n] reduced to the producer's [n] over the heads sharing a key-value head."""
        if self.rep == 1:
            return v
        return over_heads(v.reshape(-1, self.rep, self.head_dim)).reshape(-1)

    def expand(self, c: torch.Tensor) -> torch.Tensor:
        """The producer's vector as the consumers' input channels see it."""
        if self.rep == 1:
            return c
        return c.reshape(-1, 1, self.head_dim).expand(-1, self.rep, -1).reshape(-1)

    def fold(self, adapter, layer: nn.Module, c: torch.Tensor) -> float | None:
        """Fold c into the producer; the weight SQNR (dB) when the producer's weight had to be re-rounded."""
        if self.norm:
            fold_scales_into_norm_(adapter.norm(layer, self.producer), adapter.norm_kind, c)
            return None
        return _divide_output_rows_(adapter.linears(layer)[self.producer], c)


def _fold_groups(adapter, layer: nn.Module) -> list[FoldGroup]:
    """The layer's producers that can absorb a smoothing vector: the adapter's fold pairs whose producer is a norm or
    a quantized linear, and v → o under grouped-query attention (the adapter leaves it out: not every vector folds)."""
    lin = adapter.linears(layer)
    groups = [FoldGroup(p.producer, p.consumers, p.producer_is_norm) for p in adapter.fold_pairs(layer)
              if p.producer_is_norm or isinstance(lin[p.producer], QuantLinear)]
    v, o = lin["v"], lin["o"]
    if (isinstance(v, QuantLinear) and v.out_features != o.in_features and o.in_features % v.out_features == 0
            and v.out_features % adapter.head_dim() == 0):
        groups.append(FoldGroup("v", ("o",), False, o.in_features // v.out_features, adapter.head_dim()))
    return groups


def _without_smooth(path: ModalityPath) -> ModalityPath:
    new = ModalityPath(None, path.weight, path.L1, path.L2, path.act_scale)
    return new.to(path.act_scale.device) if path.act_scale is not None else new
