"""Every user mistake fails fast with a message naming the bad key, value, path or row and the fix; no run
is lost or duplicated; caches and result folders heal. Each test is named after the mistake.

"Before the model loads" is checked with a counter of model loads, never with the clock.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from masquant.app import pipeline
from masquant.runs import store
from support.cli import cli, loads  # noqa: F401  (fixtures)


def _fails_before_load(cli, loads, *overrides, match: str):
    code, out = cli(*overrides)
    assert code != 0, out[-2000:]
    assert match in out, out[-2000:]
    assert "Traceback" not in out
    assert loads == [], "the model was loaded before the mistake was found"
    return out


TINY = ["model=tiny_qwen25vl", "calib=tiny", "eval=fidelity", "calib.n_samples=2", "calib.held_out=1"]


# --- 1. bad method / quant values are found before the dense reference runs --------------------------------
def test_bad_method_value_fails_before_the_reference_run(cli, loads, tmp_path):
    _fails_before_load(cli, loads, *TINY, f"paths.output_root={tmp_path}/o", "method=smoothquant",
                       "method.alpha=-1", match="method.alpha")
    assert not (tmp_path / "o" / "runs").exists()  # not even the dense reference ran


def test_bad_quant_value_fails_before_the_reference_run(cli, loads, tmp_path):
    _fails_before_load(cli, loads, *TINY, f"paths.output_root={tmp_path}/o", "quant.w_bits=1", match="quant.w_bits=1")


def test_bad_job_in_a_sweep_fails_the_sweep_before_any_job_runs(cli, loads, tmp_path):
    out = _fails_before_load(cli, loads, "-m", *TINY, f"paths.output_root={tmp_path}/o", "method=rtn,smoothquant",
                             "quant=w8a8,w4a16_g128", f"hydra.sweep.dir={tmp_path}/sweep",
                             match="1 of 4 sweep jobs have configuration errors")
    assert "method=smoothquant quant=w4a16_g128" in out and "weight-only" in out
    assert not (tmp_path / "o" / "runs").exists()


# --- 2. calibration files ----------------------------------------------------------------------------------
def _calib_file(tmp_path, rows, name="calib.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def test_corrupt_image_in_calibration_file(cli, loads, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    path = _calib_file(tmp_path, [{"question": "q", "image": "broken.png"}] * 4)
    _fails_before_load(cli, loads, *TINY, "calib=file", f"calib.path={path}", f"paths.output_root={tmp_path}/o",
                       match="row 0 image='")


def test_image_path_that_is_a_folder(cli, loads, tmp_path):
    (tmp_path / "images").mkdir()
    from masquant.adapters.tiny import random_image

    random_image(0).save(tmp_path / "ok.png")
    path = _calib_file(tmp_path, [{"question": "q", "image": "ok.png"}, {"question": "q", "image": "images"},
                                  {"question": "q", "image": "ok.png"}])
    out = _fails_before_load(cli, loads, *TINY, "calib=file", f"calib.path={path}", f"paths.output_root={tmp_path}/o",
                             match="row 1 image=")
    assert "folder" in out


def test_calibration_rows_that_are_not_objects(cli, loads, tmp_path):
    path = _calib_file(tmp_path, ["what is this?", "and this?", "and that?"])
    _fails_before_load(cli, loads, *TINY, "calib=file", f"calib.path={path}", f"paths.output_root={tmp_path}/o",
                       match="row 0 is a str")


def test_too_few_calibration_rows(cli, loads, tmp_path):
    path = _calib_file(tmp_path, [{"question": "q"}] * 2)
    _fails_before_load(cli, loads, *TINY, "calib=file", f"calib.path={path}", f"paths.output_root={tmp_path}/o",
                       match="has 2 rows; calib.n_samples + calib.held_out = 3")


def test_calibration_file_that_is_not_json(cli, loads, tmp_path):
    path = tmp_path / "calib.json"
    path.write_text('[{"question": "q"},')
    _fails_before_load(cli, loads, *TINY, "calib=file", f"calib.path={path}", f"paths.output_root={tmp_path}/o",
                       match="is not valid JSON")


def test_calibration_file_works_with_the_tiny_model(cli, tmp_path):
    from masquant.adapters.tiny import random_image

    random_image(1).save(tmp_path / "a.png")
    path = _calib_file(tmp_path, [{"question": f"what is {i}?", "image": "a.png", "answer": "red"} for i in range(3)])
    code, out = cli(*TINY, "calib=file", f"calib.path={path}", f"paths.output_root={tmp_path}/o", "method=rtn",
                    "quant=w8a8")
    assert code == 0, out[-2000:]


# --- 3. local model folders --------------------------------------------------------------------------------
def test_model_folder_of_an_unknown_model_type(cli, loads, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mystery_vlm"}))
    _fails_before_load(cli, loads, *TINY[1:], "model=local", f"model.path={folder}", f"paths.output_root={tmp_path}/o",
                       match="no adapter for model_type 'mystery_vlm'")


def test_model_folder_without_weights(cli, loads, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    _fails_before_load(cli, loads, *TINY[1:], "model=local", f"model.path={folder}", f"paths.output_root={tmp_path}/o",
                       match="no weights")


def test_model_folder_with_a_truncated_safetensors_file(cli, loads, tmp_path):
    from support.tiny import tiny

    folder = tmp_path / "m"
    tiny("qwen2_5_vl")[0].save_pretrained(folder)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _fails_before_load(cli, loads, *TINY[1:], "model=local", f"model.path={folder}", f"paths.output_root={tmp_path}/o",
                       match="is truncated")


def test_model_folder_with_a_broken_config(cli, loads, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{model_type: qwen")
    _fails_before_load(cli, loads, *TINY[1:], "model=local", f"model.path={folder}", f"paths.output_root={tmp_path}/o",
                       match="config.json is not valid JSON")


# --- 4. output root ----------------------------------------------------------------------------------------
def test_output_root_that_is_a_file(cli, loads, tmp_path):
    (tmp_path / "file").write_text("x")
    _fails_before_load(cli, loads, *TINY, f"paths.output_root={tmp_path}/file", match="is a file, not a folder")


def test_output_root_that_cannot_be_created(cli, loads):
    _fails_before_load(cli, loads, *TINY, "paths.output_root=/proc/masquant-out", match="cannot be written")


# --- 5. values nobody validated ----------------------------------------------------------------------------
@pytest.mark.parametrize("override,match", [
    ("device=tpu", "device='tpu': valid choices are auto, cpu, cuda"),
    ("threads=-1", "threads=-1"),
    ("seed=-1", "seed=-1"),
    ("calib.n_samples=-1", "calib.n_samples=-1"),
    ("calib.held_out=-1", "calib.held_out=-1"),
    ("calib.held_out=0", "calib.held_out=0 leaves no held-out prompts"),
])
def test_invalid_values(cli, loads, tmp_path, override, match):
    _fails_before_load(cli, loads, *TINY, "method=rtn", f"paths.output_root={tmp_path}/o", override, match=match)


def test_zero_calibration_samples_for_a_calibrated_method(cli, loads, tmp_path):
    _fails_before_load(cli, loads, *TINY, "method=smoothquant", "calib.n_samples=0", f"paths.output_root={tmp_path}/o",
                       match="calib.n_samples=0: method=smoothquant needs calibration samples")


def test_group_size_that_does_not_divide_the_layer_width(compose_cfg, tmp_path):
    """The tiny model's widths are 64 and 128: group 48 leaves a last group of 16 (its own scale)."""
    m = pipeline.run(compose_cfg(*TINY, "method=rtn", "quant=w4a16_g128", "quant.w_group_size=48", "reference=false"))
    assert 10 < m["fidelity/sqnr/all/e2e"] < 80


# --- 6. keys that do not apply -----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    (["calib=testbed", "calib.path=/data/calib.json"], "calib.path='/data/calib.json' is not read with calib.source=testbed; it needs calib=file"),
    (["model.path=/models/x"], "model.path='/models/x' is not read with model.source=tiny; it needs model=local"),
    (["quant=w4a8", "quant.w_group_size=128"], "quant.w_group_size=128 is not read with quant.w_granularity=channel"),
    (["+unknown_key=1"], "unknown_key: masquant reads no such key"),
    (["+calib.sampels=3"], "calib.sampels: masquant reads no such key"),
])
def test_keys_that_would_be_ignored(cli, loads, tmp_path, overrides, match):
    _fails_before_load(cli, loads, *TINY, "method=rtn", f"paths.output_root={tmp_path}/o", *overrides, match=match)


# --- 7. one failing job does not stop a sweep --------------------------------------------------------------
def test_a_job_that_crashes_does_not_stop_the_sweep(cli, tmp_path, monkeypatch):
    from baselines.smoothquant.method import SmoothQuant

    def boom(self, ctx, step):
        raise RuntimeError("simulated crash in one job")

    monkeypatch.setattr(SmoothQuant, "plan_block", boom)
    code, out = cli("-m", *TINY, f"paths.output_root={tmp_path}/o", "method=smoothquant,rtn", "quant=w8a8",
                    f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 1
    assert "1 of 2 sweep jobs failed" in out and "method=smoothquant" in out and "simulated crash" in out
    finished = sorted(p.parent.parent.name for p in (tmp_path / "o" / "runs").rglob("metrics.json"))
    assert finished == ["dense", "rtn"]  # the job after the failed one ran


# --- 9, 10. stale folders, atomic replacement, one run per configuration -----------------------------------
def test_partial_folder_of_a_killed_run_is_removed_at_start(compose_cfg):
    cfg = compose_cfg(*TINY, "method=rtn", "quant=w8a8", "reference=false")
    spec = pipeline.resolve(cfg)
    dead = spec.run_dir.with_name(f".{spec.run_dir.name}.partial-{store.HOST}-999999999")
    alive = spec.run_dir.with_name(f".{spec.run_dir.name}.partial-otherhost-1")
    for folder in (dead, alive):
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text("{}")
    pipeline.run(cfg)
    assert not dead.exists() and alive.exists()  # another host's folder is not ours to judge
    assert store.is_finished(spec.run_dir)


def test_kill_while_replacing_a_result_keeps_the_old_one(compose_cfg):
    cfg = compose_cfg(*TINY, "method=rtn", "quant=w8a8", "reference=false")
    first = pipeline.run(cfg)
    spec = pipeline.resolve(cfg)
    aside = spec.run_dir.with_name(f".{spec.run_dir.name}.replaced-{store.HOST}-999999999")
    os.replace(spec.run_dir, aside)  # a forced re-run was killed between moving the old result and publishing
    assert store.clean_stale(spec.run_dir) == []
    assert store.load_result(spec.run_dir) == first and not aside.exists()


def test_forced_rerun_replaces_the_result(compose_cfg):
    cfg = compose_cfg(*TINY, "method=rtn", "quant=w8a8", "reference=false")
    pipeline.run(cfg)
    spec = pipeline.resolve(cfg)
    (spec.run_dir / "marker").write_text("old")
    cfg.force = True
    pipeline.run(cfg)
    assert not (spec.run_dir / "marker").exists() and store.is_finished(spec.run_dir)
    assert not list(spec.run_dir.parent.glob(".*replaced*"))


def test_two_processes_on_one_config_compute_it_once(tmp_path):
    import subprocess

    cmd = [sys.executable, "-m", "masquant", "hydra.verbose=false", *TINY, "method=rtn", "quant=w8a8",
           "reference=false", f"paths.output_root={tmp_path}/o", f"paths.cache_dir={tmp_path}/c"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    computed = [o for o in outs if "results:" in o]
    waited = [o for o in outs if "finished result found" in o]
    assert len(computed) == 1 and len(waited) == 1, outs
    runs = [p.parent for p in (tmp_path / "o" / "runs").rglob("metrics.json")]
    assert len(runs) == 1 and not [p for p in runs[0].parent.iterdir() if p.is_dir() and p.name.startswith(".")]


# --- 8. corrupt statistics cache (see also tests/unit/test_stats_cache.py) ---------------------------------
def test_corrupt_statistics_cache_heals(compose_cfg, tmp_path):
    cfg = compose_cfg(*TINY, "method=smoothquant", "quant=w8a8", "reference=false")
    first = pipeline.run(cfg)
    entries = list((tmp_path / "cache" / "stats").glob("*.pt"))
    assert len(entries) == 1
    entries[0].write_bytes(b"garbage")
    cfg.force = True
    again = pipeline.run(cfg)
    assert again["fidelity/sqnr/all/e2e"] == first["fidelity/sqnr/all/e2e"]
    assert list((tmp_path / "cache" / "stats").glob("*.corrupt-*"))


# --- 11. the report tool -----------------------------------------------------------------------------------
def test_report_skips_bad_result_files_and_names_them(tmp_path, capsys):
    from masquant.reporting.cli import main as report

    good = {"run/model": "m", "run/method": "rtn", "run/bits": "W8A8", "fidelity/sqnr/text/e2e": 20.0}
    for name, content in [("good", json.dumps(good).encode()), ("truncated", b'{"run/model": "m", '),
                          ("latin1", '{"run/model": "\xe9"}'.encode("latin-1")), ("list", b"[1, 2]")]:
        folder = tmp_path / "runs" / "m" / name
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_bytes(content)
    assert report([str(tmp_path / "runs")]) == 0
    out = capsys.readouterr()
    assert "| m | rtn | W8A8 |" in out.out
    assert "skipped 3 unreadable" in out.err and "truncated" in out.err and "latin1" in out.err
    assert report([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report([str(tmp_path / "empty")]) == 1
    assert "no finished runs" in capsys.readouterr().err


def test_method_that_needs_answers_with_a_file_without_them(cli, loads, tmp_path):
    path = _calib_file(tmp_path, [{"question": f"q{i}"} for i in range(4)])
    _fails_before_load(cli, loads, *TINY, "calib=file", f"calib.path={path}", f"paths.output_root={tmp_path}/o",
                       "method=mbq", "quant=w8a8", match="method=mbq needs calibration answers")
