"""MQuant (Yu et al., arXiv 2502.00425) as pure tensor functions: MSQ's scales, RMS, AIFS's order.

MSQ (modality-specific static quantization): every activation quantization point keeps one static
per-tensor scale per modality, s_m = clip · max|X_m| / q_max over the calibration tokens of modality m
(visual, text); decoding runs text tokens only and uses s_text.

RMS (rotation magnitude suppression): after a Hadamard whose first column is constant (normal form, with or
without random signs), channel 0 of the rotated input x H/√n is Σ_j x_j / √n = √n · mean(x), and column 0 of
the rotated weight W H/√n is √n times each row's mean: when the mean is not ~0 that channel is an outlier of
both. It is moved into a separate rank-1 product x_0 · W[:, 0]ᵀ kept in higher precision; the rest
(column 0 zeroed) is quantized with a scale that ignores channel 0. A point is affected when channel 0's
typical magnitude exceeds what the others reach per token: E|x_0| > σ √(2 ln n), σ the others' standard
deviation (from their mean absolute value, σ = √(π/2) · E|x_j|, Gaussian), √(2 ln n) the expected maximum of
n Gaussian channels in units of σ.

AIFS (attention-invariant flexible switching): the prefill runs visual tokens first; each token keeps its
position ids and its attention row (token i sees j iff orig(j) <= orig(i)), so the output is the same up to
the permutation and each modality's static scale covers one contiguous block of tokens.
"""

from __future__ import annotations

import math

import torch

from masquant.quant.quantizer import static_act_scale


def msq_scale(absmax: torch.Tensor, bits: int, clip_ratio: float = 1.0, int_range: str = "narrow",
              skip_channel0: bool = False, a_format: str = "int") -> torch.Tensor:
    """Static per-tensor scale of one modality from its per-channel abs-max [D] (channel 0 left out under RMS);
    for quant.a_format=nvfp4 its calibrated global scale."""
    a = absmax[1:] if skip_channel0 else absmax
    return static_act_scale(a.max(), bits, clip_ratio, int_range, a_format)


def channel0_outlier(mean_abs: torch.Tensor) -> tuple[bool, float]:
    """(affected, E|x_0| / (σ √(2 ln n))) from the per-channel mean |x| [n] of a rotated input."""
    n = mean_abs.numel()
    sigma = math.sqrt(math.pi / 2) * float(mean_abs[1:].mean())
    ratio = float(mean_abs[0]) / max(sigma * math.sqrt(2 * math.log(n)), 1e-12)
    return ratio > 1.0, ratio


def split_channel0(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [out, in] -> (W with column 0 zeroed, L1 = e_0 [in, 1], L2 = W[:, 0]ᵀ [1, out]): x Wᵀ = x W_restᵀ + (x L1) L2."""
    W_rest = W.clone()
    W_rest[:, 0] = 0
    L1 = torch.zeros(W.shape[1], 1, dtype=W.dtype, device=W.device)
    L1[0, 0] = 1
    return W_rest, L1, W[:, :1].T.contiguous()


def visual_first_order(text: torch.Tensor) -> torch.Tensor | None:
    """Token order of one sequence with every non-text token first, each group in its original order; text
    bool [T]. None when the order would not change."""
    perm = torch.cat([(~text).nonzero().flatten(), text.nonzero().flatten()])
    if torch.equal(perm, torch.arange(text.numel(), device=perm.device)):
        return None
    return perm
