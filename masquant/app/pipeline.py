"""calibrate -> quantize -> evaluate -> save. One function per stage; ``run`` ties them together.

Every check of the configuration happens in ``resolve`` before a model is loaded. Results go to
``<output_root>/runs/<model>/<method>/<quant>-<hash>/``; the folder is written under a temporary
name and renamed when complete, so an interrupted run never leaves anything that looks finished.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from masquant.adapters.registry import get_adapter
from masquant.calibration.cache import StatsCache, model_fingerprint
from masquant.runs.hashing import config_hash, to_plain, without_neutral_defaults
from masquant.evaluation.fidelity import record_reference, sqnr_report, unchanged_sqnr_report
from masquant.evaluation.text_corpus import sequences_perplexity
from masquant.engine.context import QuantContext
from masquant.errors import MethodConfigError
from masquant.sources import calibration_source, loading, model_source, source_problems, source_provenance
from masquant.app.recipes import OURS, check_recipe, recipe_values
from masquant.quant.linear import ModalityRouter, attach_router
from masquant.quant.scheme import QuantScheme
from masquant.methods.registry import build_method, get_method_class
from masquant.runs.store import (
    RESULT_FILE,
    clean_stale,
    failed_dir,
    is_finished,
    load_result,
    method_label,
    partial_dir,
    publish,
    run_dir_for,
    run_lock,
    write_json_atomic,
)
from masquant.runs.provenance import provenance
from masquant.engine.memory import peak_memory_mb, reset_peak_memory
from masquant.app.validation import ConfigError

log = logging.getLogger(__name__)

@dataclass
class RunSpec:
    cfg: DictConfig
    scheme: QuantScheme
    method_cfg: Any
    modalities: tuple[str, ...]
    video_as: str
    device: torch.device
    config_hash: str
    run_dir: Path
    timings: dict = field(default_factory=dict)


def scheme_from_cfg(qcfg) -> QuantScheme:
    d = to_plain(qcfg)
    return QuantScheme(**d)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    return torch.device(name)


def resolve(cfg: DictConfig) -> RunSpec:
    """Validate everything that can be validated without loading a model; every problem is a ConfigError."""
    from masquant.app import validation as v

    problems = v.unknown_keys(cfg) + v.inapplicable_keys(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    try:
        scheme = scheme_from_cfg(cfg.quant)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:
        method_cls = get_method_class(str(cfg.method.id))
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None
    check_recipe(str(cfg.method.id), str(cfg.get("recipe", OURS)))
    try:
        method_cfg = OmegaConf.to_object(cfg.method)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method={cfg.method.id}: {err}") from err
    method = method_cls(method_cfg)
    problems = v.check_values(cfg, method.requires_calibration(scheme))
    if problems:
        raise ConfigError("; ".join(problems))
    modalities = tuple(str(m.value if hasattr(m, "value") else m) for m in cfg.modality.modalities)
    if "text" not in modalities:
        raise ConfigError(f"modality.modalities={list(modalities)} must include 'text'")
    video_as = str(getattr(cfg.modality.video_as, "value", cfg.modality.video_as))
    try:
        method.check_weight_options(scheme)
        method.check(scheme, modalities)
    except MethodConfigError as err:
        raise ConfigError(f"method={cfg.method.id} quant={cfg.quant.name}: {err}") from err
    msource, csource = model_source(cfg.model.source), calibration_source(cfg.calib.source)
    adapter_cls = msource.adapter_class(cfg.model)
    supported = msource.modalities(cfg.model, adapter_cls)
    try:
        method.check_adapter(adapter_cls)
    except MethodConfigError as err:
        raise ConfigError(f"method={cfg.method.id} model={cfg.model.name}: {err}") from err
    missing = [m for m in modalities if m not in supported]
    if missing:
        raise ConfigError(f"modality.modalities={list(modalities)}: model {cfg.model.name} has no {missing} input; "
                          f"it takes {list(supported)} (e.g. modality=text_vision)")
    needs_answers = "calib.with_answers=true" if cfg.calib.with_answers else (
        f"method={cfg.method.id}" if method.needs_answers else None)
    if needs_answers and not csource.has_answers:
        raise ConfigError(f"{needs_answers} needs calibration answers; calib={csource.name} has none: use "
                          "calib=testbed or a calib=file whose rows carry an 'answer'")
    if csource.text_only and any(m != "text" for m in modalities):
        raise ConfigError(f"calib={csource.name} is text-only but modality.modalities={list(modalities)}; use "
                          "modality=text_only (or a calibration set with images: calib=testbed, calib=file)")
    csource.check(cfg, method.requires_calibration(scheme), needs_answers)
    if cfg.eval.data_root is not None and not Path(str(cfg.eval.data_root)).expanduser().exists():
        raise ConfigError(f"eval.data_root={cfg.eval.data_root!r} does not exist")
    if cfg.eval.tasks:
        from masquant.evaluation import ALL_TASKS

        bad = [t for t in cfg.eval.tasks if t not in ALL_TASKS]
        if bad:
            raise ConfigError(f"eval.tasks: unknown task(s) {bad}; valid tasks: {list(ALL_TASKS)}")
    problems = source_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    device = resolve_device(str(cfg.device))
    problems = v.check_placement(cfg.model, device, method)
    if problems:
        raise ConfigError("; ".join(problems))
    v.check_output_root(cfg.paths.output_root)
    if str(getattr(cfg.export.format, "value", cfg.export.format)) != "none":
        from masquant.export.runner import check_export_options

        if method.export_problem():
            raise ConfigError(f"export=compressed_tensors with method={cfg.method.id}: {method.export_problem()}")
        check_export_options(cfg)
    h = config_hash(cfg)
    run_dir = run_dir_for(cfg.paths.output_root, cfg.model.name, cfg.method.id, cfg.quant.name, h)
    return RunSpec(cfg, scheme, method_cfg, modalities, video_as, device, h, run_dir)


def reference_config(cfg: DictConfig) -> DictConfig:
    """The dense reference of a run: same model, calibration and evaluation; method=dense, quant=fp16."""
    from masquant.app.config import QuantConfig
    from masquant.methods.registry import get_config_class

    ref = cfg.copy()
    OmegaConf.set_struct(ref, False)
    ref.method = OmegaConf.structured(get_config_class("dense")())
    ref.quant = OmegaConf.structured(QuantConfig(name="fp16"))
    if "recipe" in ref:
        ref.recipe = OURS  # the dense model has no recipe (and the recipe is not part of the hash)
    if "export" in ref:
        ref.export.format = "none"  # the dense model is the model.path checkpoint itself
    ref.force = False
    return ref


def finished_reference_ppl(spec: RunSpec) -> tuple[float, str] | None:
    """The FP perplexity of this run's model and text, from its dense reference's finished result (same model,
    same perplexity settings: the reference differs only in method and quant), and that result's config hash;
    None when there is none yet or this run is the reference."""
    ref = resolve(reference_config(spec.cfg))
    if ref.config_hash == spec.config_hash or not is_finished(ref.run_dir):
        return None
    value = load_result(ref.run_dir).get("fidelity/ppl_fp")
    return None if value is None else (float(value), ref.config_hash)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- stages ------------------------------------------------------------------------------------
def load_model(spec: RunSpec):
    return loading.load_model_and_processor(spec.cfg.model, spec.cfg.paths.cache_dir, spec.device)


def run(cfg: DictConfig) -> dict:
    """Run one configuration; returns its metrics (loaded, if a finished result already exists).

    One process at a time per configuration (a lock beside the run folder; a second one waits, then
    finds the result); the run is written under a temporary name and published by a rename, and what
    killed runs left behind is cleaned up first.
    """
    spec = resolve(cfg)
    if is_finished(spec.run_dir) and not cfg.force and not needs_export(spec):
        log.info("finished result found for config %s, skipping: %s", spec.config_hash, spec.run_dir)
        return load_result(spec.run_dir)
    with run_lock(spec.run_dir):
        clean_stale(spec.run_dir)
        if is_finished(spec.run_dir) and not cfg.force:
            if needs_export(spec):
                return export_finished(spec)
            log.info("finished result found for config %s, skipping: %s", spec.config_hash, spec.run_dir)
            return load_result(spec.run_dir)
        return _run_locked(spec)


def needs_export(spec: RunSpec) -> bool:
    """An export is asked for and the finished run folder has none (the export is not part of the config hash)."""
    from masquant.export.runner import EXPORT_FILE

    return exporting(spec.cfg) and not (spec.run_dir / EXPORT_DIR / EXPORT_FILE).is_file()


def export_finished(spec: RunSpec) -> dict:
    """Export a finished run: quantize again from its configuration (deterministic: the same model), export, and
    add the folder and its ``export/*`` metrics to the run, atomically (a kill leaves the run as it was). The caller
    holds the run's lock."""
    if not is_finished(spec.run_dir):
        raise ConfigError(f"{spec.run_dir}: not a finished run (no {RESULT_FILE}); run it to the end first")
    cfg = spec.cfg
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    seed_everything(int(cfg.seed))
    work = spec.run_dir.parent / f".{spec.run_dir.name}.export.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        found = _execute(spec, work, export_only=True)
        metrics = load_result(spec.run_dir)
        metrics.update({k: v for k, v in found.items() if k.startswith("export/") or k == "time/export_s"})
        old = spec.run_dir / EXPORT_DIR
        if old.exists():  # an earlier export: moved aside, then replaced by renames (never half of each)
            os.replace(old, work / "previous")
        os.replace(work / EXPORT_DIR, old)
        write_json_atomic(metrics, spec.run_dir / RESULT_FILE)
        log.info("export of the finished run: %s", spec.run_dir / EXPORT_DIR)
        return metrics
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_locked(spec: RunSpec) -> dict:
    cfg = spec.cfg
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    seed_everything(int(cfg.seed))
    tmp_dir = partial_dir(spec.run_dir)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    file_log = logging.FileHandler(tmp_dir / "run.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(file_log)
    try:
        started = time.perf_counter()
        metrics = _execute(spec, tmp_dir)
        metrics.update(provenance(spec.device), **{"provenance/wall_s": time.perf_counter() - started})
        metrics.update(source_provenance(cfg))  # e.g. the system program that spoke the testbed's clips
        (tmp_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_json_atomic(metrics, tmp_dir / RESULT_FILE)
        logging.getLogger().removeHandler(file_log)
        file_log.close()
        publish(tmp_dir, spec.run_dir)
        log.info("results: %s", spec.run_dir)
        return metrics
    except BaseException:
        logging.getLogger().removeHandler(file_log)
        file_log.close()
        failed = failed_dir(spec.run_dir)
        shutil.rmtree(failed, ignore_errors=True)
        os.replace(tmp_dir, failed)  # kept for the log; never mistaken for a finished result
        raise
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _Stages:
    """Wall time, CPU time (all threads of the process) and peak memory so far after each stage:
    ``time/<stage>_s``, ``time/<stage>_cpu_s``, ``memory/peak_after_<stage>_mb``. CPU time is the figure to
    compare on a shared machine; wall time is what a user waits."""

    def __init__(self, device):
        self.device = device
        self.metrics: dict[str, float] = {}
        reset_peak_memory(device)

    @contextmanager
    def __call__(self, name: str):
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.metrics[f"time/{name}_s"] = time.perf_counter() - t0
        self.metrics[f"time/{name}_cpu_s"] = time.process_time() - c0
        self.metrics[f"memory/peak_after_{name}_mb"] = peak_memory_mb(self.device)


def _flat(d: dict, prefix: str = "") -> dict:
    """{"cmc": {"rank": 8}} -> {"cmc.rank": 8} (the keys of method labels)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_method_label(spec: RunSpec) -> str:
    """The method label, with the scheme's non-default weight rounding as options, e.g. 'rtn(w_quantizer=gptq)'
    (plain GPTQ and RTN are different rows of a table). Under a recipe other than ``ours`` the label names it, and
    the options are what differs from the preset, e.g. 'quarot(recipe=official)' or
    'quarot(recipe=official,w_quantizer=rtn)'."""
    from masquant.reporting.paper import format_method_label, parse_method_label

    method_id, options = parse_method_label(method_label(spec.method_cfg))
    scheme = spec.scheme
    actual = {"w_quantizer": scheme.w_quantizer.value, "w_mse_clip": scheme.w_mse_clip,
              "gptq_act_order": scheme.gptq_act_order, "gptq_true_sequential": scheme.gptq_true_sequential}
    reference = {"w_quantizer": "rtn", "w_mse_clip": False, "gptq_act_order": False, "gptq_true_sequential": False}
    recipe = str(spec.cfg.get("recipe", OURS))
    preset = recipe_values(spec.cfg, method_id, recipe)
    if preset:
        reference.update({k: v for k, v in preset.get("quant", {}).items() if k in reference})
        method_values = _flat(OmegaConf.to_container(spec.cfg.method, resolve=True, enum_to_str=True))
        for key, value in _flat(preset.get("method", {})).items():
            if str(method_values.get(key)) == str(value):
                options.pop(key, None)  # as the preset says: not an option of the row
            else:
                options[key] = str(method_values.get(key))
        options = {"recipe": recipe, **options}
    for key, value in actual.items():
        if str(value) != str(reference[key]):
            options[key] = str(value)
    return format_method_label(method_id, options)


EXPORT_DIR = "export"  # <run folder>/export: model/ (the checkpoint), lora_<modality>/, export.json


def exporting(cfg) -> bool:
    return str(getattr(cfg.export.format, "value", cfg.export.format)) != "none"


def _execute(spec: RunSpec, out_dir: Path, export_only: bool = False) -> dict:
    """The run's stages into ``out_dir``; ``export_only``: no benchmarks (the export of a finished run)."""
    cfg = spec.cfg
    stage = _Stages(spec.device)
    with stage("load"):
        model, processor = load_model(spec)
    adapter = get_adapter(model)
    missing = [m for m in spec.modalities if m not in adapter.supported_modalities()]
    if missing:
        raise ConfigError(
            f"modality.modalities={list(spec.modalities)}: {cfg.model.name} ({model.config.model_type}) has no "
            f"{missing} input; it supports {list(adapter.supported_modalities())}"
        )
    method = build_method(spec.method_cfg)
    needs_calibration = method.requires_calibration(spec.scheme)
    metrics: dict[str, Any] = {}
    with stage("calib_data"):
        calib = held_out = None
        if needs_calibration or cfg.eval.fidelity or exporting(cfg):  # an export is checked on the held-out prompts
            calib, held_out, description = loading.calibration_sets(cfg, processor, adapter)
            calib.check_modalities_present(adapter, spec.modalities, spec.video_as)
            metrics["run/calib_set"] = description
        router = ModalityRouter(lambda ids: adapter.modality_masks(ids, video_as=spec.video_as))
        attach_router(model, router)

    # A method that leaves the model as loaded (dense) is its own reference: its SQNR is +inf by definition and
    # its perplexity is measured once. A quantized run takes the FP perplexity from its dense reference's result.
    unchanged = method.leaves_model_unchanged
    ppl_ids = ref = None
    with stage("reference"):
        if cfg.eval.fidelity and held_out is not None and len(held_out) and not unchanged:
            ref = record_reference(model, adapter, held_out.batches, spec.device, spec.video_as)
        if cfg.eval.ppl:
            ppl_ids = loading.ppl_sequences(processor, cfg.eval)
            reused = finished_reference_ppl(spec)
            if reused is not None:
                metrics["fidelity/ppl_fp"], metrics["fidelity/ppl_fp_from"] = reused
            else:
                metrics["fidelity/ppl_fp"] = sequences_perplexity(model, ppl_ids, spec.device, "perplexity (FP)")

    with stage("quantize"):
        cache = StatsCache(Path(cfg.paths.cache_dir) / "stats" if cfg.calib.cache else None)
        cache_key = {
            "model": cfg.model.name, "model_path": cfg.model.path, "dtype": str(cfg.model.dtype),
            # statistics cached before an option was added stay valid while it sits at its neutral default
            "calib": without_neutral_defaults("calib", to_plain(cfg.calib)), "video_as": spec.video_as,
            "weights": model_fingerprint(model) if cache.root is not None else None,
        }
        ctx = QuantContext(model, adapter, spec.scheme, router, spec.device, spec.modalities,
                           calib if needs_calibration else None, cache, cache_key, spec.video_as)
        try:
            report = method.run(ctx)
        except MethodConfigError as err:  # what only the loaded model shows (e.g. a model that cannot be rotated)
            raise ConfigError(f"quant={cfg.quant.name}: {err}") from err
        del ctx  # and with it the captured calibration inputs
        gc.collect()
    metrics.update({f"method/{k}" if "/" not in k else k: v for k, v in report.items()})

    with stage("fidelity"):
        if ref is not None:
            metrics.update(sqnr_report(model, adapter, held_out.batches, spec.device, ref))
        elif unchanged and cfg.eval.fidelity and held_out is not None and len(held_out):
            metrics.update(unchanged_sqnr_report(adapter, held_out.batches, spec.video_as))
        if ppl_ids is not None:
            metrics["fidelity/ppl"] = (metrics["fidelity/ppl_fp"] if unchanged
                                       else sequences_perplexity(model, ppl_ids, spec.device))
            metrics["fidelity/ppl_delta"] = metrics["fidelity/ppl"] - metrics["fidelity/ppl_fp"]

    with stage("eval"):
        if cfg.eval.tasks and not export_only:
            from masquant.app.benchmarks import run_benchmarks

            metrics.update(run_benchmarks(cfg, model, processor, out_dir))
    with stage("export"):
        if exporting(cfg):
            from masquant.export.runner import export_model

            metrics.update(export_model(model, adapter, processor, out_dir / EXPORT_DIR, cfg.export,
                                        held_out.batches if held_out is not None else [], spec.device, ref, ppl_ids,
                                        metrics))
    metrics.update(stage.metrics)
    metrics["memory/peak_mb"] = peak_memory_mb(spec.device)
    metrics.update({
        "run/model": str(cfg.model.name), "run/method": str(cfg.method.id), "run/quant": str(cfg.quant.name),
        "run/method_label": run_method_label(spec),
        "run/w_quantizer": spec.scheme.w_quantizer.value, "run/w_mse_clip": spec.scheme.w_mse_clip,
        "run/bits": spec.scheme.tag, "run/grid": spec.scheme.grid, "run/int_range": spec.scheme.int_range.value, "run/modalities": list(spec.modalities), "run/config_hash": spec.config_hash,
        "run/eval_limit": cfg.eval.limit, "run/eval_max_new_tokens_cap": cfg.eval.get("max_new_tokens_cap"), "run/calib_samples": int(cfg.calib.n_samples),
        "run/device": str(spec.device), "run/seed": int(cfg.seed),
    })
    return metrics
