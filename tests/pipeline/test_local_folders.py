"""A checkpoint folder of every adapter's tiny model (weights, config, tokenizer, processor files, as a real
checkpoint has them) runs end to end through the CLI on our install (no torchvision: the video processor
of the Qwen families cannot be built, and the run must not need it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from masquant.adapters.processors import save_processor_parts
from support.tiny import MODEL_TYPES, tiny

ROOT = Path(__file__).resolve().parents[2]


def write_checkpoint(model_type: str, folder: Path) -> Path:
    model, processor, cls = tiny(model_type)
    model.save_pretrained(folder)
    save_processor_parts(processor, folder, cls.processor_class)
    return folder


def test_qwen_folder_needs_the_fallback_processor(tmp_path):
    """AutoProcessor fails on a Qwen2.5-VL folder here (torchvision); the adapter's loader builds it anyway."""
    from transformers import AutoProcessor

    from masquant.adapters import adapter_class_for

    folder = write_checkpoint("qwen2_5_vl", tmp_path / "qwen")
    with pytest.raises(ImportError, match="orchvision"):
        AutoProcessor.from_pretrained(folder)
    processor = adapter_class_for("qwen2_5_vl").load_processor(folder)
    assert processor.video_processor is None and processor.image_processor is not None
    assert processor.chat_template and processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") > 0


def test_every_adapter_folder_runs_through_the_cli(tmp_path):
    folders = [write_checkpoint(t, tmp_path / "models" / t) for t in MODEL_TYPES]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "masquant", "-m", "hydra.verbose=false", "model=local", "model.dtype=float32",
           "model.path=" + ",".join(str(f) for f in folders), "calib=tiny", "calib.n_samples=2", "calib.held_out=1",
           "eval=fidelity", "eval.ppl_sequences=4", "method=rtn", "quant=w8a8", f"paths.output_root={tmp_path}/out",
           f"paths.cache_dir={tmp_path}/cache", f"hydra.sweep.dir={tmp_path}/multirun"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").rglob("metrics.json")]
    rtn = {r["run/config_hash"]: r for r in results if r["run/method"] == "rtn"}
    assert len(rtn) == len(MODEL_TYPES) and sum(r["run/method"] == "dense" for r in results) == len(MODEL_TYPES)
    for r in rtn.values():
        assert 10 < r["fidelity/sqnr/all/e2e"] < 80 and r["fidelity/ppl"] > 1
