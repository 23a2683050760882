"""Fake quantizers (quantize -> dequantize). Pure functions of tensors.

Symmetric grid, ``int_range="narrow"`` (the paper's and the official MASQuant code's, default): integers in
[-(2^(b-1)-1), 2^(b-1)-1], scale = clip * absmax / (2^(b-1)-1). ``int_range="full"`` (compressed-tensors,
the deployment kernels): integers in [-2^(b-1), 2^(b-1)-1], scale = clip * absmax / ((2^b-1)/2), e.g.
absmax / 7.5 at 4 bits, so the grid spends its extra level.
Asymmetric grid: integers in [0, 2^b-1] with a zero point, scale = clip * (max - min) / (2^b - 1).
With ``ste=True`` rounding uses the straight-through estimator and the scale keeps its gradient,
so gradients reach both the input and the dynamic range (as MAS learning needs).
"""

from __future__ import annotations

import torch

from masquant.quant.scheme import QuantScheme

_EPS = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return (x.round() - x).detach() + x


def _round(x: torch.Tensor, ste: bool) -> torch.Tensor:
    return round_ste(x) if ste else torch.round(x)


def sym_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def sym_grid(bits: int, int_range: str = "narrow") -> tuple[int, int, float]:
    """(lowest code, highest code, absmax divisor) of the symmetric grid."""
    qmax = sym_qmax(bits)
    if str(getattr(int_range, "value", int_range)) == "full":
        return -(qmax + 1), qmax, (2**bits - 1) / 2
    return -qmax, qmax, float(qmax)


def fake_quant_sym(
    x: torch.Tensor,
    bits: int,
    dim: int | tuple[int, ...] | None = -1,
    clip_ratio: float = 1.0,
    ste: bool = False,
    scale: torch.Tensor | None = None,
    int_range: str = "narrow",
) -> torch.Tensor:
    """Symmetric abs-max fake quantization, reducing over ``dim`` (None = whole tensor)."""
    qmin, qmax, divisor = sym_grid(bits, int_range)
    if scale is None:
        amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
        scale = (amax * clip_ratio / divisor).clamp(min=_EPS)
    q = torch.clamp(_round(x / scale, ste), qmin, qmax)
    return q * scale


def fake_quant_asym(
    x: torch.Tensor,
    bits: int,
    dim: int | tuple[int, ...] | None = -1,
    clip_ratio: float = 1.0,
    ste: bool = False,
) -> torch.Tensor:
    """Asymmetric min-max fake quantization with an integer zero point."""
    qmax = 2**bits - 1
    if dim is None:
        xmin, xmax = x.amin(), x.amax()
    else:
        xmin, xmax = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    xmin = (xmin * clip_ratio).clamp(max=0)
    xmax = (xmax * clip_ratio).clamp(min=0)
    scale = ((xmax - xmin) / qmax).clamp(min=_EPS)
    zero = _round(-xmin / scale, ste)
    q = torch.clamp(_round(x / scale, ste) + zero, 0, qmax)
    return (q - zero) * scale


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
    return (absmax * clip_ratio / sym_grid(bits, int_range)[2]).clamp(min=_EPS)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|ref|^2 / |ref - approx|^2) in dB."""
    signal = reference.double().pow(2).sum()
    noise = (reference.double() - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
