"""QuaRot's KV-cache quantizer (Ashkboos et al., 2024, §4: K after RoPE and an online Hadamard, V as it is).

Pure tensor functions. Keys and values are quantized asymmetrically per token, per head and per group of
``group_size`` head-dim channels (QuaRot: group 128 = Llama's head dim, clip 0.95). The rotated model's
v_proj already carries a per-head Hadamard; K gets one online, on q and k alike after RoPE, which leaves
q kᵀ unchanged (H Hᵀ = I) and spreads K's outlier channels before it is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from masquant.quant.quantizer import fake_quant_asym, quantize_groups
from masquant.transforms.hadamard import rotation_for_width


def kv_fake_quant(x: torch.Tensor, bits: int, group_size: int, clip_ratio: float) -> torch.Tensor:
    """Asymmetric fake quantization of x [B, heads, T, d] per (token, head, group of d); x's dtype."""
    if bits >= 16:
        return x
    d = x.shape[-1]
    x2 = x.reshape(-1, d).float()
    q = quantize_groups(x2, min(group_size, d), lambda G: fake_quant_asym(G, bits, dim=-1, clip_ratio=clip_ratio))
    return q.reshape(x.shape).to(x.dtype)


def qk_hadamard(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q H, k H over the head dim (H orthonormal, zero-padded where d has no Hadamard matrix): q kᵀ unchanged."""
    plan = rotation_for_width(q.shape[-1], "pad")
    return plan.apply(q), plan.apply(k)


@dataclass(frozen=True)
class KVQuantizer:
    """The attention-kernel wrapper of one layer: ``(module, q, k, v, mask, kernel, **kw)`` -> kernel's output."""

    bits: int = 4
    group_size: int = 128
    clip_ratio: float = 0.95
    k_hadamard: bool = True

    def __call__(self, module, query, key, value, attention_mask, kernel, **kwargs):
        # key/value hold the cache's past too (stored unquantized): quantizing each row again is deterministic,
        # so every token's K and V are exactly what a quantized cache would hold
        if self.k_hadamard:
            query, key = qk_hadamard(query, key)
        key = kv_fake_quant(key, self.bits, self.group_size, self.clip_ratio)
        value = kv_fake_quant(value, self.bits, self.group_size, self.clip_ratio)
        return kernel(module, query, key, value, attention_mask, **kwargs)
