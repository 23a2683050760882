"""Model loading (testbed, tiny, local folder) and the calibration set of each source, through the adapters."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from masquant.adapters.registry import adapter_class_for
from masquant.calibration.data import CalibrationDataError, CalibrationSet, read_calibration_file, split_rows

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _src(value) -> str:
    return str(getattr(value, "value", value))


def load_model_and_processor(mcfg, cache_dir: str, device: torch.device):
    source = _src(mcfg.source)
    dtype = _DTYPES[_src(mcfg.dtype)]
    if source == "testbed":
        from masquant.testbed.model import TESTBED_VERSION, load_testbed_vl

        folder = Path(cache_dir).expanduser() / "testbed" / f"testbed-vl-{TESTBED_VERSION}"
        model, processor = load_testbed_vl(folder, dtype=dtype)
    elif source == "testbed_omni":
        from masquant.testbed.omni import load_testbed_omni

        model, processor = load_testbed_omni(cache_dir, dtype=dtype)
    elif source == "tiny":
        model, processor = adapter_class_for(str(mcfg.tiny_type)).tiny(seed=0)
        model = model.to(dtype)
    elif source == "local":
        model, processor = load_local(Path(str(mcfg.path)).expanduser(), dtype)
    else:  # guarded by the config schema
        raise ValueError(f"model.source={source!r}")
    from masquant.adapters.registry import get_adapter
    from masquant.placement import place_model_

    placement = _src(getattr(mcfg, "placement", "device"))
    max_memory = getattr(mcfg, "max_memory_gib", None)
    return place_model_(model, get_adapter(model), placement, device, max_memory), processor


def load_local(path: Path, dtype):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    adapter_cls = adapter_class_for(config.model_type)
    log.info("loading %s (%s) from %s", config.model_type, adapter_cls.__name__, path)
    return adapter_cls.load_pretrained(path, dtype), adapter_cls.load_processor(path)


def calibration_rows(ccfg, adapter_cls, n: int, held_out: int) -> tuple[list[dict], list[dict], dict]:
    """(calibration rows, held-out rows, a description recorded with the results), disjoint by construction."""
    source = _src(ccfg.source)
    if source == "testbed" and "audio" in adapter_cls.token_id_attrs:  # testbed-omni: image + audio + question
        from masquant.testbed.audio_tasks import make_omni_calibration_samples

        rows = make_omni_calibration_samples(n + held_out)
        return rows[:n], rows[n:], {"source": "testbed", "split": "calib", "rows": "omni"}
    if source == "testbed":
        from masquant.testbed import make_calibration_samples

        rows = make_calibration_samples(n + held_out)  # distinct synthetic documents of the calib split
        return rows[:n], rows[n:], {"source": "testbed", "split": "calib"}
    if source == "tiny":
        from masquant.adapters.tiny import tiny_rows

        rows = tiny_rows(n + held_out, int(ccfg.seed), adapter_cls.tiny_modalities())
        return rows[:n], rows[n:], {"source": "tiny", "seed": int(ccfg.seed)}
    rows = read_calibration_file(ccfg.path)
    if ccfg.held_out_path:
        held = read_calibration_file(ccfg.held_out_path)
        if len(rows) < n or len(held) < held_out:
            raise CalibrationDataError(
                f"calib.path={ccfg.path} has {len(rows)} rows for calib.n_samples={n}; calib.held_out_path="
                f"{ccfg.held_out_path} has {len(held)} rows for calib.held_out={held_out}")
        import random

        idx = sorted(random.Random(int(ccfg.seed)).sample(range(len(rows)), n))
        return [rows[i] for i in idx], held[:held_out], {"source": "file", "rows": idx,
                                                          "held_out_file": str(ccfg.held_out_path)}
    if len(rows) < n + held_out:
        raise CalibrationDataError(f"calib.path={ccfg.path} has {len(rows)} rows; calib.n_samples + calib.held_out "
                                   f"= {n + held_out}")
    calib_idx, held_idx = split_rows(rows, n, held_out, int(ccfg.seed))
    return ([rows[i] for i in calib_idx], [rows[i] for i in held_idx],
            {"source": "file", "rows": calib_idx, "held_out_rows": held_idx, "seed": int(ccfg.seed)})


def calibration_sets(cfg, processor, adapter) -> tuple[CalibrationSet, CalibrationSet, dict]:
    """The calibration set and the held-out fidelity set of a run."""
    c = cfg.calib
    held_out = int(c.held_out) if cfg.eval.fidelity else 0
    if _src(c.source) == "text":
        return text_calibration_sets(c, processor, held_out)
    calib_rows, held_rows, description = calibration_rows(c, type(adapter), int(c.n_samples), held_out)
    calib = CalibrationSet.from_rows(processor, calib_rows, description, with_answers=bool(c.with_answers))
    held = CalibrationSet.from_rows(processor, held_rows, description, desc="held-out prompts")
    return calib, held, description


def ppl_sequences(processor, ecfg) -> torch.Tensor:
    """The held-out sequences of the text corpus [eval.ppl_sequences, eval.ppl_seq_len] for perplexity."""
    from masquant.evaluation.text_corpus import corpus_parts, evenly_spaced, token_sequences

    tokenizer = getattr(processor, "tokenizer", processor)
    held = token_sequences(tokenizer, corpus_parts()[1], int(ecfg.ppl_seq_len))
    return evenly_spaced(held, int(ecfg.ppl_sequences))


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
