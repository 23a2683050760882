"""The unquantized reference (FP16/FP32 as loaded)."""

from __future__ import annotations

from dataclasses import dataclass

from masquant.methods.base import Method, MethodConfigError, QuantContext


@dataclass
class DenseConfig:
    id: str = "dense"


class Dense(Method):
    id = "dense"
    needs_calibration = False

    def check(self, scheme, modalities) -> None:
        if not scheme.is_dense:
            raise MethodConfigError(
                f"method=dense runs the unquantized model but quant={scheme.name} quantizes; use quant=fp16"
            )

    def collect(self, ctx: QuantContext):
        return None

    def apply(self, ctx: QuantContext, stats) -> dict:
        return {}
