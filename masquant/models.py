"""Model loading (testbed, tiny, local folder) and calibration inputs for each source."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from masquant.calibration.data import chat_inputs, load_media, read_calibration_file

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
    elif source == "tiny":
        from masquant.testing import tiny_model

        model, processor = tiny_model(str(mcfg.tiny_type)).to(dtype), None
    elif source == "local":
        model, processor = _load_local(Path(str(mcfg.path)).expanduser(), dtype)
    else:  # guarded by the config schema
        raise ValueError(f"model.source={source!r}")
    return model.to(device).eval(), processor


def _load_local(path: Path, dtype):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from masquant.adapters.registry import adapter_class_for

    config = AutoConfig.from_pretrained(path)
    adapter_cls = adapter_class_for(config.model_type)
    loader = getattr(adapter_cls, "load_pretrained", None)
    log.info("loading %s (%s) from %s", config.model_type, adapter_cls.__name__, path)
    model = loader(path, dtype) if loader else AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def calibration_batches(cfg, processor, adapter, n: int) -> list[dict]:
    """n calibration prompts as model inputs (batch size 1 each, no truncation)."""
    source = _src(cfg.calib.source)
    if source == "tiny":
        from masquant.testing import tiny_qwen_vl_inputs

        return [tiny_qwen_vl_inputs(seed=cfg.calib.seed * 1000 + i) for i in range(n)]
    if processor is None:
        raise ValueError(f"calib.source={source} needs a processor; model {cfg.model.name} has none")
    if source == "testbed":
        from masquant.testbed import make_calibration_samples

        rows = make_calibration_samples(n)
    else:
        import random

        rows = read_calibration_file(cfg.calib.path)
        if len(rows) < n:
            raise ValueError(f"calib.path={cfg.calib.path} has {len(rows)} rows; calib.n_samples + calib.held_out = {n}")
        rows = random.Random(int(cfg.calib.seed)).sample(rows, n)
    return [chat_inputs(processor, **load_media(r)) for r in tqdm(rows, desc="calibration prompts", leave=False)]


def ppl_token_ids(processor, model) -> torch.Tensor:
    """Token ids of the packaged English paragraph (or random ids for tokenizer-less tiny models)."""
    if processor is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(5, min(290, model.config.get_text_config().vocab_size), (1, 128), generator=g)
    text = (Path(__file__).parent / "calibration" / "ppl_text.txt").read_text()
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer(text, return_tensors="pt").input_ids
