"""The unquantized reference (FP16/FP32 as loaded): every table's first row."""

from __future__ import annotations

from dataclasses import dataclass

from masquant.methods.base import BlockPlan, Method
from masquant.methods.registry import register_method


@dataclass
class DenseConfig:
    id: str = "dense"


@register_method("dense", config=DenseConfig, order=0)
class Dense(Method):
    needs_calibration = False
    fp16 = "required"
    leaves_model_unchanged = True

    def walk(self, ctx, stack):
        return None

    def plan_block(self, ctx, step) -> BlockPlan:
        return BlockPlan()
