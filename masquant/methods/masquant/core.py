"""MASQuant mathematics: pure tensor functions, one per equation (docs/methods/masquant.md).

Layout convention. The paper writes Y = X W with W [D_in, D_out]; PyTorch stores
``weight`` as [D_out, D_in] and computes Y = X Wᵀ. Functions here take PyTorch weights ``W`` [out, in].
Smoothing "diag(s) W" (paper) therefore scales the weight's INPUT columns: ``W * s[None, :]``.
Low-rank factors follow the paper's layout, as ``ModalityPath`` applies them: L1 [in, r], L2 [r, out],
Y += (X / s) L1 L2. The CMC residual ΔW is returned in the paper's layout [in, out].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from masquant.quant.grid import EPS as EPS_GRID
from masquant.quant.grid import IntGrid, sym_abs_max_scale, sym_codes, sym_fake_quant_grad
from masquant.quant.quantizer import quantize_activation, quantize_weight
from masquant.quant.linear import scatter_rows
from masquant.quant.scheme import QuantScheme
# MAS step 2 (smoothing factors) is shared with SmoothQuant and lives in masquant.quant.smoothing.
from masquant.quant.smoothing import STAT_FLOOR, smooth_factors, weight_input_absmax  # noqa: F401 (re-exported)


# --- MAS -------------------------------------------------------------------------------------------
def smooth_weight(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """diag(s) W in the paper's layout = W [out, in] * s[None, :] in PyTorch layout -> [out, in]."""
    return W * s.to(W.dtype)[None, :]


@torch.no_grad()
def truncate_scales_(s: torch.Tensor, floor: float) -> torch.Tensor:
    """MAS step 3: |s| < floor -> sign(s)·floor (0 -> +floor), in place; s [in]."""
    small = s.abs() < floor
    if small.any():
        sign = torch.where(s < 0, -1.0, 1.0).to(s.dtype)
        s[small] = (sign * floor)[small]
    return s


def _smoothed_weight_quant_(W: torch.Tensor, s: torch.Tensor, bits: int, ratio: float, X: torch.Tensor,
                            M: torch.Tensor, Y: torch.Tensor, rescale: bool = True):
    """The forward of :class:`SmoothedWeightQuantSTE` into the buffers X, M, Y (each like W [out, in]).

    Returns y = Qw(diag(s) W) in Y (``rescale=False``: the integer codes round(u) there, y = codes·scale), e =
    round(u) − u in X, the abs-max mask M (1.0 at each row's abs-max, ties included), a_r [live_r] / #ties_r
    [out, 1] (the factors of the abs-max's gradient) and the scale [out, 1]."""
    h = float(2 ** (bits - 1) - 1)
    torch.mul(W, s[None, :], out=X)  # x
    torch.abs(X, out=M)
    a = M.amax(dim=1, keepdim=True)
    M.eq_(a)  # 1.0 at each row's abs-max (ties included), else 0.0
    count = M.sum(dim=1, keepdim=True)
    raw = a * ratio / h  # as symmetric_scale (the same float rounding)
    scale = raw.clamp(min=EPS_GRID)
    X.div_(scale)  # u
    torch.round(X, out=Y)
    torch.sub(Y, X, out=X)  # e = round(u) - u
    if rescale:
        Y.mul_(scale)  # y
    return Y, X, M, torch.where(raw >= EPS_GRID, a, 0.0).div_(count), scale


def _smoothed_weight_grad_s(g: torch.Tensor, W: torch.Tensor, s: torch.Tensor, e: torch.Tensor, M: torch.Tensor,
                            a_live: torch.Tensor, factor: float, in_place: bool = False) -> torch.Tensor:
    """g_s of :class:`SmoothedWeightQuantSTE` from g = dL/dy [out, in]; ``in_place`` overwrites g and e."""
    if in_place:
        v = e.mul_(g).sum(dim=1)
        g_s = g.mul_(W).sum(dim=0)
    else:
        v = (g * e).sum(dim=1)
        g_s = (g * W).sum(dim=0)
    v.mul_(a_live.reshape(-1)).mul_(factor)  # [out]: a_r · (ρ/h)[live] · Σ_k g_rk e_rk / #ties_r
    at_max = torch.mv(M.T, v)  # [in]: Σ_r M_rj a_r (...)_r
    return g_s.add_(torch.where(s != 0, at_max / s, 0.0))


class SmoothedWeightQuantSTE(torch.autograd.Function):
    """Qw(diag(s) W) with the straight-through estimator, per output channel on a symmetric narrow grid, fused.

    The values and the gradient w.r.t. ``s`` of ``quantize_weight(smooth_weight(W, s), scheme, ste=True)`` (the
    composed autograd form) up to float rounding; W [out, in] is a constant. With x = W ⊙ s, a_r = max_j |x_rj|,
    scale_r = max(ρ·a_r / h, EPS), u = x / scale, e = round(u) − u, y = round(u)·scale (rounding never clips
    here: |u| ≤ h and h is an integer on the narrow grid when ρ ≥ 1):

      g_s[j] = Σ_r g_rj W_rj + Σ_{r: |x_rj| = a_r} |W_rj| sgn(s_j) · (ρ/h)[ρ·a_r/h ≥ EPS] · Σ_k g_rk e_rk / #ties_r

    (the abs-max's share, split among ties as ``amax``'s gradient is). The abs-max's positions are kept as a float
    0/1 mask M (``eq_`` in place on |x|: on CPU a bool tensor, ``max`` with indices or a bool ``sum`` each cost
    5-10 float passes), and the second sum is computed as (Mᵀ (a ⊙ v))_j / s_j with v_r = (ρ/h)[live]·Σ_k g_rk e_rk
    / #ties_r, i.e. with |W_rj| = a_r / |s_j| at the abs-max (equal up to one rounding of the product; a column
    with s_j = 0 gets 0, as sgn(0) = 0 gives it in the composed form). Forward 8 float passes over [out, in],
    backward 5; e and M [out, in] are kept besides W. :class:`MASLinearSTE` is the same with the matmul inside.
    """

    @staticmethod
    def forward(ctx, W, s, bits: int, ratio: float):
        with torch.no_grad():
            y, e, mask, a_live, _ = _smoothed_weight_quant_(W, s, bits, ratio, torch.empty_like(W),
                                                            torch.empty_like(W), torch.empty_like(W))
        ctx.save_for_backward(W, s, e, mask, a_live)
        ctx.factor = ratio / float(2 ** (bits - 1) - 1)
        return y

    @staticmethod
    def backward(ctx, g):
        W, s, e, mask, a_live = ctx.saved_tensors
        return None, _smoothed_weight_grad_s(g, W, s, e, mask, a_live, ctx.factor), None, None


def _fresh(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(W), torch.empty_like(W), torch.empty_like(W)


class FusedBuffers:
    """The [out, in] buffers :class:`MASLinearSTE` reuses from one learning step to the next, per key (one linear's
    modality): y, e and the abs-max mask, kept for the backward, and a scratch for dL/dy shared by every key of one
    shape (backward nodes run one at a time). Allocating these afresh at every step costs page faults on CPU (about
    as much as the passes that fill them). A key whose backward has not run yet (the same linear called twice in
    one graph) gets fresh tensors, so a buffer is never overwritten while a graph needs it (autograd's version
    check of saved tensors would refuse it anyway)."""

    def __init__(self, scratch: dict | None = None):
        self.saved: dict = {}
        self.busy: set = set()
        self.scratch = {} if scratch is None else scratch  # share one dict among the linears of a layer

    def take(self, key, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if key in self.busy:
            return _fresh(W)
        bufs = self.saved.get(key)
        if bufs is None or bufs[0].shape != W.shape or bufs[0].dtype != W.dtype or bufs[0].device != W.device:
            bufs = self.saved[key] = _fresh(W)
        self.busy.add(key)
        return bufs

    def codes(self, key, W: torch.Tensor) -> torch.Tensor:
        """An int8 buffer like W for the weight's integer codes (only read in the forward)."""
        k = ("int8", key)
        buf = self.saved.get(k)
        if buf is None or buf.shape != W.shape or buf.device != W.device:
            buf = self.saved[k] = torch.empty(W.shape, dtype=torch.int8, device=W.device)
        return buf

    def release(self, key) -> None:
        self.busy.discard(key)

    def grad_scratch(self, W: torch.Tensor) -> torch.Tensor:
        k = (tuple(W.shape), W.dtype, W.device)
        if k not in self.scratch:
            self.scratch[k] = torch.empty_like(W)
        return self.scratch[k]


def int_matmul_applies(scheme: QuantScheme, X: torch.Tensor) -> bool:
    """Whether :class:`MASLinearSTE` computes Qa(X) Qw(W)ᵀ on the integer codes (``torch._int_mm``, int8 × int8 ->
    int32, exact), then scales: on CPU, activations quantized per token on a symmetric grid, both at most 8 bits
    (the int32 sums cannot overflow below 2^17 inputs)."""
    return (X.device.type == "cpu" and X.dtype == torch.float32 and scheme.quantize_acts and scheme.a_symmetric
            and scheme.a_int and scheme.w_int
            and scheme.a_granularity == "token" and scheme.a_bits <= 8 and scheme.w_bits <= 8
            and X.shape[-1] < 2 ** 17 and hasattr(torch, "_int_mm"))


class MASLinearSTE(torch.autograd.Function):
    """Y = Xq Qw(diag(s) W)ᵀ + b in one autograd node: :class:`SmoothedWeightQuantSTE` with the matmul inside.

    Xq [..., in] (the quantized activations, with their own gradient; or Xs, below), W [out, in] and b constants.
    Values and gradients are those of ``F.linear(Xq, SmoothedWeightQuantSTE(W, s), b)`` up to float rounding (dL/dy =
    Gᵀ Xq is computed here, into a scratch); y, e and the mask live in ``buffers`` (:class:`FusedBuffers`), reused
    at the next step, so a learning step allocates no [out, in] float tensor. The backward overwrites e and the scratch: it
    runs once per graph (``retain_graph`` gets autograd's error on the modified saved tensor).

    With ``a_grid`` (:func:`int_matmul_applies`), the first input is Xs, not Xq: the node also computes Xq, the
    per-token symmetric fake quantization of Xs on ``a_grid`` with clip ratio ``a_ratio`` (the operations of
    :class:`~masquant.quant.grid.SymFakeQuantSTE`, whose gradient it also applies), with codes c_a and scale s_a, and

      Y = (c_a c_wᵀ) ⊙ s_a s_wᵀ + b,   dL/dXq = (G ⊙ 1 s_wᵀ) c_w

    with c_a c_wᵀ an exact int8 × int8 -> int32 product (|c_a| ≤ 127, |c_w| ≤ 127: no overflow below 2^17 inputs),
    about 8× faster than the float32 matmul on CPU. The float32 form rounds each product and sum instead; the two
    differ by float rounding only.
    """

    @staticmethod
    def forward(ctx, X, s, W, bias, bits: int, ratio: float, a_grid: IntGrid | None, a_ratio: float,
                buffers: FusedBuffers | None, key):
        with torch.no_grad():
            owns = buffers is not None and key not in buffers.busy
            bufs = buffers.take(key, W) if buffers is not None else _fresh(W)
            if a_grid is None:  # X is Xq
                y, e, mask, a_live, _ = _smoothed_weight_quant_(W, s, bits, ratio, *bufs)
                out = F.linear(X, y, bias)
                w_scale = a_act = live_act = a_scale = None
                Xq = X
            else:  # X is Xs
                y, e, mask, a_live, w_scale = _smoothed_weight_quant_(W, s, bits, ratio, *bufs, rescale=False)
                c_w = buffers.codes(key, W) if buffers is not None else torch.empty(W.shape, dtype=torch.int8)
                c_w.copy_(y)  # y holds the integer codes here
                X2 = X.reshape(-1, X.shape[-1])
                a_act, raw, a_scale = sym_abs_max_scale(X2, a_grid, a_ratio, -1)
                live_act = raw >= EPS_GRID
                c_a = sym_codes(X2, a_scale, a_grid)
                out = torch._int_mm(c_a.to(torch.int8), c_w.T).to(X.dtype).mul_(a_scale).mul_(w_scale.reshape(1, -1))
                if bias is not None:
                    out.add_(bias)
                out = out.reshape(*X.shape[:-1], W.shape[0])
                Xq = c_a.mul_(a_scale)
        ctx.save_for_backward(X, Xq, s, W, y, e, mask, a_live, w_scale, a_act, a_scale, live_act)
        ctx.factor = ratio / float(2 ** (bits - 1) - 1)
        ctx.buffers, ctx.key = (buffers, key) if owns else (None, None)
        ctx.scratch = buffers
        ctx.a_grid, ctx.a_ratio = a_grid, a_ratio
        return out

    @staticmethod
    def backward(ctx, G):
        X, Xq, s, W, y, e, mask, a_live, w_scale, a_act, a_scale, live_act = ctx.saved_tensors
        G2 = G.reshape(-1, G.shape[-1])
        gX = None
        if ctx.needs_input_grad[0]:
            gX = torch.mm(G2 if w_scale is None else G2 * w_scale.reshape(1, -1), y)
            if ctx.a_grid is not None:  # through the activation quantization to Xs
                gX = sym_fake_quant_grad(gX, X.reshape(-1, X.shape[-1]), a_scale, a_act, live_act, ctx.a_grid,
                                         ctx.a_ratio, -1)
            gX = gX.reshape(X.shape)
        g = torch.mm(G2.T, Xq.reshape(-1, Xq.shape[-1]),
                     out=ctx.scratch.grad_scratch(W) if ctx.scratch is not None else None)
        g_s = _smoothed_weight_grad_s(g, W, s, e, mask, a_live, ctx.factor, in_place=True)
        if ctx.buffers is not None:  # this node took the key's buffers: they are free again
            ctx.buffers.release(ctx.key)
        return gX, g_s, None, None, None, None, None, None, None, None


class IntCodesLinearSTE(torch.autograd.Function):
    """Y = Xq W_qᵀ + b for a constant quantized weight W_q = c_w ⊙ s_w 1ᵀ (down_proj during the learning), the
    forward on the integer codes as :class:`MASLinearSTE` computes it (Xq: the per-token symmetric fake quantization
    of ``Xs`` on ``a_grid`` with clip ratio ``a_ratio``); dL/dXq = G W_q. Equal to ``F.linear(Xq, W_q, b)`` up to
    float rounding."""

    @staticmethod
    def forward(ctx, Xq, Xs, W_q, c_w, w_scale, bias, a_grid: IntGrid, a_ratio: float):
        with torch.no_grad():
            Xs2 = Xs.reshape(-1, Xs.shape[-1])
            _, _, a_scale = sym_abs_max_scale(Xs2, a_grid, a_ratio, -1)
            c_a = sym_codes(Xs2, a_scale, a_grid).to(torch.int8)
            out = torch._int_mm(c_a, c_w.T).to(Xq.dtype).mul_(a_scale).mul_(w_scale.reshape(1, -1))
            if bias is not None:
                out.add_(bias)
        ctx.save_for_backward(W_q)
        return out.reshape(*Xq.shape[:-1], W_q.shape[0])

    @staticmethod
    def backward(ctx, G):
        (W_q,) = ctx.saved_tensors
        return G @ W_q, None, None, None, None, None, None, None


def weight_codes(W: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 codes c_w, scale s_w [out, 1]) with Qw(W) = c_w·s_w, bitwise (the operations of ``quantize_weight``),
    for a symmetric per-channel grid of at most 8 bits; else None."""
    if not (scheme.quantize_weights and scheme.w_int and scheme.w_symmetric and scheme.w_granularity == "channel"
            and scheme.w_bits <= 8 and W.dim() == 2):
        return None
    grid = IntGrid(scheme.w_bits, True, scheme.int_range)
    with torch.no_grad():
        _, _, scale = sym_abs_max_scale(W, grid, scheme.w_clip_ratio, 1)
        return sym_codes(W, scale, grid).to(torch.int8), scale


def fused_weight_quant_applies(scheme: QuantScheme, s: torch.Tensor | None, W: torch.Tensor) -> bool:
    """Whether :class:`SmoothedWeightQuantSTE` computes this weight's quantization (else the composed form)."""
    return (s is not None and s.requires_grad and torch.is_grad_enabled() and W.dim() == 2
            and not W.requires_grad and scheme.quantize_weights and scheme.w_int and scheme.w_symmetric
            and scheme.w_granularity == "channel" and scheme.int_range == "narrow" and scheme.w_clip_ratio >= 1.0)


def smooth_quantize_weight(W: torch.Tensor, s: torch.Tensor | None, scheme: QuantScheme, ste: bool = True) -> torch.Tensor:
    """Qw(diag(s) W) for W [out, in] (s None: Qw(W)); fused (:class:`SmoothedWeightQuantSTE`) where it applies."""
    if ste and fused_weight_quant_applies(scheme, s, W):
        return SmoothedWeightQuantSTE.apply(W, s.to(W.dtype), scheme.w_bits, float(scheme.w_clip_ratio))
    return quantize_weight(W if s is None else smooth_weight(W, s), scheme, ste=ste)


def mas_linear_rows(X: torch.Tensor, s: torch.Tensor | None, W: torch.Tensor, bias: torch.Tensor | None,
                    scheme: QuantScheme, ste: bool = True, eps: float = 0.0, buffers: FusedBuffers | None = None,
                    key=None) -> torch.Tensor:
    """Eq. 13, one modality's rows: Y_m = Qa(X_m / (s_m + ε)) Qw(diag(s_m) W) + b; X [N, in], W [out, in] -> [N, out].

    With ``ste`` the gradient reaches s through X/s, through diag(s)W and through both dynamic ranges.
    ``eps``: the official learning forward divides by (s + 1e-5) (and multiplies W by s); 0 is Eq. 13.
    Where the fused weight quantization applies, the linear is one :class:`MASLinearSTE` node (its buffers
    ``buffers[key]`` reused from step to step when given).
    """
    Xs = X if s is None else X / (s + eps if eps else s)
    if ste and fused_weight_quant_applies(scheme, s, W) and (bias is None or not bias.requires_grad):
        if int_matmul_applies(scheme, Xs):  # activation quantization inside the node
            a_grid, X_in = IntGrid(scheme.a_bits, True, scheme.int_range), Xs
        else:
            a_grid, X_in = None, quantize_activation(Xs, scheme, ste=ste)
        return MASLinearSTE.apply(X_in, s.to(W.dtype), W, bias, scheme.w_bits, float(scheme.w_clip_ratio), a_grid,
                                  float(scheme.a_clip_ratio), buffers, key)
    Xq = quantize_activation(Xs, scheme, ste=ste)
    return F.linear(Xq, smooth_quantize_weight(W, s, scheme, ste), bias)


def mas_linear(X: torch.Tensor, index: dict[str, torch.Tensor] | None, scales: dict[str, torch.Tensor | None],
               W: torch.Tensor, bias: torch.Tensor | None, scheme: QuantScheme, ste: bool = True,
               eps: float = 0.0, buffers: FusedBuffers | None = None) -> torch.Tensor:
    """Eq. 13: Y = Σ_m Qa((X ⊙ M_m) / s_m) Qw(diag(s_m) W) (+ b once), computed on each modality's rows only.

    X [..., in]; ``index`` {modality: flat row indices} (None = every row is text); scales {modality: s [in]}.
    Per-token activation quantization makes the row-wise form equal to the masked sum. ``buffers``: see
    :func:`mas_linear_rows` (keyed by modality).
    """
    if index is None:
        return mas_linear_rows(X, scales["text"], W, bias, scheme, ste, eps, buffers, "text")
    lead = X.shape[:-1]
    X2 = X.reshape(-1, X.shape[-1])
    Y = scatter_rows(X2.shape[0], index,
                     lambda m, idx: mas_linear_rows(X2[idx], scales[m], W, bias, scheme, ste, eps, buffers, m))
    return Y.reshape(*lead, W.shape[0])


def weighted_mae(Y: torch.Tensor, target: torch.Tensor, masks: dict[str, torch.Tensor],
                 lambdas: dict[str, float]) -> torch.Tensor:
    """Eq. 14: L = Σ_m λ_m Σ_{m-rows} |Y - Y_fp| / (#elements); Y, target [..., D], masks {m: bool[...]}.

    Modalities without rows add zero (a text-only sample is a plain MAE), never an error. Rows of no
    listed modality count with weight 1.
    """
    err = (Y - target).abs().sum(-1).reshape(-1)  # [N] per-row L1
    weight = torch.ones_like(err)
    for m, mask in masks.items():
        weight = torch.where(mask.reshape(-1).to(err.device), float(lambdas.get(m, 1.0)), weight)
    return (weight * err).sum() / Y.numel()


# --- CMC -------------------------------------------------------------------------------------------
def cmc_residual(W: torch.Tensor, s_m: torch.Tensor, W_q: torch.Tensor, scheme: QuantScheme | None = None) -> torch.Tensor:
    """Eq. 22: ΔW_m = diag(s_m) W − W_q, the paper's layout [in, out]; W, W_q [out, in].

    With ``scheme`` the target is quantized too (option ``quantized_target``): ΔW_m = Q(diag(s_m) W) − W_q.
    """
    target = smooth_weight(W.double(), s_m.double())
    if scheme is not None:
        target = quantize_weight(target, scheme)
    return (target - W_q.double()).T


def rescale_covariance(C: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """C_s = diag(1/s) C diag(1/s): Gram matrix of x̃ = x / s from that of x; C [in, in], s [in] -> [in, in]."""
    inv = 1.0 / s.double()
    return C.double() * inv[:, None] * inv[None, :]


def whitening(C: torch.Tensor, damping: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 24-25: C = P Λ Pᵀ, T = Λ^{1/2} Pᵀ, T⁻¹ = P Λ^{-1/2}; C [in, in] -> T, T⁻¹ [in, in] (float64).

    Eigenvalues are floored at ``damping · mean(Λ)`` (a singular C never gets inverted); with the same
    floor in T and T⁻¹, T⁻¹ T = I exactly. TᵀT = C wherever no eigenvalue was floored. A zero C (no
    tokens) gives T = T⁻¹ = I, i.e. plain SVD.
    """
    C = C.double()
    C = 0.5 * (C + C.T)
    lam, P = torch.linalg.eigh(C)
    mean = lam.clamp(min=0).mean()
    if not torch.isfinite(mean) or mean <= 0:
        eye = torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
        return eye, eye.clone()
    lam = lam.clamp(min=float(damping) * mean if damping > 0 else torch.finfo(torch.float64).tiny)
    root = lam.sqrt()
    T = root[:, None] * P.T
    T_inv = P / root[None, :]
    return T, T_inv


def whitened_low_rank(dW: torch.Tensor, T: torch.Tensor | None, T_inv: torch.Tensor | None,
                      r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Theorem 2 / Eq. 26-28: T ΔW = U Σ Vᵀ, L1 = T⁻¹ U_r [in, r], L2 = Σ_r V_rᵀ [r, out]; ΔW [in, out].

    L1 L2 minimises ‖X̃ (ΔW − L)‖_F over rank-r L when TᵀT = X̃ᵀX̃. T = None: plain truncated SVD.
    """
    dW = dW.double()
    A = dW if T is None else T.double() @ dW
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    r = min(r, S.numel())
    L1 = U[:, :r] if T_inv is None else T_inv.double() @ U[:, :r]
    L2 = S[:r, None] * Vh[:r]
    return L1, L2


def resolve_rank(d_in: int, d_out: int, rank_ratio: float | None = None, rank: int | None = None,
                 rank_floor: int = 0) -> int:
    """CMC's rank: r = rank or floor(ρ·min(D_in, D_out)), at least rank_floor, at most min(D_in, D_out)."""
    full = min(d_in, d_out)
    if rank is not None:
        r = int(rank)
    elif rank_ratio is not None:
        r = int(math.floor(rank_ratio * full + 1e-9))
    else:
        raise ValueError("give rank_ratio or rank")
    return max(1, min(full, max(r, rank_floor)))


def effective_rank(M: torch.Tensor) -> float:
    """Roy-Vetterli effective rank exp(H(σ/Σσ)) of a matrix M [a, b] (1 ≤ value ≤ min(a, b))."""
    S = torch.linalg.svdvals(M.double())
    total = S.sum()
    if total <= 0:
        return 0.0
    p = S / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def output_error(X: torch.Tensor, A: torch.Tensor) -> float:
    """‖X A‖_F for X [N, in], A [in, out] (the objective of Theorem 2 with A = ΔW − L)."""
    return float(torch.linalg.matrix_norm(X.double() @ A.double()))
