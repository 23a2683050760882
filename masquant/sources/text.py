"""``calib.source=text``: text-only calibration sequences of the built-in corpus
(:mod:`masquant.evaluation.text_corpus`), and held-out sequences of its other part for the SQNR."""

from __future__ import annotations

import torch

from masquant.calibration.data import CalibrationSet
from masquant.sources.registry import CalibrationSource, register_calibration_source


@register_calibration_source
class TextCorpus(CalibrationSource):
    name = "text"
    has_answers = False
    text_only = True

    def sets(self, cfg, processor, adapter):
        held_out = int(cfg.calib.held_out) if cfg.eval.fidelity else 0
        return text_calibration_sets(cfg.calib, processor, held_out)


def text_calibration_sets(ccfg, processor, held_out: int) -> tuple[CalibrationSet, CalibrationSet, dict]:
    """calib=text: the corpus's calibration sequences, and held-out sequences for the SQNR (text only)."""
    from masquant.evaluation.text_corpus import corpus_parts, evenly_spaced, token_sequences

    tokenizer = getattr(processor, "tokenizer", processor)
    calib_text, held_text = corpus_parts()
    seq_len = int(ccfg.seq_len)

    def batches(seqs):
        return [{"input_ids": s[None], "attention_mask": torch.ones(1, seq_len, dtype=torch.long)} for s in seqs]

    calib = evenly_spaced(token_sequences(tokenizer, calib_text, seq_len), int(ccfg.n_samples))
    # held-out SQNR sequences come from the held-out part, offset from the perplexity ones
    held = evenly_spaced(token_sequences(tokenizer, held_text, seq_len)[1::2], held_out) if held_out else calib[:0]
    description = {"source": "text", "corpus": "pydoc_data.topics", "seq_len": seq_len}
    return (CalibrationSet(batches(calib), description=description),
            CalibrationSet(batches(held), description=description), description)
