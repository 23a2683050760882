"""A run's model and data through its sources: the model placed as ``model.placement`` says, the calibration
and held-out sets, and the perplexity sequences."""

from __future__ import annotations

import torch

from masquant.sources.registry import calibration_source, model_source

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _value(x) -> str:
    return str(getattr(x, "value", x))


def load_model_and_processor(mcfg, cache_dir: str, device: torch.device):
    """(model placed for the run, processor) from ``model.source``."""
    from masquant.adapters.registry import get_adapter
    from masquant.engine.placement import place_model_

    model, processor = model_source(mcfg.source).load(mcfg, cache_dir, DTYPES[_value(mcfg.dtype)])
    placement = _value(getattr(mcfg, "placement", "device"))
    max_memory = getattr(mcfg, "max_memory_gib", None)
    return place_model_(model, get_adapter(model), placement, device, max_memory), processor


def calibration_sets(cfg, processor, adapter):
    """The calibration set and the held-out fidelity set of a run, and their description."""
    return calibration_source(cfg.calib.source).sets(cfg, processor, adapter)


def ppl_sequences(processor, ecfg) -> torch.Tensor:
    """The held-out sequences of the text corpus [eval.ppl_sequences, eval.ppl_seq_len] for perplexity."""
    from masquant.evaluation.text_corpus import corpus_parts, evenly_spaced, token_sequences

    tokenizer = getattr(processor, "tokenizer", processor)
    held = token_sequences(tokenizer, corpus_parts()[1], int(ecfg.ppl_seq_len))
    return evenly_spaced(held, int(ecfg.ppl_sequences))
