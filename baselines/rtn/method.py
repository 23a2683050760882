"""Round-to-nearest: the floor every method is compared against. No calibration.

With ``quant.w_quantizer=gptq`` this is plain GPTQ (Frantar et al., 2023): the same deploy, weights from
GPTQ on the Hessians of the walker's quantized stream (then it needs calibration data); with
``quant.w_mse_clip=true`` the rounding range is searched per channel or group.
"""

from __future__ import annotations

from dataclasses import dataclass

from masquant.methods.base import Method, MethodConfigError, QuantContext, quantize_decoder_linears_, quantize_layer_
from masquant.methods.weights import layer_weight_fn, summarize
from masquant.registry import register_method


@dataclass
class RTNConfig:
    id: str = "rtn"


@register_method("rtn", config=RTNConfig)
class RTN(Method):
    needs_calibration = False
    honours_weight_options = True

    def check(self, scheme, modalities) -> None:
        if scheme.is_dense:
            raise MethodConfigError("method=rtn with quant=fp16 quantizes nothing; use method=dense")
        if scheme.quantize_acts and not scheme.a_dynamic:
            raise MethodConfigError(
                "method=rtn has no calibration, so it cannot set static activation scales (quant.a_dynamic=false); "
                "use a calibrated method (e.g. smoothquant) or quant.a_dynamic=true"
            )

    def apply(self, ctx: QuantContext, stats) -> dict:
        if ctx.scheme.w_quantizer == "gptq":
            n, per_layer = 0, []
            for step in ctx.walk(quantized_stream=True, fp_stream=False, desc="gptq"):
                per_layer.append(layer_weight_fn(ctx, step))
                n += quantize_layer_(ctx, step.layer, weight_for=per_layer[-1].weight_for)
            return {"quant/linears": n, **summarize(per_layer, "gptq")}
        if ctx.scheme.w_mse_clip:
            n = sum(quantize_layer_(ctx, layer, weight_for=layer_weight_fn(ctx, layer=layer).weight_for)
                    for layer in ctx.adapter.decoder_layers())
            return {"quant/linears": n}
        return {"quant/linears": quantize_decoder_linears_(ctx, desc="rtn")}
