"""What a norm computes, and the folds that are exact for it (pure functions of modules and tensors).

Smoothing divides a producer's output by s and multiplies the consumers' input columns by s, so that
Y = (X / s)(diag(s) W) = X W. The division is exact only if it is written for the producer's formula:

- ``rms``           y = x / rms(x) · w            (Llama, Qwen2, Qwen3): w ← w / s
- ``rms_one_plus``  y = x / rms(x) · (1 + w)      (Gemma 1-3):           w ← (1 + w) / s − 1
- ``layer``         y = (x − μ) / σ · w + b       (LayerNorm):           w ← w / s, b ← b / s
- a linear producer (v→o, up→down):                                      rows of W and b ← / s
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn as nn


class NormKind(str, Enum):
    rms = "rms"
    rms_one_plus = "rms_one_plus"
    layer = "layer"


def norm_scale(norm: nn.Module, kind: NormKind) -> torch.Tensor:
    """The per-channel factor the norm multiplies by: w, or 1 + w for ``rms_one_plus`` (float32, [D])."""
    w = norm.weight.detach().float()
    return 1.0 + w if kind == NormKind.rms_one_plus else w


@torch.no_grad()
def set_norm_scale_(norm: nn.Module, kind: NormKind, scale: torch.Tensor) -> None:
    """Make the norm multiply by ``scale`` [D] (inverse of :func:`norm_scale`)."""
    w = scale - 1.0 if kind == NormKind.rms_one_plus else scale
    norm.weight.copy_(w.to(norm.weight.dtype))


@torch.no_grad()
def fold_scales_into_norm_(norm: nn.Module, kind: NormKind, s: torch.Tensor) -> None:
    """Divide the norm's output by s [D] exactly for its kind (weight, and bias for LayerNorm)."""
    s = s.to(norm.weight.device).float()
    set_norm_scale_(norm, kind, norm_scale(norm, kind) / s)
    bias = getattr(norm, "bias", None)
    if bias is not None:
        if kind != NormKind.layer:
            raise ValueError(f"a {kind.value} norm with a bias: declare it as NormKind.layer")
        bias.copy_((bias.float() / s).to(bias.dtype))


@torch.no_grad()
def fold_scales_into_linear_output_(linear: nn.Module, s: torch.Tensor) -> None:
    """Divide a linear's output channels by s [out]: W [out, in] rows and bias / s."""
    s = s.to(linear.weight.device).float()
    linear.weight.copy_((linear.weight.float() / s[:, None]).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.float() / s).to(linear.bias.dtype))


@torch.no_grad()
def scale_linear_inputs_(linear: nn.Module, s: torch.Tensor) -> None:
    """Multiply a linear's input columns by s [in]: W ← W diag(s) (the consumer side of every fold)."""
    s = s.to(linear.weight.device).float()
    linear.weight.copy_((linear.weight.float() * s[None, :]).to(linear.weight.dtype))


@torch.no_grad()
def probe_norm_kind(norm: nn.Module, dim: int | None = None) -> NormKind | None:
    """Which formula the module computes, found by running it (tests check each adapter's declaration)."""
    dim = dim or norm.weight.numel()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, dim, generator=g)
    saved = {n: p.detach().clone() for n, p in norm.named_parameters()}
    try:
        norm.weight.copy_(torch.rand(dim, generator=g) + 0.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(dim, generator=g))
        y = norm(x.to(norm.weight.dtype)).float()
        w = norm.weight.float()
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
        rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        bias = getattr(norm, "bias", None)
        layer = torch.nn.functional.layer_norm(x, (dim,), w, None if bias is None else bias.float(), eps)
        candidates = {NormKind.rms: rms * w, NormKind.rms_one_plus: rms * (1 + w), NormKind.layer: layer}
        for kind, ref in candidates.items():
            if torch.allclose(y, ref, atol=1e-4, rtol=1e-4):
                return kind
        return None
    finally:
        for n, p in norm.named_parameters():
            p.copy_(saved[n])
