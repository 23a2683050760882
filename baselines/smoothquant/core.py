"""SmoothQuant (Xiao et al., 2023), the equations as pure functions.

Y = (X diag(s)^-1) (diag(s) W): dividing the norm's output by s and multiplying the linears' input
columns by s leaves the FP output unchanged and moves activation outliers into the weights.
"""

from __future__ import annotations

import torch

_FLOOR = 1e-5


def smooth_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Eq. 4: s_j = max|X_j|^a / max|W_j|^(1-a); act_absmax [D_in], weights [out_i, D_in] sharing the input."""
    w_absmax = torch.cat([W.abs().float() for W in weights], dim=0).amax(dim=0).clamp(min=_FLOOR)
    s = act_absmax.float().clamp(min=_FLOOR).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(min=_FLOOR)


@torch.no_grad()
def fold_smoothing_into_norm_(norm: torch.nn.Module, linears: list[torch.nn.Module], s: torch.Tensor) -> None:
    """norm weight (and bias) / s; each linear's input columns * s. Function-preserving in FP."""
    s = s.to(norm.weight.device)
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
