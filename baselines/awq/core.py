"""AWQ (Lin et al., MLSys 2024), the steps as pure tensor functions.

Activation-aware scaling: Q(W diag(s)) diag(s)^-1 X keeps the salient input channels (large mean |x|)
on a finer effective grid; s = x̄^α is searched per fold pair on the block output (§3.2, Eq. 4-5).
Clipping: per (output channel, group of input channels), the weight range is shrunk to the value that
minimises the error of that group's partial output (the official code's ``auto_clip``).

The functions are shared with MBQ (``baselines/mbq``): the search loss is :func:`block_error_terms` with
row weights (AWQ: every row, p = 2, i.e. the MSE; MBQ: answer rows 1, vision rows r, p = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from masquant.quant.quantizer import quantize_weight
from masquant.quant.scheme import QuantScheme

SCALE_FLOOR = 1e-4  # the official clamp of x̄^α


def alpha_grid(n_grid: int = 20) -> list[float]:
    """α ∈ {0, 1/n, ..., (n-1)/n}: {0, 0.05, ..., 0.95} for n = 20."""
    return [i / n_grid for i in range(n_grid)]


def shrink_grid(n_grid: int = 20, max_shrink: float = 0.5) -> list[float]:
    """Clip ratios 1, 1 - 1/n, ..., down to 1 - max_shrink (excluded): 1.0, 0.95, ..., 0.55 by default."""
    return [1 - i / n_grid for i in range(int(round(max_shrink * n_grid)))]


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 5: s = max(x̄^α, 1e-4) / sqrt(max(s) min(s)); x̄ [in] = mean over tokens of |x| per channel -> s [in]."""
    s = x_mean.float().pow(alpha).clamp(min=SCALE_FLOOR)
    return s / (s.max() * s.min()).sqrt()


def scaled_weight(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W diag(s): W [out, in], s [in] (in W's dtype, as the adapter's fold computes it)."""
    return (W.float() * s.float()[None, :]).to(W.dtype)


def block_error_terms(Y: torch.Tensor, Y_ref: torch.Tensor, row_weight: torch.Tensor | None = None,
                      p: int = 2) -> tuple[float, float]:
    """(Σ_t w_t Σ_d |Y - Y_ref|^p, D · #{t: w_t > 0}) in float32; Y, Y_ref [..., T, D], w [T] (None: every row 1).

    Summed over samples, num / den is AWQ's MSE (w = 1, p = 2) or MBQ's MAE (Σ_ans|Δ| + r Σ_vis|Δ|) /
    (elements of both) (w = answer + r · vision, p = 1). The MSE is one fused reduction (no temporaries).
    """
    D = Y.shape[-1]
    if row_weight is None and p == 2:
        return float(torch.nn.functional.mse_loss(Y.float(), Y_ref.float(), reduction="sum")), float(Y.numel())
    err = (Y.float() - Y_ref.float()).abs().pow(p).reshape(-1, D).sum(-1)  # [T]
    if row_weight is None:
        return float(err.sum()), float(err.numel() * D)
    w = row_weight.reshape(-1).to(err.device, torch.float32)
    return float((w * err).sum()), float((w > 0).sum() * D)


def pick_alpha(losses: dict[float, float]) -> float:
    """The α of the lowest loss; the first (smallest α) wins ties, as the official strict ``<``."""
    best = min(losses.values())
    return next(a for a, v in losses.items() if v == best)


# --- clip search ------------------------------------------------------------------------------------
def clip_group_size(scheme: QuantScheme, in_features: int) -> int:
    """The scheme's group of input channels (the whole row for per-channel weights)."""
    if scheme.w_granularity == "group":
        return min(int(scheme.w_group_size), in_features)
    return in_features


def _grouped(A: torch.Tensor, g: int) -> torch.Tensor:
    """[..., in] -> [..., G, g], zero-padding a partial last group (zeros add nothing to a partial output)."""
    pad = (-A.shape[-1]) % g
    if pad:
        A = torch.nn.functional.pad(A, (0, pad))
    return A.reshape(*A.shape[:-1], A.shape[-1] // g, g)


def group_absmax(W: torch.Tensor, g: int) -> torch.Tensor:
    """max |W| per (output channel, input group): W [out, in] -> [out, G]."""
    return _grouped(W.float().abs(), g).amax(-1)


def clip_weight(W: torch.Tensor, max_val: torch.Tensor, g: int) -> torch.Tensor:
    """W clamped to [-max_val, max_val] per (output channel, group): W [out, in], max_val [out, G] -> [out, in]."""
    in_f = W.shape[1]
    Wg = _grouped(W.float(), g)
    Wc = torch.maximum(torch.minimum(Wg, max_val[..., None]), -max_val[..., None])
    return Wc.reshape(W.shape[0], -1)[:, :in_f].to(W.dtype)


def group_partial_error(X: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor, g: int) -> torch.Tensor:
    """Mean over tokens of (X_g (Ŵ_g - W_g)ᵀ)² per (output channel, group): X [N, in], W, Ŵ [out, in] -> [out, G]."""
    Xg = _grouped(X.float(), g)  # [N, G, g]
    dW = _grouped(W_hat.float() - W.float(), g)  # [out, G, g]
    return torch.einsum("ngk,ogk->ogn", Xg, dW).pow(2).mean(-1)


def group_second_moments(X: torch.Tensor, g: int) -> torch.Tensor:
    """H_G = X_Gᵀ X_G / N per input group G, in float64: X [N, in] -> [G, g, g]."""
    Xg = _grouped(X.double(), g)  # [N, G, g]
    return torch.einsum("ngk,ngl->gkl", Xg, Xg) / X.shape[0]


def group_partial_error_gram(H: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor, g: int) -> torch.Tensor:
    """:func:`group_partial_error` as the quadratic form dW_G H_G dW_Gᵀ (equal in exact arithmetic, float64):
    H [G, g, g] from :func:`group_second_moments`, W, Ŵ [out, in] -> [out, G] (float32). Costs out·in·g per
    call instead of out·in·N, with no [out, G, N] temporary."""
    dW = _grouped(W_hat.double() - W.double(), g)  # [out, G, g]
    return (torch.einsum("ogk,gkl->ogl", dW, H) * dW).sum(-1).float()


@dataclass
class ClipResult:
    max_val: torch.Tensor  # [out, G] the chosen clip value (absolute)
    ratio: torch.Tensor  # [out, G] chosen shrink factor
    err_noclip: torch.Tensor  # [out, G] partial-output error of Q(W)
    err: torch.Tensor  # [out, G] partial-output error of Q(clip(W))


@torch.no_grad()
def search_clip(W: torch.Tensor, X: torch.Tensor, scheme: QuantScheme, shrinks: list[float],
                oc_batch: int = 256, gram: bool = True) -> ClipResult:
    """Per (output channel, group): the shrink of the group's absmax whose Q(clip(W)) gives the lowest error
    of the group's partial output on the tokens X [N, in]; W [out, in]. Batched over output channels.
    ``gram``: the error as a quadratic form in the group's second moments (:func:`group_partial_error_gram`);
    False: directly on the tokens (:func:`group_partial_error`, the official form)."""
    g = clip_group_size(scheme, W.shape[1])
    if gram:
        H = group_second_moments(X, g)
        error = lambda Wb, W_hat: group_partial_error_gram(H, Wb, W_hat, g)  # noqa: E731
    else:
        error = lambda Wb, W_hat: group_partial_error(X, Wb, W_hat, g)  # noqa: E731
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("max_val", "ratio", "err_noclip", "err")}
    for o0 in range(0, W.shape[0], oc_batch):
        Wb = W[o0:o0 + oc_batch].float()
        absmax = group_absmax(Wb, g)  # [o, G]
        best_err = best_ratio = err_noclip = None
        for shrink in shrinks:
            max_val = absmax * shrink
            err = error(Wb, quantize_weight(clip_weight(Wb, max_val, g), scheme))
            if best_err is None:
                best_err, best_ratio = err, torch.full_like(err, shrink)
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_ratio = torch.where(better, torch.full_like(err, shrink), best_ratio)
            if shrink == 1.0:
                err_noclip = err
        if err_noclip is None:
            err_noclip = error(Wb, quantize_weight(Wb, scheme))
        out["max_val"].append(absmax * best_ratio)
        out["ratio"].append(best_ratio)
        out["err_noclip"].append(err_noclip)
        out["err"].append(best_err)
    return ClipResult(**{k: torch.cat(v) for k, v in out.items()})
