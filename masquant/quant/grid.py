"""The grids every quantizer rounds to: fake quantization of weights and activations, RTN, GPTQ, the MSE clip search
and AWQ's clip search all go through the functions here. Pure tensor functions.

A grid is an :class:`IntGrid` (below) or a :class:`~masquant.quant.formats.FloatGrid` (FP8 E4M3, MXFP4, NVFP4): the
functions here take either, so every method that rounds through them works with every format. A float grid has no
zero point; its scale follows the format's rule and its codes are the nearest float-format values.

Grids (:class:`IntGrid`), b bits:

  symmetric narrow  q ∈ [-(2^(b-1)-1), 2^(b-1)-1], scale = r·absmax / (2^(b-1)-1)  (the paper's, official MASQuant)
  symmetric full    q ∈ [-2^(b-1), 2^(b-1)-1],     scale = r·absmax / ((2^b-1)/2)  (compressed-tensors / vLLM kernels)
  asymmetric        q ∈ [0, 2^b-1], range [r·min(x, 0), r·max(x, 0)], scale = range / (2^b-1), integer zero point

r is the clip ratio (1 = the full range). QuaRot's and GPTQ's own symmetric weight grid is a third one: scale
absmax/(2^(b-1)-1) with codes clamped to [-2^(b-1), 2^(b-1)-1]; "narrow" here never produces -2^(b-1). On the full
grid ±absmax/scale = ±(2^b-1)/2 is a rounding tie: +absmax clamps to 2^(b-1)-1, -absmax rounds half-to-even to
-2^(b-1) (or to -2^(b-1)+1 when float rounding lands just inside; the same error either way).

Q(x) = (clamp(round(x / scale) + zero, qmin, qmax) - zero) · scale. With ``ste=True`` the rounding is the
straight-through estimator and the scale keeps its gradient, so gradients reach the input and the range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from masquant.quant.formats import FloatGrid

QRANGES = ("narrow", "full")
EPS = 1e-8  # the smallest scale: an all-zero row quantizes to 0


@dataclass(frozen=True)
class IntGrid:
    """The integer grid of a b-bit quantizer (see the module docstring)."""

    bits: int
    symmetric: bool = True
    qrange: str = "narrow"  # symmetric only; the asymmetric grid is always [0, 2^b - 1]

    def __post_init__(self) -> None:
        object.__setattr__(self, "qrange", str(getattr(self.qrange, "value", self.qrange)))
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bits={self.bits}: must be in [2, 16]")
        if self.qrange not in QRANGES:
            raise ValueError(f"qrange={self.qrange!r}: valid choices are {QRANGES}")

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) if self.qrange == "full" else -(2 ** (self.bits - 1) - 1)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def half_levels(self) -> float:
        """absmax / scale of a symmetric grid: 2^(b-1)-1 (narrow) or (2^b-1)/2 (full)."""
        return (2**self.bits - 1) / 2 if self.qrange == "full" else float(2 ** (self.bits - 1) - 1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return (x.round() - x).detach() + x


def _round(x: torch.Tensor, ste: bool) -> torch.Tensor:
    return round_ste(x) if ste else torch.round(x)


def _reduce(x: torch.Tensor, fn: str, dim) -> torch.Tensor:
    return getattr(x, fn)() if dim is None else getattr(x, fn)(dim=dim, keepdim=True)


Grid = IntGrid | FloatGrid


def symmetric_scale(absmax: torch.Tensor, grid: Grid, ratio: float = 1.0) -> torch.Tensor:
    """scale = ratio · absmax / half_levels (floored at EPS), for absmax of any shape; a float grid's own rule."""
    if isinstance(grid, FloatGrid):
        return grid.scale(absmax * ratio if ratio != 1.0 else absmax)
    return (absmax * ratio / grid.half_levels).clamp(min=EPS)


def range_scale_zero(x: torch.Tensor, grid: Grid, ratio: float = 1.0, dim: int | tuple | None = 1,
                     ste: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and integer zero point of ``x`` reduced over ``dim`` (kept; None = the whole tensor), with the range
    shrunk by ``ratio``. The zero point is None on a symmetric grid (every float grid)."""
    if isinstance(grid, FloatGrid):
        absmax = _reduce(x.abs(), "amax", dim)
        return grid.scale(absmax * ratio if ratio != 1.0 else absmax, ste), None
    if grid.symmetric:
        return symmetric_scale(_reduce(x.abs(), "amax", dim), grid, ratio), None
    xmin = (_reduce(x, "amin", dim) * ratio).clamp(max=0)
    xmax = (_reduce(x, "amax", dim) * ratio).clamp(min=0)
    scale = ((xmax - xmin) / grid.qmax).clamp(min=EPS)
    return scale, _round(-xmin / scale, ste)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, grid: Grid,
                   ste: bool = False) -> torch.Tensor:
    """Integer codes clamp(round(x / scale) + zero, qmin, qmax) (float tensor, same shape as x); on a float grid the
    nearest element-format value of clamp(x / scale, qmin, qmax)."""
    if isinstance(grid, FloatGrid):
        v = (x / scale).clamp(grid.qmin, grid.qmax)
        q = grid.round(v)
        return (q - v).detach() + v if ste else q
    q = _round(x / scale, ste)
    return torch.clamp(q if zero is None else q + zero, grid.qmin, grid.qmax)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """(codes - zero) · scale."""
    return codes * scale if zero is None else (codes - zero) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, grid: Grid,
                  ste: bool = False) -> torch.Tensor:
    """Quantize then dequantize ``x`` on the grid with the given scale and zero (broadcast against x)."""
    return dequantize(quantize_codes(x, scale, zero, grid, ste), scale, zero)


def fake_quantize_range(x: torch.Tensor, grid: Grid, ratio: float = 1.0, dim: int | tuple | None = -1,
                        ste: bool = False) -> torch.Tensor:
    """Fake quantization of ``x`` with the range of each slice over ``dim`` (None = the whole tensor).

    With ``ste`` on a symmetric grid and ``x`` needing a gradient, the fused :class:`SymFakeQuantSTE` computes the
    same values and gradients as the composed autograd form (:func:`fake_quantize_range_autograd`) up to float
    rounding, with about a third of the passes over ``x`` (MAS learning spends most of its time here)."""
    if ste and isinstance(grid, IntGrid) and grid.symmetric and x.requires_grad and torch.is_grad_enabled():
        return SymFakeQuantSTE.apply(x, grid, ratio, dim)
    return fake_quantize_range_autograd(x, grid, ratio, dim, ste)


def fake_quantize_range_autograd(x: torch.Tensor, grid: Grid, ratio: float = 1.0, dim: int | tuple | None = -1,
                                 ste: bool = False) -> torch.Tensor:
    """:func:`fake_quantize_range` composed of autograd operations (the reference of the fused STE form)."""
    scale, zero = range_scale_zero(x, grid, ratio, dim, ste)
    return fake_quantize(x, scale, zero, grid, ste)


def sym_abs_max_scale(x: torch.Tensor, grid: IntGrid, ratio: float = 1.0, dim: int | tuple | None = -1):
    """(a, raw, scale) of :class:`SymFakeQuantSTE`: a = max|x| over ``dim`` (kept), raw = ratio·a / h (as
    :func:`symmetric_scale`: the same float rounding) and scale = max(raw, EPS). No gradient."""
    a = _reduce(x.abs(), "amax", dim)
    raw = a * ratio / grid.half_levels
    return a, raw, raw.clamp(min=EPS)


def sym_codes(x: torch.Tensor, scale: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """clamp(round(x / scale), qmin, qmax) (a new float tensor): the integer codes of a symmetric grid."""
    return torch.div(x, scale).round_().clamp_(grid.qmin, grid.qmax)


class SymFakeQuantSTE(torch.autograd.Function):
    """Symmetric abs-max fake quantization with the straight-through estimator, forward and backward fused.

    Forward (as :func:`fake_quantize_range_autograd`): a = max|x| over ``dim``, scale = max(ratio·a / h, EPS),
    q = clamp(round(x / scale), qmin, qmax), y = q·scale. Backward, the gradient autograd derives from that form
    (rounding = identity, the range keeps its gradient):

      g_scale = Σ_dim g·(q − m·x/scale)    with m = [qmin ≤ round(x/scale) ≤ qmax] (clamp's pass-through)
      g_x     = g·m + sgn(x)·[|x| = a]·g_scale·(ratio/h)·[ratio·a/h ≥ EPS] / #{|x| = a}

    (the abs-max's gradient is shared among ties, as ``amax``'s is). Only ``x`` and ``scale`` are kept.
    """

    @staticmethod
    def forward(ctx, x, grid: IntGrid, ratio: float, dim):
        with torch.no_grad():
            a, raw, scale = sym_abs_max_scale(x, grid, ratio, dim)
            y = sym_codes(x, scale, grid).mul_(scale)
        ctx.save_for_backward(x, scale, a, raw >= EPS)
        ctx.grid, ctx.ratio, ctx.dim = grid, ratio, dim
        return y

    @staticmethod
    def backward(ctx, g):
        x, scale, a, live = ctx.saved_tensors
        return sym_fake_quant_grad(g, x, scale, a, live, ctx.grid, ctx.ratio, ctx.dim), None, None, None


def sym_fake_quant_grad(g: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, a: torch.Tensor, live: torch.Tensor,
                        grid: IntGrid, ratio: float, dim) -> torch.Tensor:
    """dL/dx of :class:`SymFakeQuantSTE` from dL/dy ``g`` and what its forward kept (x, scale, a, live = raw ≥ EPS)."""
    u = x / scale
    r = u.round()
    # float reductions and in-place float comparisons: on CPU, ops with bool outputs cost several float passes
    if float(r.amin()) >= grid.qmin and float(r.amax()) <= grid.qmax:  # the usual case (nothing clips)
        gx = g.clone()
        t = r.sub_(u)  # q − x/scale
    else:
        inside = (r >= grid.qmin) & (r <= grid.qmax)
        gx = g * inside
        t = r.clamp_(grid.qmin, grid.qmax).sub_(u * inside)
    g_scale = _reduce(t.mul_(g), "sum", dim)
    g_a = g_scale * live * (ratio / grid.half_levels)
    ties = x.abs().eq_(a)  # 1.0 where |x| is the slice's abs-max, else 0.0
    count = _reduce(ties, "sum", dim)
    gx.addcmul_(ties.mul_(x.sign()), g_a / count)
    return gx


def mse_clip_scale_zero(W: torch.Tensor, grid: Grid, grid_points: int = 100, maxshrink: float = 0.8,
                        norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of W [rows, cols], the range shrink p = 1 - i/grid_points (i < maxshrink·grid_points) minimising
    Σ|w - Q(w)|^norm (the official GPTQ / QuaRot search: 80 factors 1, 0.99, ..., 0.21)."""
    best = torch.full((W.shape[0], 1), float("inf"), dtype=W.dtype, device=W.device)
    best_scale, best_zero = range_scale_zero(W, grid)
    for i in range(int(maxshrink * grid_points)):
        scale, zero = range_scale_zero(W, grid, 1 - i / grid_points)
        err = (fake_quantize(W, scale, zero, grid) - W).abs().pow(norm).sum(dim=1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def find_scale_zero(W: torch.Tensor, grid: Grid, mse_clip: bool = False,
                    ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero of each row of W [rows, cols]: the range shrunk by ``ratio``, or the MSE-clipped range."""
    return mse_clip_scale_zero(W, grid) if mse_clip else range_scale_zero(W, grid, ratio)


def group_slices(width: int, group_size: int) -> list[slice]:
    """Consecutive groups of ``group_size`` columns (0 = one group of every column); a smaller last group when
    ``width`` is not a multiple (its own scale over its columns; no padding)."""
    g = min(group_size, width) if group_size else width
    return [slice(j, min(j + g, width)) for j in range(0, width, g)]


def quantize_groups(W: torch.Tensor, group_size: int, fq) -> torch.Tensor:
    """Apply ``fq`` to groups of ``group_size`` input columns of W [out, in], reducing over the last dim.

    When ``in`` is not a multiple of the group size, the last group is smaller (its own scale over its
    ``in % group_size`` columns; no padding, so no column is rounded against zeros it does not have).
    Testbed widths 576 and 1536 with group 128: 4 full groups + one of 64 at 576.
    """
    out_f, in_f = W.shape
    g = min(group_size, in_f)
    full = (in_f // g) * g
    parts = [fq(W[:, :full].reshape(out_f, in_f // g, g)).reshape(out_f, full)]
    if full < in_f:
        parts.append(fq(W[:, full:].reshape(out_f, 1, in_f - full)).reshape(out_f, in_f - full))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def rtn_quantize(W: torch.Tensor, *, bits: int, symmetric: bool = True, group_size: int = 0, qrange: str = "narrow",
                 mse_clip: bool = False) -> torch.Tensor:
    """Round-to-nearest W [out, in] per output channel (group_size 0) or per group of inputs -> Wq, W's dtype;
    the range of each row of a group is its full range or, with ``mse_clip``, the MSE-clipped one."""
    return rtn_quantize_grid(W, bits=bits, symmetric=symmetric, group_size=group_size, qrange=qrange,
                             mse_clip=mse_clip)[0]


def rtn_quantize_grid(W: torch.Tensor, *, bits: int = 0, symmetric: bool = True, group_size: int = 0,
                      qrange: str = "narrow", mse_clip: bool = False, ratio: float = 1.0, grid: Grid | None = None):
    """:func:`rtn_quantize` and its grid: (Wq, scale, zero), scale and zero [out, n_groups] in the working
    precision (zero None on a symmetric grid); ``ratio`` shrinks each range (without ``mse_clip``). ``grid``
    (e.g. a float format's) replaces bits/symmetric/qrange; an NVFP4 grid takes its global scale from all of W."""
    grid = IntGrid(bits, symmetric, qrange) if grid is None else grid
    Wf = W.detach().to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    if isinstance(grid, FloatGrid) and grid.global_scale is None:
        grid = grid.bind(Wf)
    Q = torch.empty_like(Wf)
    scales, zeros = [], []
    for cols in group_slices(Wf.shape[1], group_size):
        scale, zero = find_scale_zero(Wf[:, cols], grid, mse_clip, ratio)
        Q[:, cols] = fake_quantize(Wf[:, cols], scale, zero, grid)
        scales.append(scale)
        zeros.append(zero)
    return Q.to(W.dtype), torch.cat(scales, 1), None if zeros[0] is None else torch.cat(zeros, 1)
