"""Smoothing factors (SmoothQuant Eq. 4, MASQuant §3 step 2): the one implementation every method uses."""

from __future__ import annotations

import torch

STAT_FLOOR = 1e-5  # clamp of statistics and factors (a modality without tokens gives 0)


def weight_input_absmax(*weights: torch.Tensor) -> torch.Tensor:
    """max_j |W[j, i]| over the output channels of every weight sharing the input: W [out_k, in] -> [in]."""
    return torch.cat([W.detach().abs().float() for W in weights], dim=0).amax(dim=0)


def smooth_factors(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float,
                   floor: float = STAT_FLOOR) -> torch.Tensor:
    """s_j = clamp(max|X_j|)^α / clamp(max|W_:,j|)^(1−α), clamped at ``floor``; [in] -> [in]."""
    s = act_absmax.float().clamp(min=floor).pow(alpha) / w_absmax.float().clamp(min=floor).pow(1.0 - alpha)
    return s.clamp(min=floor)
