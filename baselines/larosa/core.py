"""LaRoSA (Liu et al., ICML 2025, arXiv 2507.01299): layerwise rotated Top-K activation sparsity, as pure functions.

Per decoder layer and block input (the attention's and the MLP's, each its own), Q is the eigenvector basis of
the calibration Gram matrix C = Σ xᵀx of that input (PCA without centring, as the paper and the official code);
at run time every token keeps the K entries of x Q largest in magnitude:

    x̂ = TopK(x Q) Qᵀ,   y = x̂ Wᵀ = TopK(x Q) (W Q)ᵀ          (W [out, in], the torch layout; Qᵀ W in the paper's)

The second form is the one deployed: it is exact (associativity; W Q is computed once in float64) and the
cheapest, because the inverse rotation disappears into the weight and the product reads only the K kept columns
of W Q. What remains at run time is one rotation x Q per block input (shared by q/k/v, and by gate/up) and the
Top-K. The TEAL-style ablation is the same Top-K with Q = I.
"""

from __future__ import annotations

import torch
import torch.nn as nn


# --- calibration: the rotation ----------------------------------------------------------------------
def covariance_rotation(C: torch.Tensor) -> torch.Tensor:
    """Q [D, D] float64: eigenvectors of the Gram matrix C [D, D] (columns, by decreasing eigenvalue).

    Each column's sign is fixed (its largest-magnitude entry positive) so that Q is deterministic. The official
    code adds 0.01 · mean(diag C) to the diagonal first; that shifts every eigenvalue equally and leaves the
    eigenvectors unchanged, so it is omitted.
    """
    C = C.to(torch.float64)
    C = (C + C.T) / 2
    evals, evecs = torch.linalg.eigh(C)  # ascending
    Q = evecs.flip(-1)
    signs = torch.sign(Q.gather(0, Q.abs().argmax(0, keepdim=True)))
    return Q * torch.where(signs == 0, torch.ones_like(signs), signs)


def rotated_input_weight(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """W Q [out, D] in float64 (the paper's Qᵀ W): the weight that consumes the rotated input x Q exactly."""
    return W.to(torch.float64) @ Q.to(W.device, torch.float64)


def energy_in_leading_directions(C: torch.Tensor, Q: torch.Tensor, k: int) -> float:
    """Fraction of the energy tr(C) of rows with Gram matrix C [D, D] that lies in the first k columns of Q [D, D]."""
    Qk = Q[:, :k].to(torch.float64)
    total = float(torch.trace(C.to(torch.float64)))
    return float(torch.einsum("ik,ij,jk->", Qk, C.to(torch.float64), Qk)) / total if total > 0 else 0.0


# --- run time: Top-K --------------------------------------------------------------------------------
def kept_count(width: int, sparsity: float) -> int:
    """Entries a token keeps at a position of ``width`` channels: width − round(sparsity · width)."""
    return width - int(round(sparsity * width))


def top_k_magnitude(z: torch.Tensor, k: int) -> torch.Tensor:
    """z [..., D] with all but the k largest-magnitude entries of each row set to 0 (exactly k kept, ties by index)."""
    if k >= z.shape[-1]:
        return z
    idx = z.abs().topk(k, dim=-1, sorted=False).indices  # [..., k]
    return torch.zeros_like(z).scatter_(-1, idx, z.gather(-1, idx))


def rotated_top_k(x: torch.Tensor, Q: torch.Tensor | None, k: int) -> torch.Tensor:
    """TopK(x Q) [..., D] for x [..., D] (Q [D, D]; None = identity, the TEAL-style ablation), in x's dtype.

    The rotation runs in float32 at least (a bf16 rotation would add its own error before the sparsity's).
    """
    if Q is None:
        return top_k_magnitude(x, k)
    dtype = torch.promote_types(x.dtype, torch.float32)
    return top_k_magnitude(x.to(dtype) @ Q.to(dtype), k).to(x.dtype)


def position_sparsities(target: float, block_in_scale: float, block_out_scale: float) -> dict[str, float]:
    """Per input group: block inputs (q/k/v, gate/up) at block_in_scale · target, o and down at block_out_scale · target."""
    s_in, s_out = block_in_scale * target, block_out_scale * target
    return {"qkv": s_in, "gate_up": s_in, "o": s_out, "down": s_out}


def mac_weighted_sparsity(sparsity: dict[str, float], macs: dict[str, int]) -> float:
    """Fraction of a layer's linear multiply-adds skipped: Σ_g s_g · MACs_g / Σ_g MACs_g (MACs_g = in · Σ out)."""
    total = sum(macs.values())
    return sum(sparsity[g] * macs[g] for g in macs) / total if total else 0.0


# --- the run-time module ----------------------------------------------------------------------------
class RotatedTopK(nn.Module):
    """x [..., D] -> TopK(x Q) with ``k`` kept per token; Q = None keeps the basis (TEAL-style Top-K)."""

    def __init__(self, Q: torch.Tensor | None, k: int, width: int):
        super().__init__()
        self.register_buffer("Q", None if Q is None else Q.detach().to(torch.float32).contiguous())
        self.k = int(k)
        self.width = int(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rotated_top_k(x, self.Q, self.k)

    def extra_repr(self) -> str:
        return f"width={self.width}, k={self.k}, rotated={self.Q is not None}"


class SparsifiedNorm(nn.Module):
    """A block's input norm followed by its sparsifier: the consumers (q/k/v or gate/up) read TopK(norm(h) Q)."""

    def __init__(self, norm: nn.Module, sparsify: RotatedTopK):
        super().__init__()
        self.norm = norm
        self.sparsify = sparsify

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.sparsify(self.norm(hidden_states))
