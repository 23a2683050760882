"""Fake quantization (quantize -> dequantize) of weights and activations as a :class:`QuantScheme` says, on the
grids of :mod:`masquant.quant.grid`. Pure functions of tensors.

Weights: per output channel, per group of input columns (a smaller last group when the width is not a multiple)
or per tensor. Activations: dynamic per token or per tensor, or a static per-tensor scale calibrated offline.
With ``ste=True`` rounding uses the straight-through estimator and the scale keeps its gradient (MAS learning).
"""

from __future__ import annotations

import torch

from masquant.quant.grid import (
    IntGrid,
    fake_quantize,
    fake_quantize_range,
    quantize_groups,
    range_scale_zero,
    round_ste,
    rtn_quantize_grid,
    symmetric_scale,
)
from masquant.quant.scheme import QuantScheme

__all__ = ["fake_quant_asym", "fake_quant_sym", "quantize_activation", "quantize_groups", "quantize_weight",
           "quantize_weight_grid", "round_ste", "sqnr_db", "static_act_scale", "weight_grid_of"]


def fake_quant_sym(
    x: torch.Tensor,
    bits: int,
    dim: int | tuple[int, ...] | None = -1,
    clip_ratio: float = 1.0,
    ste: bool = False,
    scale: torch.Tensor | None = None,
    int_range: str = "narrow",
) -> torch.Tensor:
    """Symmetric abs-max fake quantization, reducing over ``dim`` (None = whole tensor), or with a given scale."""
    grid = IntGrid(bits, True, int_range)
    if scale is not None:
        return fake_quantize(x, scale, None, grid, ste)
    return fake_quantize_range(x, grid, clip_ratio, dim, ste)


def fake_quant_asym(
    x: torch.Tensor,
    bits: int,
    dim: int | tuple[int, ...] | None = -1,
    clip_ratio: float = 1.0,
    ste: bool = False,
) -> torch.Tensor:
    """Asymmetric min-max fake quantization with an integer zero point, reducing over ``dim``."""
    return fake_quantize_range(x, IntGrid(bits, False), clip_ratio, dim, ste)


def quantize_weight(W: torch.Tensor, scheme: QuantScheme, ste: bool = False) -> torch.Tensor:
    """Fake-quantize a weight W [out, in] per output channel, per group of inputs, or per tensor."""
    if not scheme.quantize_weights:
        return W
    fq = fake_quant_sym if scheme.w_symmetric else fake_quant_asym
    kw = dict(bits=scheme.w_bits, clip_ratio=scheme.w_clip_ratio, ste=ste)
    if scheme.w_symmetric:
        kw["int_range"] = scheme.int_range
    if scheme.w_granularity == "channel":
        return fq(W, dim=1, **kw)
    if scheme.w_granularity == "tensor":
        return fq(W, dim=None, **kw)
    return quantize_groups(W, scheme.w_group_size, lambda G: fq(G, dim=-1, **kw))


def weight_grid_of(scheme: QuantScheme) -> IntGrid:
    """The integer grid of the scheme's weights."""
    return IntGrid(scheme.w_bits, scheme.w_symmetric, scheme.int_range)


@torch.no_grad()
def quantize_weight_grid(W: torch.Tensor, scheme: QuantScheme
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`quantize_weight` (no STE) and the grid it rounded on: (W_q, scale, zero), scale and zero
    [out, n_groups] (per tensor: [1, 1]; zero None on a symmetric grid); the groups are
    :func:`~masquant.quant.grid.group_slices` of the input columns. The same float operations as
    :func:`quantize_weight`, so W_q is equal bit for bit (an export writes these integers and scales)."""
    if scheme.w_granularity == "tensor":
        grid = weight_grid_of(scheme)
        scale, zero = range_scale_zero(W, grid, scheme.w_clip_ratio, dim=None)
        scale = scale.reshape(1, 1)
        zero = None if zero is None else zero.reshape(1, 1)
        return fake_quantize(W, scale, zero, grid), scale, zero
    return rtn_quantize_grid(W, bits=scheme.w_bits, symmetric=scheme.w_symmetric,
                             group_size=scheme.w_group_size if scheme.w_granularity == "group" else 0,
                             qrange=scheme.int_range.value, ratio=scheme.w_clip_ratio)


def quantize_activation(
    X: torch.Tensor,
    scheme: QuantScheme,
    ste: bool = False,
    static_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize activations X [..., D]: dynamic per token / per tensor, or static per tensor."""
    if not scheme.quantize_acts:
        return X
    if static_scale is not None:
        if not scheme.a_symmetric:
            raise ValueError("static activation scales are symmetric only")
        return fake_quant_sym(X, scheme.a_bits, ste=ste, scale=static_scale, int_range=scheme.int_range)
    dim = -1 if scheme.a_granularity == "token" else None
    if scheme.a_symmetric:
        return fake_quant_sym(X, scheme.a_bits, dim=dim, clip_ratio=scheme.a_clip_ratio, ste=ste,
                              int_range=scheme.int_range)
    return fake_quant_asym(X, scheme.a_bits, dim=dim, clip_ratio=scheme.a_clip_ratio, ste=ste)


def static_act_scale(absmax: torch.Tensor, bits: int, clip_ratio: float = 1.0, int_range: str = "narrow") -> torch.Tensor:
    """Static symmetric per-tensor scale from a calibrated abs-max."""
    return symmetric_scale(absmax, IntGrid(bits, True, int_range), clip_ratio)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|ref|^2 / |ref - approx|^2) in dB."""
    signal = reference.double().pow(2).sum()
    noise = (reference.double() - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
