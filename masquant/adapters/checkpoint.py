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


def load_kwargs(path: str | Path) -> dict:
    """``from_pretrained`` keyword arguments for a folder: for a compressed-tensors checkpoint whose activations
    are not quantized, ``CompressedTensorsConfig(dequantize=True)`` (the weights are dequantized once at load: plain
    linears, and the only route transformers 5.23 + compressed-tensors 0.20 take for asymmetric packed weights,
    whose zero points the compressed route mis-shapes); with quantized activations the compressed-tensors route,
    whose linears quantize their inputs as the checkpoint says."""
    qc = checkpoint_quantization(path)
    if qc is None:
        return {}
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=not quantizes_activations(qc))}


def load_checkpoint(model_cls, path: str | Path, dtype):
    """``model_cls.from_pretrained(path, dtype=dtype)`` with :func:`load_kwargs` (transformers' note that the
    folder's own quantization config is used beside the passed loading option is expected here: silenced)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return model_cls.from_pretrained(path, dtype=dtype, **load_kwargs(path))
