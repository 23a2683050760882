"""SmoothQuant (Xiao et al., 2023), the equations as pure functions.

Y = (X diag(s)^-1) (diag(s) W): dividing the norm's output by s and multiplying the linears' input
columns by s leaves the FP output unchanged and moves activation outliers into the weights. The fold
itself belongs to the model adapter (it must be exact for the model's norm formula).
"""

from __future__ import annotations

import torch

from masquant.quant.smoothing import smooth_factors, weight_input_absmax


def smoothquant_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Eq. 4: s_j = max|X_j|^α / max|W_j|^(1-α); act_absmax [D_in], weights [out_i, D_in] sharing the input."""
    return smooth_factors(act_absmax, weight_input_absmax(*weights), alpha)
