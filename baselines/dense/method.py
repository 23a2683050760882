"""The unquantized reference (FP16/FP32 as loaded)."""

from __future__ import annotations

from dataclasses import dataclass

from masquant.methods.base import Method, MethodConfigError, QuantContext
from masquant.registry import register_method


@dataclass
class DenseConfig:
    id: str = "dense"


@register_method("dense", config=DenseConfig)
class Dense(Method):
    needs_calibration = False

    def check(self, scheme, modalities) -> None:
        if not scheme.is_dense:
            raise MethodConfigError(
                f"method=dense runs the unquantized model but quant={scheme.name} quantizes; use quant=fp16"
            )

    def apply(self, ctx: QuantContext, stats) -> dict:
        return {}
