"""GPTQ (Frantar et al., ICLR 2023, Algorithm 1) on the integer grids of :mod:`masquant.quant.grid`.

Pure tensor functions: no model, config or device logic. W [out, in] is a PyTorch linear weight
(Y = X Wᵀ); H [in, in] is the layer Hessian 2/N Σ xᵀx of its inputs (``masquant.calibration.stats.Gram``).

Groups. ``group_size`` 0 = one scale per output channel. Otherwise consecutive groups of ``group_size``
input columns (in the act-order permutation unless ``static_groups``); when in % group_size != 0 the
last group is the smaller remainder, with its own scale. Scales of a group are computed from the
weights as GPTQ has updated them when the group starts (exactly, also when the group starts inside a
lazy-update block: the official code reads stale columns there); ``static_groups`` computes them all
from the original W before any update.

MSE clip (``mse_clip``): per output channel or group, shrink the range by p = 1, 0.99, ..., 0.21
(grid 100, maxshrink 0.8: 80 factors, as the official GPTQ/QuaRot code) and keep the p minimising
Σ|w - Q(w)|^2.4.
"""

from __future__ import annotations

import logging

import torch

from masquant.quant.formats import FloatGrid
from masquant.quant.grid import Grid, IntGrid, fake_quantize, find_scale_zero

log = logging.getLogger(__name__)


# --- GPTQ, Algorithm 1 -----------------------------------------------------------------------------------
def zero_dead_inputs_(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Inputs never active (H[i, i] = 0): H[i, i] <- 1, W[:, i] <- 0, in place; returns the dead mask [in]."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return dead


def act_order_permutation(H: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing H[i, i] (the "act-order" heuristic); [in] long."""
    return torch.argsort(torch.diag(H), descending=True)


def dampen_(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """H <- H + λ I, λ = percdamp · mean(diag H), in place; returns H."""
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    return H


def inverse_hessian_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U), computed in float64; H [in, in] -> [in, in]."""
    L = torch.linalg.cholesky(H.to(torch.float64))
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _current_columns(
    W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor, i1: int, i: int, j2: int
) -> torch.Tensor:
    """W[:, i1+i : j2] with every update so far, also the lazy ones still pending past the block."""
    i2 = i1 + W1.shape[1]
    inside = W1[:, i : min(j2, i2) - i1]
    if j2 <= i2:
        return inside
    beyond = W[:, i2:j2] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2:j2]
    return torch.cat([inside, beyond], dim=1)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    symmetric: bool = True,
    group_size: int = 0,
    qrange: str = "narrow",
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    mse_clip: bool = False,
    grid: Grid | None = None,
) -> tuple[torch.Tensor, dict]:
    """GPTQ, Algorithm 1: quantize W [out, in] column by column, each error spread on the later columns.

    H [in, in]: the Hessian 2/N Σ xᵀx. Returns (Wq [out, in] dequantized, W's dtype, info) with info:
      scale, zero [out, groups]  the grid of each group (zero = 0 when symmetric)
      g_idx [in]                 the group of each input column (original order)
      perm [in] | None           the act-order permutation
      loss                       Σ (w - q)² / (2 [H⁻¹]_qq) over all steps = ½ tr(ΔW H_damped ΔWᵀ)
      dead [in]                  inputs with H[i, i] = 0 (quantized to 0)
      global_scale               an NVFP4 grid's global scale g (else None)
    Computed in float32 (float64 when W is float64); the Cholesky factor in float64. ``grid`` (e.g. a float
    format's, :mod:`masquant.quant.formats`) replaces bits/symmetric/qrange: the error feedback is the same for any
    grid; an NVFP4 grid takes its global scale from the original W, as compressed-tensors' observer does.
    """
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise ValueError(f"H must be [{in_f}, {in_f}] for W {tuple(W.shape)}, got {tuple(H.shape)}")
    if group_size < 0:
        raise ValueError(f"group_size={group_size}: must be >= 0 (0 = per output channel)")
    grid = IntGrid(bits, symmetric, qrange) if grid is None else grid
    if isinstance(grid, FloatGrid) and grid.global_scale is None:
        grid = grid.bind(W.detach().float())
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    W_ = W.detach().to(work).clone()  # [out, in]
    H_ = H.detach().to(device=W.device, dtype=torch.float64, copy=True)  # [in, in]
    dead = zero_dead_inputs_(W_, H_)

    g = group_size or in_f
    n_groups = -(-in_f // g)
    scale = torch.zeros(out_f, n_groups, dtype=work, device=W.device)
    zero = torch.zeros_like(scale)
    g_idx = torch.zeros(in_f, dtype=torch.long)  # on the host: no device sync per column
    if group_size == 0 or static_groups:  # all grids from the original W (per channel: order-free)
        for k, j in enumerate(range(0, in_f, g)):
            s, z = find_scale_zero(W_[:, j : j + g], grid, mse_clip)
            scale[:, k : k + 1] = s
            if z is not None:
                zero[:, k : k + 1] = z
            g_idx[j : j + g] = k

    perm = act_order_permutation(H_) if act_order else None
    if perm is not None:
        W_, H_ = W_[:, perm], H_[perm][:, perm]
    col = perm.cpu() if perm is not None else torch.arange(in_f)  # original index of (permuted) column j

    Hinv = inverse_hessian_cholesky(dampen_(H_, percdamp)).to(work)  # upper U, H⁻¹ = Uᵀ U
    Q = torch.zeros_like(W_)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, in_f, blocksize):  # lazy batch updates: one block of columns at a time
        i2 = min(i1 + blocksize, in_f)
        W1 = W_[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if group_size and not static_groups and j % g == 0:  # a new group in the (permuted) order
                k = j // g
                s, z = find_scale_zero(_current_columns(W_, W1, Err1, Hinv, i1, i, min(j + g, in_f)), grid, mse_clip)
                scale[:, k : k + 1] = s
                if z is not None:
                    zero[:, k : k + 1] = z
                g_idx[col[j : j + g]] = k
            k = int(g_idx[col[j]]) if group_size else 0
            w = W1[:, i : i + 1]  # [out, 1]
            q = fake_quantize(w, scale[:, k : k + 1], None if grid.symmetric else zero[:, k : k + 1], grid)
            Q[:, j : j + 1] = q
            d = Hinv1[i, i]
            err = (w - q) / d  # [out, 1]
            loss += (err.double() ** 2).sum() / 2  # OBS error of this step: (w - q)² / (2 [H⁻¹]_qq)
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]  # update the rest of the block
            Err1[:, i : i + 1] = err
        W_[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the later blocks

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    if not torch.isfinite(Q).all():
        raise FloatingPointError("GPTQ produced non-finite weights (H not positive definite? raise percdamp)")
    info = {"scale": scale, "zero": zero, "g_idx": g_idx.to(W.device), "perm": perm, "loss": float(loss),
            "dead": dead, "global_scale": getattr(grid, "global_scale", None)}
    log.debug("GPTQ [%d, %d] %d-bit: loss %.4g", out_f, in_f, bits, info["loss"])
    return Q.to(W.dtype), info
