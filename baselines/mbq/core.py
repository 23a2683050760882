"""MBQ (Li et al., CVPR 2025), the modality-balancing steps as pure tensor functions.

The scale search itself is AWQ's (``baselines.awq.core`` / ``baselines.awq.search``); MBQ only changes
its loss: (Σ_answer |Δ| + r Σ_vision |Δ|) / (elements of both), with r the layer's vision/answer gradient
sensitivity of the block (o_proj output for the attention pairs, down_proj output for the MLP pairs).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def answer_rows(labels: torch.Tensor) -> torch.Tensor:
    """Rows whose logits the SFT loss reads: row t predicts token t+1, so row t counts iff labels[t+1] != -100.

    labels [1, T] or [T] -> bool [T] (the last row predicts nothing).
    """
    lab = labels.reshape(-1)
    rows = torch.zeros_like(lab, dtype=torch.bool)
    rows[:-1] = lab[1:] != IGNORE_INDEX
    return rows


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (fp32): logits [1, T, V], labels [1, T] -> scalar."""
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:].to(logits.device),
                                             ignore_index=IGNORE_INDEX)


def modality_grad_means(grad: torch.Tensor, vision: torch.Tensor, answer: torch.Tensor) -> tuple[float, float]:
    """(mean |g| over vision rows, mean |g| over answer rows) of one sample; g [1, T, D], masks bool [T].

    A modality without rows gives NaN (left out of the average over samples)."""
    g = grad.detach().float().reshape(-1, grad.shape[-1]).abs()
    vis = g[vision.reshape(-1).to(g.device)]
    ans = g[answer.reshape(-1).to(g.device)]
    nan = float("nan")
    return (float(vis.mean()) if vis.numel() else nan, float(ans.mean()) if ans.numel() else nan)


def sensitivity_ratios(vision: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r_l = vision_l / answer_l, floored at its median over layers (np.median: the mean of the two middle
    values for an even count, as the official code); vision, answer [L] -> (r [L], raw ratio [L])."""
    raw = vision.double() / answer.double()
    floor = torch.quantile(raw, 0.5)
    return torch.maximum(raw, floor).float(), raw.float()


def modality_row_weights(answer: torch.Tensor, vision: torch.Tensor, r: float) -> torch.Tensor:
    """Loss weight per row: 1 on answer rows, r on vision rows, 0 elsewhere (prompt text, system); [T]."""
    return answer.reshape(-1).float() + r * vision.reshape(-1).float()
