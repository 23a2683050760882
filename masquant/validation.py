"""Everything about a run that can be checked without loading a model, each with a message that names the
bad key, value or path and the fix. ``pipeline.resolve`` calls these; they run in seconds.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A bad key, value or path in the run configuration (raised before any expensive work)."""


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
        for key in ("gptq_damp", "gptq_block", "gptq_act_order"):
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
    return problems


def check_placement(m: DictConfig, device, method) -> list[str]:
    """model.placement against the device and the method (masquant/placement.py)."""
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


def speech_users(cfg: DictConfig) -> list[str]:
    """What in a run is spoken by espeak-ng: testbed-omni's calibration clips, the testbed's audio tasks."""
    from masquant.testbed.audio_tasks import AUDIO_TASKS

    users = [f"model={cfg.model.name}"] if _value(cfg.model.source) == "testbed_omni" else []
    if not cfg.eval.data_root and int(cfg.eval.testbed_docs) > 0:
        spoken = [t for t in (cfg.eval.tasks or []) if t in AUDIO_TASKS]
        users += [f"eval.tasks (testbed documents of {spoken})"] if spoken else []
    return users


def check_speech_synthesis(cfg: DictConfig) -> list[str]:
    """espeak-ng is a system program, not a Python package: say it is missing before the model loads rather
    than in the middle of a run."""
    from masquant.testbed.speech import ESPEAK, ESPEAK_INSTALL_HINT, espeak_available

    users = speech_users(cfg)
    if not users or espeak_available():
        return []
    return [f"{ESPEAK} is not installed, and {' and '.join(users)} need its synthetic speech: install it with "
            f"{ESPEAK_INSTALL_HINT}, or (for real audio tasks) set eval.data_root to local task data"]


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


_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def model_folder_config(path: str | Path) -> dict:
    return json.loads((Path(path).expanduser() / "config.json").read_text())


def modalities_from_config(adapter_cls, config: dict) -> tuple[str, ...]:
    """The inputs a checkpoint takes, from its config.json alone (the placeholder token ids it declares)."""
    scopes = [config] + [config[k] for k in ("thinker_config",) if isinstance(config.get(k), dict)]
    found = ["text"]
    for key, attrs in adapter_cls.token_id_attrs.items():
        modality = "vision" if key == "video" else key
        if modality not in found and any(scope.get(a) is not None for scope in scopes for a in attrs):
            found.append(modality)
    return tuple(found)


def check_model_folder(path: str | Path) -> str:
    """A Hugging Face checkpoint folder, checked from its file listing and headers; returns its model_type."""
    from masquant.adapters.registry import adapter_class_for

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model.path={str(path)!r} does not exist or is not a folder "
                          "(a Hugging Face checkpoint folder is expected)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model.path={str(path)!r}: no config.json there (a Hugging Face checkpoint folder is expected)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"model.path={str(path)!r}: config.json is not valid JSON ({err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise ConfigError(f"model.path={str(path)!r}: config.json has no 'model_type'")
    try:
        adapter_class_for(model_type)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None
    weights = sorted(p for pattern in _WEIGHTS for p in path.glob(pattern))
    index = sorted(path.glob("*.index.json"))
    if not weights and not index:
        raise ConfigError(f"model.path={str(path)!r} has config.json but no weights (*.safetensors or *.bin); "
                          "copy the whole checkpoint folder")
    for idx in index:
        try:
            shards = set(json.loads(idx.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise ConfigError(f"model.path={str(path)!r}: {idx.name} is not a valid weight index ({err})") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ConfigError(f"model.path={str(path)!r}: {idx.name} lists shards that are missing: {missing[:5]}")
    for w in weights:
        if w.suffix == ".safetensors":
            check_safetensors(w)
    return model_type


def check_safetensors(file: Path) -> None:
    """The header parses and the file is as long as its tensors need (a truncated copy fails here)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{file}: not a readable safetensors file ({err}); the copy may be incomplete") from None
    if 8 + n + end > size:
        raise ConfigError(f"{file} is truncated: its tensors need {8 + n + end} bytes, the file has {size}; "
                          "copy it again")


def check_calibration_rows(rows, source: str, need: int) -> None:
    """Rows are objects with a text 'question', an optional text 'answer', media that open; enough of them."""
    if not isinstance(rows, list):
        raise ConfigError(f"{source}: expected a list of rows (objects), got {type(rows).__name__}")
    if len(rows) < need:
        raise ConfigError(f"{source} has {len(rows)} rows; calib.n_samples + calib.held_out = {need}: "
                          "lower them or add rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{source}: row {i} is a {type(row).__name__}, not an object with 'question'")
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ConfigError(f"{source}: row {i} has no text 'question' (fields: {sorted(row)})")
        if row.get("answer") is not None and not isinstance(row["answer"], str):
            raise ConfigError(f"{source}: row {i} 'answer' is a {type(row['answer']).__name__}, not text")
        for key, opener in (("image", _open_image), ("audio", _open_audio)):
            if row.get(key) is not None:
                try:
                    opener(row[key])
                except ConfigError:
                    raise
                except Exception as err:  # noqa: BLE001 - any unreadable file is reported with its row
                    raise ConfigError(f"{source}: row {i} {key}={str(row[key])!r} cannot be read as {key} "
                                      f"({type(err).__name__}: {err})") from None


def _open_image(p) -> None:
    from PIL import Image

    if Path(p).is_dir():
        raise IsADirectoryError("a folder, not an image file")
    with Image.open(p) as img:  # reads the header; the pixels are decoded at calibration time
        img.verify()


def _open_audio(p) -> None:
    import wave

    if Path(p).is_dir():
        raise IsADirectoryError("a folder, not an audio file")
    with wave.open(str(p)) as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{8 * w.getsampwidth()}-bit samples; 16-bit PCM WAV is expected")

