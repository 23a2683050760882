"""The runner end to end on CPU with a tiny random Qwen2.5-VL, and every error case of the config."""

import json

import pytest

from masquant.app import pipeline
from masquant.app.pipeline import ConfigError, resolve
from masquant.app.main import run_with_reference


def test_end_to_end_dense_and_rtn_rows_then_skip(compose_cfg, tiny_overrides, tmp_path):
    cfg = compose_cfg(*tiny_overrides, "method=rtn", "quant=w4a8")
    dense, rtn = run_with_reference(cfg)
    assert dense["run/method"] == "dense" and rtn["run/method"] == "rtn"
    assert dense["fidelity/sqnr/all/e2e"] == float("inf")  # the reference against itself
    assert 0 < rtn["fidelity/sqnr/text/e2e"] < 60 and 0 < rtn["fidelity/sqnr/vision/e2e"] < 60
    # measured once: the dense run's perplexity is its FP perplexity, and the RTN run takes it from the dense result
    assert dense["fidelity/ppl"] == dense["fidelity/ppl_fp"] and "fidelity/ppl_fp_from" not in dense
    assert rtn["fidelity/ppl_fp"] == dense["fidelity/ppl_fp"]
    assert rtn["fidelity/ppl_fp_from"] == dense["run/config_hash"]
    # and the reused value is what a measurement gives (another output folder: no dense result to reuse)
    alone = pipeline.run(compose_cfg(*tiny_overrides, "method=rtn", "quant=w4a8", "reference=false",
                                     f"paths.output_root={tmp_path / 'alone'}"))
    assert "fidelity/ppl_fp_from" not in alone
    assert alone["fidelity/ppl_fp"] == pytest.approx(dense["fidelity/ppl_fp"], rel=1e-6)
    spec = resolve(cfg)
    files = sorted(p.name for p in spec.run_dir.iterdir())
    assert {"metrics.json", "config.yaml", "run.log"} <= set(files)
    assert json.loads((spec.run_dir / "metrics.json").read_text())["run/config_hash"] == spec.config_hash
    # a finished result for the same hash is skipped: _execute must not run again
    calls = []
    orig = pipeline._execute
    pipeline._execute = lambda *a: calls.append(1) or orig(*a)
    try:
        again = pipeline.run(cfg)
    finally:
        pipeline._execute = orig
    assert calls == [] and again == rtn


def test_crash_leaves_nothing_that_looks_finished(compose_cfg, tiny_overrides, monkeypatch):
    cfg = compose_cfg(*tiny_overrides, "method=rtn", "quant=w8a8", "reference=false")
    from baselines.rtn.method import RTN

    def boom(self, ctx, step):
        raise RuntimeError("simulated crash during quantization")

    monkeypatch.setattr(RTN, "plan_block", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(cfg)
    spec = resolve(cfg)
    assert not pipeline.is_finished(spec.run_dir)
    assert not list(spec.run_dir.parent.rglob("metrics.json"))
    failed = spec.run_dir.with_name(f".{spec.run_dir.name}.failed")
    assert (failed / "run.log").exists()
    monkeypatch.undo()
    assert pipeline.run(cfg)["run/method"] == "rtn"  # the next run starts clean and finishes


def test_rtn_sqnr_falls_as_bits_fall(compose_cfg, tiny_overrides):
    sqnr = []
    for q in ("w8a8", "w4a8", "w4a4"):
        m = pipeline.run(compose_cfg(*tiny_overrides, "method=rtn", f"quant={q}", "eval.ppl=false"))
        sqnr.append(m["fidelity/sqnr/all/e2e"])
    assert sqnr[0] > sqnr[1] > sqnr[2]


@pytest.mark.parametrize("overrides,match", [
    (["model=qwen25vl_7b"], "model.path"),
    (["model=qwen25vl_7b", "model.path=/nonexistent/Qwen2.5-VL-7B"], "/nonexistent/Qwen2.5-VL-7B"),
    (["calib=file"], "calib.path"),
    (["calib=file", "calib.path=/nonexistent/calib.json"], "/nonexistent/calib.json"),
    (["method=rtn", "quant=fp16"], "method=dense"),
    (["method=dense", "quant=w4a8"], "quant=fp16"),
    (["eval.limit=0"], "eval.limit"),
    (["eval.tasks=[textvqa_val,imagenet]"], "imagenet"),
    (["eval.data_root=/nonexistent/data"], "/nonexistent/data"),
    (["+eval.max_new_tokens_per_task.textvqa_vall=8"], r"max_new_tokens_per_task.textvqa_vall: 'textvqa_vall' is neither"),
    (["+eval.max_new_tokens_per_task.textvqa_val=0"], r"max_new_tokens_per_task.textvqa_val=0: must be >= 1"),
])
def test_config_errors_before_any_work(compose_cfg, tiny_overrides, overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve(compose_cfg(*tiny_overrides, *overrides))


def test_model_type_without_adapter(compose_cfg, tiny_overrides, tmp_path):
    folder = tmp_path / "weird-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="no adapter for model_type 'gpt2'.*qwen2_5_vl"):
        resolve(compose_cfg(*tiny_overrides, "model=qwen25vl_7b", f"model.path={folder}"))


def test_modality_the_model_lacks(compose_cfg, tiny_overrides):
    with pytest.raises(ConfigError, match="audio"):
        pipeline.run(compose_cfg(*tiny_overrides, "modality=text_vision_audio", "reference=false"))
