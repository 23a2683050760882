"""Loading a checkpoint folder that holds a compressed-tensors quantized model (e.g. one `masquant.export` wrote)."""

from __future__ import annotations

import json
from pathlib import Path


def checkpoint_quantization(path: str | Path) -> dict | None:
    """The folder's compressed-tensors ``quantization_config``, or None (a plain checkpoint)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    qc = json.loads(config.read_text()).get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors" else None


def quantizes_activations(qc: dict) -> bool:
    return any(g.get("input_activations") for g in qc.get("config_groups", {}).values())


FP4_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")


def has_fp4_weights(qc: dict) -> bool:
    return qc.get("format") in FP4_FORMATS or any(g.get("format") in FP4_FORMATS
                                                   for g in qc.get("config_groups", {}).values())


def load_kwargs(path: str | Path) -> dict:
    """``from_pretrained`` keyword arguments for a folder: for a compressed-tensors checkpoint whose activations
    are not quantized, ``CompressedTensorsConfig(dequantize=True)`` (the weights are dequantized once at load: plain
    linears, and the only route transformers 5.23 + compressed-tensors 0.20 take for asymmetric packed weights,
    whose zero points the compressed route mis-shapes); with quantized activations, or FP4 weights (whose scales
    :func:`load_checkpoint` needs after decompression), the compressed-tensors route, whose linears quantize their
    inputs as the checkpoint says."""
    qc = checkpoint_quantization(path)
    if qc is None:
        return {}
    from transformers.utils.quantization_config import CompressedTensorsConfig

    compressed = quantizes_activations(qc) or has_fp4_weights(qc)
    return {"quantization_config": CompressedTensorsConfig(dequantize=not compressed)}


def load_checkpoint(model_cls, path: str | Path, dtype):
    """``model_cls.from_pretrained(path, dtype=dtype)`` with :func:`load_kwargs` (transformers' note that the
    folder's own quantization config is used beside the passed loading option is expected here: silenced).

    On the compressed route compressed-tensors 0.20 decompresses FP4 weights (NVFP4, MXFP4) only at the first
    forward, and to bfloat16 whatever ``dtype`` says (a linear left so fails on ``dtype`` inputs; an NVFP4 weight,
    code · s_b / g, rounded to bf16). Here the model is decompressed at load, its linears' bf16/fp16 tensors are
    cast to ``dtype``, and each NVFP4 weight is decoded again in ``dtype`` from its own codes and scales (the codes
    are the nearest E2M1 values of weight / (s_b / g): the bf16 error is far below half their spacing), so the
    loaded model computes what the checkpoint holds."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = model_cls.from_pretrained(path, dtype=dtype, **load_kwargs(path))
    if checkpoint_quantization(path) is not None:
        _decompress_to_dtype_(model, dtype)
    return model


def _decompress_to_dtype_(model, dtype) -> None:
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
    if compressor is not None and any(getattr(m, "weight", None) is None for m in linears):
        compressor.decompress_model(model)
    with torch.no_grad():
        for m in linears:
            for name, p in list(m.named_parameters(recurse=False)):
                if p.dtype in (torch.bfloat16, torch.float16, torch.float32) and p.dtype != dtype:
                    p.data = p.data.to(dtype)
            if getattr(m, "weight_global_scale", None) is not None and getattr(m, "weight", None) is not None:
                _redecode_nvfp4_(m)


def _redecode_nvfp4_(m) -> None:
    """The NVFP4 weight code · (s_b / g) in the weight's dtype, its codes recovered from the decompressed weight."""
    from masquant.quant.formats import FloatGrid

    W = m.weight.data
    scale = (m.weight_scale.data.float() / m.weight_global_scale.data.float()).to(W.dtype)
    scale = scale.repeat_interleave(W.shape[1] // scale.shape[1], dim=1)
    m.weight.data = FloatGrid("nvfp4").round(W / scale) * scale
