"""export=compressed_tensors in runs: the folder and export.json inside the published run, the export of a finished
run (no re-run of its results), the refusal of an unfinished run folder, and the folder evaluated back through
masquant (model=local) with the metrics of the run that wrote it."""

from __future__ import annotations

import json

import pytest

from masquant.app import pipeline
from masquant.errors import ConfigError
from masquant.app.export_cli import export_run_folder
from masquant.runs.store import RESULT_FILE


def test_run_writes_a_verified_export(compose_cfg, tiny_overrides):
    cfg = compose_cfg(*tiny_overrides, "method=rtn", "quant=w4a16_g128", "reference=false",
                      "export=compressed_tensors")
    metrics = pipeline.run(cfg)
    run_dir = pipeline.resolve(cfg).run_dir
    record = json.loads((run_dir / "export" / "export.json").read_text())
    assert record["reload"]["max_rel_diff"] <= 1e-6 and record["reload"]["tokens"] > 0
    assert record["schemes"] == [{"name": "w4a16_g128", "tag": "W4A16-g128", "grid": "W asym g128 / A16",
                                  "int_range": "narrow"}]
    assert (run_dir / "export" / "model" / "model.safetensors").is_file()
    assert metrics["export/max_rel_diff"] <= 1e-6
    assert metrics["export/ppl"] == pytest.approx(metrics["fidelity/ppl"], rel=1e-6)
    assert json.loads((run_dir / RESULT_FILE).read_text())["export/size_mb"] == metrics["export/size_mb"]


def test_finished_run_is_exported_without_rerunning_it(compose_cfg, tiny_overrides):
    overrides = (*tiny_overrides, "method=rtn", "quant=w8a8", "quant.int_range=full", "reference=false",
                 "++eval.max_new_tokens_per_task.textvqa_val=3")  # a dict of the run's own: composed back too
    first = pipeline.run(compose_cfg(*overrides))
    run_dir = pipeline.resolve(compose_cfg(*overrides)).run_dir
    assert not (run_dir / "export").exists()
    again = pipeline.run(compose_cfg(*overrides, "export=compressed_tensors"))
    assert (run_dir / "export" / "export.json").is_file()
    assert again["provenance/wall_s"] == first["provenance/wall_s"]  # the finished results, not a new run
    assert again["export/sqnr/all/e2e"] == pytest.approx(first["fidelity/sqnr/all/e2e"], abs=1e-6)
    # the command for a run folder re-exports it (it replaces the earlier export)
    redone = export_run_folder(run_dir)
    assert redone["export/max_rel_diff"] <= 1e-6
    with pytest.raises(ConfigError, match="only export.\\* keys"):
        export_run_folder(run_dir, ["quant.w_bits=3"])


@pytest.mark.parametrize("eval_group", ["testbed", "fidelity"])
def test_a_run_folder_composes_back_to_its_config_hash(compose_cfg, tmp_path, eval_group):
    """config.yaml as a run writes it (resolved; eval=testbed carries per-task dicts) gives the run's hash again."""
    from omegaconf import OmegaConf

    from masquant.app.export_cli import run_folder_config
    from masquant.runs.store import RESULT_FILE

    cfg = compose_cfg("method=masquant", "quant=w4a8", "quant.int_range=full", f"eval={eval_group}",
                      "method.cmc.rank=4")
    spec = pipeline.resolve(cfg)
    folder = tmp_path / spec.run_dir.name
    folder.mkdir()
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (folder / RESULT_FILE).write_text("{}")
    again = run_folder_config(folder, ["export.dtype=bfloat16"])
    assert pipeline.resolve(again).config_hash == spec.config_hash
    assert again.export.dtype.value == "bfloat16"


def test_unfinished_run_folder_is_refused(tmp_path):
    folder = tmp_path / "runs" / "m" / "rtn" / "w4a8-0123456789"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("method: {id: rtn}\n")
    with pytest.raises(ConfigError, match="not a finished run folder"):
        export_run_folder(folder)


def test_exported_folder_evaluates_back_to_the_run_metrics(compose_cfg, tiny_overrides):
    """model=local on the exported folder, as a dense model: its perplexity and SQNR are the quantized run's."""
    cfg = compose_cfg(*tiny_overrides, "method=rtn", "quant=w4a16_g128", "reference=false",
                      "export=compressed_tensors")
    quantized = pipeline.run(cfg)
    folder = pipeline.resolve(cfg).run_dir / "export" / "model"
    local = [o for o in tiny_overrides if not o.startswith("model=")]
    back = pipeline.run(compose_cfg(*local, "model=local", f"model.path={folder}", "model.name=exported",
                                    "model.dtype=float32", "method=dense", "quant=fp16", "reference=false"))
    assert back["fidelity/ppl_fp"] == pytest.approx(quantized["fidelity/ppl"], rel=1e-6)
