"""Everything about a run that can be checked without loading a model, each with a message that names the
bad key, value or path and the fix. ``pipeline.resolve`` calls these; they run in seconds.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from masquant.errors import ConfigError


def _value(x) -> str:
    return str(getattr(x, "value", x))


# --- keys ------------------------------------------------------------------------------------------
def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys added with ``+key=value`` that no schema declares (Hydra's ``+`` bypasses the schema)."""
    problems = []
    schema = OmegaConf.get_type(cfg)
    if schema is not None and is_dataclass(schema):
        known = {f.name for f in fields(schema)}
        for key in cfg.keys():
            if key not in known and key != "hydra":
                problems.append(f"{prefix}{key}: masquant reads no such key (valid keys here: {sorted(known)})")
    for key in cfg.keys():
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            problems += unknown_keys(node, f"{prefix}{key}.")
    return problems


_NEEDS = {
    ("model", "path"): ("model.source", ("local",), "model=local (or qwen25vl_3b, qwen25vl_7b, qwen25omni_3b, ...)"),
    ("model", "tiny_type"): ("model.source", ("tiny",), "model=tiny_qwen25vl"),
    ("calib", "path"): ("calib.source", ("file",), "calib=file"),
    ("calib", "held_out_path"): ("calib.source", ("file",), "calib=file"),
}


def inapplicable_keys(cfg: DictConfig) -> list[str]:
    """Keys that are set but would be ignored by the chosen group, with the group they need."""
    problems = []
    for (group, key), (selector, allowed, fix) in _NEEDS.items():
        value = cfg[group].get(key)
        current = _value(OmegaConf.select(cfg, selector))
        if value not in (None, "") and current not in allowed:
            problems.append(f"{group}.{key}={value!r} is not read with {selector}={current}; it needs {fix}")
    q = cfg.quant
    if _value(q.w_quantizer) != "gptq":
        from masquant.quant.scheme import QuantScheme

        default = QuantScheme()
        for key in ("gptq_damp", "gptq_block", "gptq_act_order", "gptq_static_groups"):
            if q[key] != getattr(default, key):
                problems.append(f"quant.{key}={q[key]} is not read with quant.w_quantizer={_value(q.w_quantizer)}; "
                                "set quant.w_quantizer=gptq")
    if _value(q.w_granularity) != "group" and q.w_group_size:
        problems.append(f"quant.w_group_size={q.w_group_size} is not read with quant.w_granularity="
                        f"{_value(q.w_granularity)}; set quant.w_granularity=group (or use quant=w4a16_g128)")
    return problems


# --- values ----------------------------------------------------------------------------------------
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def check_values(cfg: DictConfig, needs_calibration: bool) -> list[str]:
    from masquant.evaluation.tasks import TASKS

    problems = []
    if not _DEVICE.match(str(cfg.device)):
        problems.append(f"device={cfg.device!r}: valid choices are auto, cpu, cuda, cuda:<index>, mps")
    if cfg.threads is not None and int(cfg.threads) < 1:
        problems.append(f"threads={cfg.threads}: use a count >= 1, or null for torch's default")
    if int(cfg.seed) < 0:
        problems.append(f"seed={cfg.seed}: must be >= 0")
    c = cfg.calib
    if int(c.seq_len) < 2:
        problems.append(f"calib.seq_len={c.seq_len}: must be >= 2")
    if int(c.n_samples) < 0 or int(c.held_out) < 0 or int(c.seed) < 0:
        bad = {k: c[k] for k in ("n_samples", "held_out", "seed") if int(c[k]) < 0}
        problems.append(f"calib: {', '.join(f'calib.{k}={v}' for k, v in bad.items())}: must be >= 0")
    elif needs_calibration and int(c.n_samples) == 0:
        problems.append(f"calib.n_samples=0: method={cfg.method.id} needs calibration samples; use calib.n_samples >= 1")
    elif cfg.eval.fidelity and int(c.held_out) == 0:
        problems.append("calib.held_out=0 leaves no held-out prompts for the SQNR of eval.fidelity=true; use "
                        "calib.held_out >= 1, or eval.fidelity=false")
    e = cfg.eval
    if e.limit is not None and e.limit <= 0:
        problems.append(f"eval.limit={e.limit}: use a count >= 1, a fraction in (0, 1), or null for all")
    for key in ("batch_size", "max_new_tokens", "ppl_sequences", "ppl_seq_len"):
        if int(e[key]) < 1:
            problems.append(f"eval.{key}={e[key]}: must be >= 1")
    if int(e.testbed_docs) < 0:
        problems.append(f"eval.testbed_docs={e.testbed_docs}: must be >= 0")
    for task, cap in (e.get("max_new_tokens_per_task") or {}).items():
        if int(cap) < 1:
            problems.append(f"eval.max_new_tokens_per_task.{task}={cap}: must be >= 1")
        known = {*TASKS, *(e.tasks or [])}  # a cap for a registered task that is not run is ignored
        if task not in known:
            problems.append(f"eval.max_new_tokens_per_task.{task}: {task!r} is neither in eval.tasks="
                            f"{list(e.tasks or [])} nor a registered task {sorted(TASKS)}")
    return problems


def check_placement(m: DictConfig, device, method) -> list[str]:
    """model.placement against the device and the method (masquant/engine/placement.py)."""
    placement = _value(m.placement)
    problems = []
    if m.max_memory_gib is not None and placement != "auto":
        problems.append(f"model.max_memory_gib={m.max_memory_gib} is not read with model.placement={placement}; "
                        "set model.placement=auto")
    elif m.max_memory_gib is not None and float(m.max_memory_gib) <= 0:
        problems.append(f"model.max_memory_gib={m.max_memory_gib}: must be > 0 (GiB per GPU), or null for all free")
    if placement == "auto" and getattr(device, "type", str(device)) != "cuda":
        problems.append(f"model.placement=auto spreads the model over GPUs, but the run's device is {device}; "
                        "use device=cuda, or model.placement=device|offload")
    if placement == "offload" and getattr(method, "needs_whole_model_backward", False):
        problems.append(f"model.placement=offload streams layers through forward passes only, and "
                        f"method={method.id} back-propagates through the whole model; use model.placement=device "
                        "or auto")
    return problems


# --- paths -----------------------------------------------------------------------------------------
def check_output_root(path: str | Path) -> None:
    """The results folder can be created and written (checked with a real file, then removed)."""
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"paths.output_root={str(root)!r} is a file, not a folder; choose another paths.output_root")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"paths.output_root={str(root)!r} cannot be written ({err.strerror or err}); "
                          "choose a folder you can write, e.g. paths.output_root=$HOME/masquant-outputs") from None
