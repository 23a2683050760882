"""Round-to-nearest: the floor every method is compared against. No calibration."""

from __future__ import annotations

from dataclasses import dataclass

from masquant.methods.base import Method, MethodConfigError, QuantContext, quantize_decoder_linears_
from masquant.registry import register_method


@dataclass
class RTNConfig:
    id: str = "rtn"


@register_method("rtn", config=RTNConfig)
class RTN(Method):
    needs_calibration = False

    def check(self, scheme, modalities) -> None:
        if scheme.is_dense:
            raise MethodConfigError("method=rtn with quant=fp16 quantizes nothing; use method=dense")
        if scheme.quantize_acts and not scheme.a_dynamic:
            raise MethodConfigError(
                "method=rtn has no calibration, so it cannot set static activation scales (quant.a_dynamic=false); "
                "use a calibrated method (e.g. smoothquant) or quant.a_dynamic=true"
            )

    def apply(self, ctx: QuantContext, stats) -> dict:
        n = quantize_decoder_linears_(ctx, desc="rtn")
        return {"quant/linears": n}
