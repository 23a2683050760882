from masquant.quant.scheme import QuantScheme
from masquant.quant.quantizer import (
    fake_quant_asym,
    fake_quant_sym,
    quantize_activation,
    quantize_weight,
    round_ste,
)
from masquant.quant.linear import ModalityPath, ModalityRouter, QuantLinear, attach_router, scatter_rows

__all__ = [
    "QuantScheme",
    "fake_quant_sym",
    "fake_quant_asym",
    "quantize_weight",
    "quantize_activation",
    "round_ste",
    "QuantLinear",
    "ModalityPath",
    "ModalityRouter",
    "attach_router",
    "scatter_rows",
]
