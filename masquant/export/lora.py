"""MASQuant's CMC branches as PEFT LoRA adapters, one folder per modality, beside the base checkpoint.

In memory a linear adds, for the tokens of modality m, the branch (x / s_m) L1 L2 (x: the linear's input as the
FP model computes it). In the exported base the linear's input may already be divided by the text path's
smoothing vector s_t (folded into its producer: :mod:`masquant.export.deployable`), so the adapter's input is
x' = x / s_t and the branch is x' diag(s_t / s_m) L1 L2. PEFT's LoRA computes y += B A x' · (alpha / r):

    A = (diag(s_t / s_m) L1)ᵀ  [r, in],   B = L2ᵀ  [out, r],   alpha = r  (scaling 1).

Ranks differ per linear (CMC's rank rule); the adapter uses the largest and pads the others with zeros, which adds
exactly nothing (every runtime takes one rank per adapter). The adapter applies to every token of a request: serve
it for requests of that modality (the in-memory model applies it to that modality's tokens only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from masquant.export.deployable import LowRankBranch

PEFT_PREFIX = "base_model.model."


def lora_factors(branch: LowRankBranch, input_smoothing: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) of one branch on the exported linear's input (module doc)."""
    L1 = branch.L1.detach().float()
    ratio = torch.ones(L1.shape[0], device=L1.device)
    if input_smoothing is not None:
        ratio = ratio * input_smoothing.to(L1.device).float()
    if branch.smooth is not None:
        ratio = ratio / branch.smooth.to(L1.device).float()
    return (ratio[:, None] * L1).t().contiguous(), branch.L2.detach().float().t().contiguous()


def write_adapters(branches: dict[str, list[LowRankBranch]], input_smoothing: dict[str, torch.Tensor],
                   out_dir: Path, base_path: str = "../model") -> dict[str, dict]:
    """One PEFT LoRA folder per modality, ``out_dir/lora_<modality>``; returns {modality: {folder, rank, modules}}."""
    by_modality: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, items in branches.items():
        for branch in items:
            by_modality.setdefault(branch.modality, {})[name] = lora_factors(branch, input_smoothing.get(name))
    written = {}
    for modality, factors in sorted(by_modality.items()):
        rank = max(A.shape[0] for A, _ in factors.values())
        tensors = {}
        for name, (A, B) in factors.items():
            r = A.shape[0]
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.cat([A, A.new_zeros(rank - r, A.shape[1])]).cpu()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], 1).cpu()
        folder = out_dir / f"lora_{modality}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA", "base_model_name_or_path": base_path, "r": rank, "lora_alpha": rank,
            "target_modules": sorted(factors), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "init_lora_weights": True, "modules_to_save": None, "task_type": None,
            "inference_mode": True,
        }
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
        written[modality] = {"folder": folder.name, "rank": rank, "modules": len(factors)}
    return written
