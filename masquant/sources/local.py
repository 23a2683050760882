"""``model.source=local``: a Hugging Face checkpoint folder on disk (``model.path``), checked from its file
listing and headers before anything loads."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

from masquant.adapters.registry import adapter_class_for
from masquant.errors import ConfigError
from masquant.sources.registry import ModelSource, register_model_source

log = logging.getLogger(__name__)


@register_model_source
class LocalFolder(ModelSource):
    name = "local"

    def adapter_class(self, mcfg) -> type:
        if not mcfg.path:
            raise ConfigError(f"model={mcfg.name} loads from a local folder: set model.path=/path/to/model")
        return adapter_class_for(check_model_folder(mcfg.path))

    def modalities(self, mcfg, adapter_cls: type) -> tuple[str, ...]:
        return modalities_from_config(adapter_cls, model_folder_config(mcfg.path))

    def load(self, mcfg, cache_dir, dtype):
        from transformers import AutoConfig

        path = Path(str(mcfg.path)).expanduser()
        config = AutoConfig.from_pretrained(path)
        adapter_cls = adapter_class_for(config.model_type)
        log.info("loading %s (%s) from %s", config.model_type, adapter_cls.__name__, path)
        return adapter_cls.load_pretrained(path, dtype), adapter_cls.load_processor(path)


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


