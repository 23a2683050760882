"""Processors of real checkpoints without optional parts (torchvision for the video processor).

``AutoProcessor.from_pretrained`` on a Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen2.5-Omni folder builds the
video processor, which needs torchvision; our set-up has none (a CPU torchvision does not import beside
the CPU torch wheel). :func:`load_processor` then builds the same processor class from its parts, with
the video processor left out (a warning says video inputs are unavailable), so image and audio work.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)
OPTIONAL_PARTS = ("video_processor",)


@functools.lru_cache(maxsize=None)
def tolerant_processor_class(cls: type) -> type:
    """A subclass of ``cls`` whose optional parts (the video processor) may be None."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name in OPTIONAL_PARTS:
            return None
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class,
                                         "__module__": __name__, "__qualname__": cls.__qualname__})


def _auto_loader(part: str):
    import transformers as T

    if "tokenizer" in part:
        return T.AutoTokenizer
    return {"image_processor": T.AutoImageProcessor, "video_processor": T.AutoVideoProcessor,
            "feature_extractor": T.AutoFeatureExtractor}[part]


def read_chat_template(path: Path) -> str | None:
    """The chat template of a model folder (chat_template.jinja, chat_template.json, or the tokenizer's)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            template = json.loads(f.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def build_processor(processor_cls: type, path: str | Path, warn_missing: bool = True):
    """``processor_cls`` from the parts in ``path``, leaving optional parts out when they cannot be built."""
    path = Path(path)
    parts = {}
    for part in processor_cls.get_attributes():
        try:
            parts[part] = _auto_loader(part).from_pretrained(path)
        except (ImportError, OSError, ValueError) as err:
            if part not in OPTIONAL_PARTS:
                raise
            if warn_missing:
                log.warning("%s: no %s (%s); video inputs are unavailable, images and audio work",
                            path, part, str(err).strip().splitlines()[0])
            parts[part] = None
    extra = {}
    config = path / "processor_config.json"
    if config.is_file():
        accepted = set(inspect.signature(processor_cls.__init__).parameters)
        extra = {k: v for k, v in json.loads(config.read_text()).items() if k in accepted and k not in parts}
    extra.pop("chat_template", None)
    return tolerant_processor_class(processor_cls)(**parts, chat_template=read_chat_template(path), **extra)


def load_processor(processor_cls: type, path: str | Path):
    """The processor of a model folder: ``AutoProcessor`` when it works, else :func:`build_processor`."""
    from transformers import AutoProcessor
    from transformers.processing_utils import ProcessorMixin

    try:
        processor = AutoProcessor.from_pretrained(path)
        if isinstance(processor, ProcessorMixin):
            return processor
    except (ImportError, ValueError, OSError):
        pass
    return build_processor(processor_cls, path)


def save_processor_parts(processor, path: str | Path, processor_class: str) -> None:
    """Write a processor as a real checkpoint folder has it: each part, the chat template, and the
    processor class name (so ``AutoProcessor`` tries the full class, as it does on a real folder)."""
    import shutil
    import tempfile

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for part in type(processor).get_attributes():
        value = getattr(processor, part, None)
        if value is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            value.save_pretrained(tmp)
            for f in Path(tmp).iterdir():  # parts that share a file (image + audio preprocessor) are merged
                target = path / f.name
                if target.exists() and f.suffix == ".json":
                    target.write_text(json.dumps({**json.loads(target.read_text()), **json.loads(f.read_text())},
                                                 indent=2))
                else:
                    shutil.copy(f, target)
    if processor.chat_template:
        (path / "chat_template.jinja").write_text(processor.chat_template)
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            data = json.loads(f.read_text())
            data["processor_class"] = processor_class
            f.write_text(json.dumps(data, indent=2))
    own = {k: getattr(processor, k) for k in inspect.signature(type(processor).__init__).parameters
           if k not in ("self", "chat_template", "kwargs") and k not in type(processor).get_attributes()
           and isinstance(getattr(processor, k, None), (int, float, str, bool))}
    (path / "processor_config.json").write_text(json.dumps({"processor_class": processor_class, **own}, indent=2))
