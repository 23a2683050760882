"""Fake quantization (quantize -> dequantize) of weights and activations as a :class:`QuantScheme` says, on the
grids of :mod:`masquant.quant.grid` (integer) and :mod:`masquant.quant.formats` (FP8 E4M3, MXFP4, NVFP4). Pure
functions of tensors.

Weights: per output channel, per group of input columns (a smaller last group when the width is not a multiple)
or per tensor; MXFP4/NVFP4 in blocks of 32/16 inputs. Activations: dynamic per token or per tensor, or a static
per-tensor scale calibrated offline; MXFP4/NVFP4 in blocks of 32/16 channels of each token (NVFP4's global scale
per tensor or per token, or calibrated). With ``ste=True`` rounding uses the straight-through estimator and the
scale keeps its gradient (MAS learning).
"""

from __future__ import annotations

import torch

from masquant.quant.formats import FloatGrid, nvfp4_global_scale
from masquant.quant.grid import (
    Grid,
    IntGrid,
    fake_quantize,
    fake_quantize_range,
    quantize_groups,
    range_scale_zero,
    round_ste,
    rtn_quantize_grid,
    symmetric_scale,
)
from masquant.quant.scheme import FORMAT_BLOCK, QuantScheme

__all__ = ["fake_quant_asym", "fake_quant_sym", "quantize_activation", "quantize_groups", "quantize_weight",
           "quantize_weight_grid", "round_ste", "sqnr_db", "static_act_scale", "weight_grid_of", "act_grid_of",
           "weight_global_scale"]


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
    """Fake-quantize a weight W [out, in] per output channel, per group (block) of inputs, or per tensor."""
    if not scheme.quantize_weights:
        return W
    grid = weight_grid_of(scheme, W)
    ratio = scheme.w_clip_ratio
    if scheme.w_granularity == "channel":
        return fake_quantize_range(W, grid, ratio, 1, ste)
    if scheme.w_granularity == "tensor":
        return fake_quantize_range(W, grid, ratio, None, ste)
    return quantize_groups(W, scheme.w_group_size, lambda G: fake_quantize_range(G, grid, ratio, -1, ste))


def weight_grid_of(scheme: QuantScheme, W: torch.Tensor | None = None) -> Grid:
    """The grid of the scheme's weights: integer, or the float format's (NVFP4: its global scale from all of ``W``
    when given)."""
    if scheme.w_int:
        return IntGrid(scheme.w_bits, scheme.w_symmetric, scheme.int_range)
    grid = FloatGrid(scheme.w_format.value, scheme.fp4_rounding.value, scheme.mx_scale_rule.value)
    return grid if W is None else grid.bind(W)


def weight_global_scale(W: torch.Tensor, scheme: QuantScheme) -> torch.Tensor | None:
    """NVFP4: the global scale g [1] (float32) the weight ``W`` is quantized with (from all of W); else None."""
    if scheme.w_format != "nvfp4" or not scheme.quantize_weights:
        return None
    return weight_grid_of(scheme, W.float()).global_scale.reshape(1)


def act_grid_of(scheme: QuantScheme) -> Grid:
    """The grid of the scheme's activations (NVFP4: unbound; :func:`quantize_activation` sets the global scale)."""
    if scheme.a_int:
        return IntGrid(scheme.a_bits, scheme.a_symmetric, scheme.int_range)
    return FloatGrid(scheme.a_format.value, scheme.fp4_rounding.value, scheme.mx_scale_rule.value)


@torch.no_grad()
def quantize_weight_grid(W: torch.Tensor, scheme: QuantScheme
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`quantize_weight` (no STE) and the grid it rounded on: (W_q, scale, zero), scale and zero
    [out, n_groups] (per tensor: [1, 1]; zero None on a symmetric grid); the groups are
    :func:`~masquant.quant.grid.group_slices` of the input columns. The same float operations as
    :func:`quantize_weight`, so W_q is equal bit for bit (an export writes these integers and scales)."""
    if scheme.w_granularity == "tensor":
        grid = weight_grid_of(scheme, W)
        scale, zero = range_scale_zero(W, grid, scheme.w_clip_ratio, dim=None)
        scale = scale.reshape(1, 1)
        zero = None if zero is None else zero.reshape(1, 1)
        return fake_quantize(W, scale, zero, grid), scale, zero
    return rtn_quantize_grid(W, group_size=scheme.w_group_size if scheme.w_granularity == "group" else 0,
                             ratio=scheme.w_clip_ratio, grid=weight_grid_of(scheme, W))


def quantize_activation(
    X: torch.Tensor,
    scheme: QuantScheme,
    ste: bool = False,
    static_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize activations X [..., D]: dynamic per token / per tensor, or static per tensor; MXFP4/NVFP4 in
    blocks along D (NVFP4: ``static_scale`` is the calibrated global scale, else the global scale is each call's,
    per tensor or per token as quant.a_granularity says)."""
    if not scheme.quantize_acts:
        return X
    if scheme.a_format in ("mxfp4", "nvfp4"):
        return _quantize_act_blocks(X, scheme, ste, static_scale)
    grid = act_grid_of(scheme)
    if static_scale is not None:
        if not scheme.a_symmetric:
            raise ValueError("static activation scales are symmetric only")
        return fake_quantize(X, static_scale, None, grid, ste)
    dim = -1 if scheme.a_granularity == "token" else None
    return fake_quantize_range(X, grid, scheme.a_clip_ratio, dim, ste)


def _quantize_act_blocks(X: torch.Tensor, scheme: QuantScheme, ste: bool, static_scale: torch.Tensor | None):
    """MXFP4 / NVFP4 activations: blocks of 32 / 16 channels of each token (a smaller last block when D is not a
    multiple), each with its own scale from its abs-max."""
    grid = act_grid_of(scheme)
    D = X.shape[-1]
    X2 = X.reshape(-1, D)
    if scheme.a_format == "nvfp4":
        if static_scale is not None:
            g = static_scale.reshape(1)
        elif scheme.a_granularity == "tensor":
            g = nvfp4_global_scale(X2.detach().abs().amax())
        else:  # per token: [N, 1, 1] against the blocks' [N, n_blocks, 1]
            g = nvfp4_global_scale(X2.detach().abs().amax(dim=-1, keepdim=True)).unsqueeze(-1)
        grid = grid.with_global_scale(g)
    block = FORMAT_BLOCK[scheme.a_format.value]
    out = quantize_groups(X2, block, lambda G: fake_quantize_range(G, grid, scheme.a_clip_ratio, -1, ste))
    return out.reshape(X.shape)


def static_act_scale(absmax: torch.Tensor, bits: int, clip_ratio: float = 1.0, int_range: str = "narrow",
                     a_format: str = "int") -> torch.Tensor:
    """Static per-tensor scale from a calibrated abs-max: symmetric integer or FP8 E4M3 (clip_ratio · absmax / qmax);
    for NVFP4 the calibrated global scale 448·6 / absmax (the blocks stay dynamic, clipped by clip_ratio)."""
    fmt = getattr(a_format, "value", a_format)
    if fmt == "int":
        return symmetric_scale(absmax, IntGrid(bits, True, int_range), clip_ratio)
    if fmt == "fp8_e4m3":
        return symmetric_scale(absmax, FloatGrid(fmt), clip_ratio)
    if fmt == "nvfp4":
        return nvfp4_global_scale(absmax).reshape(1)
    raise ValueError(f"quant.a_format={fmt} has no static per-tensor scale (its block scales come from each input); "
                     "valid static formats: int, fp8_e4m3, nvfp4")


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|ref|^2 / |ref - approx|^2) in dB."""
    signal = reference.double().pow(2).sum()
    noise = (reference.double() - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
