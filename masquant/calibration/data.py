"""Calibration prompts -> model inputs, through the model's own processor and chat template."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class CalibrationDataError(ValueError):
    pass


def chat_inputs(processor, question: str, image=None, audio=None) -> dict:
    """One user turn (image and/or audio + question) with the generation prompt, as model inputs.

    Uses processor(...) on the templated text, so the inputs carry exactly what ``generate`` sees,
    including ``mm_token_type_ids`` (without it Qwen2.5-VL silently falls back to 1-D positions).
    """
    content = []
    if image is not None:
        content.append({"type": "image"})
    if audio is not None:
        content.append({"type": "audio"})
    content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs = {"text": [text], "return_tensors": "pt"}
    if image is not None:
        kwargs["images"] = [image]
    if audio is not None:
        kwargs["audio"] = [audio]
    inputs = processor(**kwargs)
    return {k: v for k, v in inputs.items() if torch.is_tensor(v)}


def read_calibration_file(path: str | Path) -> list[dict]:
    """Rows with 'question' and optional 'image' / 'audio' paths (relative to the file's folder)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CalibrationDataError(f"calib.path={str(path)!r} does not exist (JSON, JSONL or parquet expected)")
    if path.suffix == ".parquet":
        import pandas as pd

        rows = pd.read_parquet(path).to_dict("records")
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".json":
        rows = json.loads(path.read_text())
    else:
        raise CalibrationDataError(f"calib.path={str(path)!r}: unsupported suffix {path.suffix!r}; use .json, .jsonl or .parquet")
    for i, row in enumerate(rows):
        if "question" not in row:
            raise CalibrationDataError(f"{path}: row {i} has no 'question' field (fields: {sorted(row)})")
        for key in ("image", "audio"):
            if row.get(key) and isinstance(row[key], str):
                p = Path(row[key])
                p = p if p.is_absolute() else path.parent / p
                if not p.exists():
                    raise CalibrationDataError(f"{path}: row {i} {key}={row[key]!r} not found at {p}")
                row[key] = p
    return rows


def load_media(row: dict) -> dict:
    out = {"question": row["question"], "image": None, "audio": None}
    if row.get("image") is not None:
        image = row["image"]
        if isinstance(image, (str, Path)):
            from PIL import Image

            image = Image.open(image).convert("RGB")
        out["image"] = image
    if row.get("audio") is not None:
        audio = row["audio"]
        if isinstance(audio, (str, Path)):
            import numpy as np
            import wave

            with wave.open(str(audio)) as w:
                audio = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype("float32") / 32768.0
        out["audio"] = audio
    return out


def token_counts(batches: list[dict], adapter, video_as: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for b in batches:
        for m, mask in adapter.modality_masks(b["input_ids"], video_as=video_as).items():
            counts[m] = counts.get(m, 0) + int(mask.sum())
    return counts


def check_modalities_present(batches: list[dict], adapter, modalities, video_as: str) -> dict[str, int]:
    counts = token_counts(batches, adapter, video_as)
    missing = [m for m in modalities if counts.get(m, 0) == 0]
    if missing:
        raise CalibrationDataError(
            f"the calibration set has no tokens of modality {missing} (token counts: {counts}); "
            f"requested modalities: {list(modalities)}. Use calibration prompts with that input, or another modality set."
        )
    return counts
