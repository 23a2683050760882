"""A deployed linear's weight as integers: the codes of its recorded grid, and the uniform groups a checkpoint
format needs.

:class:`~masquant.quant.linear.QuantLinear` keeps its grid (``weight_scale``, ``weight_zero`` [out, n_groups],
``weight_g_idx``); the codes are recovered from the deployed weight on that grid and checked: dequantizing them
must give the deployed weight bit for bit, or the export stops (a weight that is not on its recorded grid).

Groups. masquant's groups are consecutive runs of ``g`` columns with a smaller last group when the width is not
a multiple (576 = 4 × 128 + 64); compressed-tensors needs one group size that divides the width. Both are met by
``g' = gcd(g, width)``: each of our groups is ``g/g'`` (or ``r/g'``) format groups carrying the same scale and zero
point, so the checkpoint dequantizes to the same weight (:func:`uniform_groups`).
"""

from __future__ import annotations

import math

import torch

from masquant.errors import ConfigError
from masquant.quant.formats import FloatGrid
from masquant.quant.grid import group_slices
from masquant.quant.linear import QuantLinear
from masquant.quant.quantizer import weight_grid_of


def column_groups(lin: QuantLinear) -> torch.Tensor:
    """The group index of every input column [in] (long): ``weight_g_idx``, or the consecutive groups."""
    if lin.weight_g_idx is not None:
        return lin.weight_g_idx.long().cpu()
    n_groups = lin.weight_scale.shape[1]
    in_f = lin.in_features
    if n_groups == 1:
        return torch.zeros(in_f, dtype=torch.long)
    size = group_size_of(lin)
    idx = torch.empty(in_f, dtype=torch.long)
    for k, cols in enumerate(group_slices(in_f, size)):
        idx[cols] = k
    return idx


def group_size_of(lin: QuantLinear) -> int:
    """Columns per group (the last may be smaller); ``in_features`` per channel or per tensor."""
    scheme = lin.scheme
    return scheme.w_group_size if scheme.w_granularity == "group" else lin.in_features


def _per_column(t: torch.Tensor, lin: QuantLinear) -> torch.Tensor:
    """[out or 1, n_groups] -> [out or 1, in]: each column's group value."""
    return t[:, column_groups(lin).to(t.device)]


def integer_codes(lin: QuantLinear) -> torch.Tensor:
    """The deployed weight's codes on its grid [out, in] (float: integer-valued, or a float format's element values),
    checked exactly."""
    if lin.weight_scale is None:
        raise ConfigError(f"export: a {lin.scheme.tag} linear ({lin.out_features}x{lin.in_features}) has no recorded "
                          "grid (its weight was quantized by code that does not report its scales); it cannot be "
                          "written as integers")
    W = lin.weight.detach().float()
    scale = _per_column(lin.weight_scale.float(), lin)
    zero = None if lin.weight_zero is None else _per_column(lin.weight_zero.float(), lin)
    grid = weight_grid_of(lin.scheme)
    codes = grid.round(W / scale) if isinstance(grid, FloatGrid) else torch.round(W / scale)
    if zero is not None:
        codes = codes + zero
    if float(codes.min()) < grid.qmin or float(codes.max()) > grid.qmax:
        raise ConfigError(f"export: codes outside [{grid.qmin}, {grid.qmax}] for a {lin.scheme.tag} linear: its weight "
                          "is not on its recorded grid")
    back = dequantize_codes(lin, codes).to(lin.weight.dtype)
    if not torch.equal(back, lin.weight.detach()):
        bad = (back != lin.weight.detach()).sum().item()
        raise ConfigError(f"export: {bad} weights of a {lin.scheme.tag} linear are not (code - zero) x scale on its "
                          "recorded grid; the integers would not reproduce the deployed model")
    return codes


def dequantize_codes(lin: QuantLinear, codes: torch.Tensor) -> torch.Tensor:
    """(codes - zero) · scale per column (float32, the fake quantizer's arithmetic)."""
    scale = _per_column(lin.weight_scale.float(), lin)
    if lin.weight_zero is None:
        return codes * scale
    return (codes - _per_column(lin.weight_zero.float(), lin)) * scale


def format_group_size(lin: QuantLinear) -> int:
    """The largest group size that divides the width and each of our groups: gcd(g, width) (module doc)."""
    g = min(lin.scheme.w_group_size, lin.in_features)
    return g if lin.weight_g_idx is not None else math.gcd(g, lin.in_features)


def uniform_groups(lin: QuantLinear, size: int | None = None) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """(group size g', scale, zero) [out, in / g'] with one group size g' that divides the width (module doc);
    ``size`` (a divisor of :func:`format_group_size`) makes several linears share one (a checkpoint's loaders take
    one group size per scheme). Per channel and per tensor: the recorded grid. Groups in act order (``weight_g_idx``)
    are refused: the format no longer has a group index."""
    in_f = lin.in_features
    scale, zero = lin.weight_scale.float(), None if lin.weight_zero is None else lin.weight_zero.float()
    if lin.scheme.w_granularity != "group":
        return in_f, scale, zero
    g = min(lin.scheme.w_group_size, in_f)
    if lin.weight_g_idx is not None:
        raise ConfigError("export: act-order GPTQ groups that follow the permutation (a group index) cannot be "
                          "written: compressed-tensors 0.20 removed actorder='group'; quantize with "
                          "quant.gptq_static_groups=true (groups in column order, actorder='weight') or "
                          "quant.gptq_act_order=false")
    g2 = format_group_size(lin) if size is None else size
    if format_group_size(lin) % g2:
        raise ValueError(f"group size {g2} does not divide gcd({g}, {in_f})")
    if g2 == g:
        return g, scale, zero
    cols = torch.arange(0, in_f, g2)  # the first column of each format group
    idx = column_groups(lin)[cols].to(scale.device)
    return g2, scale[:, idx], None if zero is None else zero[:, idx]
