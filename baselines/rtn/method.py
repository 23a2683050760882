"""Round-to-nearest: the floor every method is compared against. No calibration.

With ``quant.w_quantizer=gptq`` this is plain GPTQ (Frantar et al., 2023): the same deploy, weights from
GPTQ on the Hessians of the walker's quantized stream (then it needs calibration data); with
``quant.w_mse_clip=true`` the rounding range is searched per channel or group.
"""

from __future__ import annotations

from dataclasses import dataclass

from masquant.engine.weights import block_weights
from masquant.methods.base import BlockPlan, Method, Walk
from masquant.methods.registry import register_method


@dataclass
class RTNConfig:
    id: str = "rtn"


@register_method("rtn", config=RTNConfig, order=10)
class RTN(Method):
    needs_calibration = False
    honours_weight_options = True
    dynamic_only_reason = "it has no calibration to set static scales from"

    def walk(self, ctx, stack):
        if ctx.scheme.w_quantizer == "gptq":  # GPTQ's Hessians come from the quantized stream
            return Walk(fp_stream=False, quantized_stream=True, stats=False)
        return None

    def plan_block(self, ctx, step) -> BlockPlan:
        return BlockPlan(weights=block_weights(ctx, step if ctx.scheme.w_quantizer == "gptq" else None, step.block))
