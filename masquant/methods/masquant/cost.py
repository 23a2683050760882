"""What CMC costs: extra parameters, ranks and prefill MACs of the low-rank branches (docs/methods/masquant.md)."""

from __future__ import annotations

import torch.nn as nn

from masquant.quant.linear import QuantLinear


def count_lowrank(model: nn.Module) -> dict:
    """Extra parameters r·(D_in + D_out) of every branch, and the extra MACs per non-text token summed over linears."""
    params = 0
    macs: dict[str, int] = {}
    ranks: list[int] = []
    for m in model.modules():
        if isinstance(m, QuantLinear):
            for name, p in m.paths.items():
                if p.L1 is not None:
                    extra = p.L1.numel() + p.L2.numel()
                    params += extra
                    macs[name] = macs.get(name, 0) + extra
                    ranks.append(p.rank)
    out = {"cmc/extra_params": params}
    for name, v in macs.items():
        out[f"cmc/extra_macs_per_{name}_token"] = v
    if ranks:
        out["cmc/rank_min"] = min(ranks)
        out["cmc/rank_max"] = max(ranks)
    return out
