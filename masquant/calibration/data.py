"""Calibration sets: prompts through the model's own processor and chat template, answers when given.

A :class:`CalibrationSet` holds the processed prompts (what ``generate`` sees at prefill: input_ids,
pixel values, ``mm_token_type_ids`` ...), builds SFT inputs with answer labels on demand (MBQ needs the
loss of the answers), and captures the decoder-layer inputs for the layer walker (again after a
whole-model transform). Rows come from the testbed's tasks, a file, or random content for tiny models.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from masquant.errors import CalibrationDataError

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


def _messages(question: str, image=None, audio=None) -> list[dict]:
    content = []
    if image is not None:
        content.append({"type": "image"})
    if audio is not None:
        content.append({"type": "audio"})
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def _process(processor, text: str, image=None, audio=None) -> dict:
    kwargs = {"text": [text], "return_tensors": "pt"}
    if image is not None:
        kwargs["images"] = [image]
    if audio is not None:
        kwargs["audio"] = [audio]
    return {k: v for k, v in processor(**kwargs).items() if torch.is_tensor(v)}


def chat_inputs(processor, question: str, image=None, audio=None, answer: str | None = None) -> dict:
    """One user turn (image and/or audio + question) as model inputs.

    Without ``answer``: the prompt with the generation prompt, exactly what ``generate`` sees (for
    Qwen2.5-VL this includes ``mm_token_type_ids``, without which it silently uses 1-D positions).
    With ``answer``: the prompt followed by the assistant's answer, and ``labels`` that are -100 everywhere
    but on the answer's tokens (and the end-of-turn token the template puts after it).
    """
    messages = _messages(question, image, audio)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if answer is None:
        return _process(processor, prompt, image, audio)
    full = processor.apply_chat_template(
        messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False)
    inputs = _process(processor, full, image, audio)
    prompt_ids = _process(processor, prompt, image, audio)["input_ids"]
    n = prompt_ids.shape[1]
    if not torch.equal(inputs["input_ids"][:, :n], prompt_ids) or inputs["input_ids"].shape[1] <= n:
        raise CalibrationDataError("the chat template does not put the answer after the generation prompt; "
                                   "cannot tell the answer's tokens apart")
    labels = inputs["input_ids"].clone()
    labels[:, :n] = IGNORE_INDEX
    inputs["labels"] = labels
    return inputs


def read_calibration_file(path: str | Path) -> list:
    """Rows of a JSON / JSONL / parquet file; media paths of object rows are resolved against the file's folder.

    Rows are checked by ``masquant.sources.files.check_calibration_rows`` (fields, types, media that open).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CalibrationDataError(f"calib.path={str(path)!r} does not exist (JSON, JSONL or parquet expected)")
    if not path.is_file():
        raise CalibrationDataError(f"calib.path={str(path)!r} is a folder; give the calibration file itself")
    try:
        if path.suffix == ".parquet":
            import pandas as pd

            rows = pd.read_parquet(path).to_dict("records")
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix == ".json":
            rows = json.loads(path.read_text())
        else:
            raise CalibrationDataError(
                f"calib.path={str(path)!r}: unsupported suffix {path.suffix!r}; use .json, .jsonl or .parquet")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CalibrationDataError(f"calib.path={str(path)!r} is not valid {path.suffix[1:].upper()} ({err})") from None
    except (OSError, ValueError) as err:
        if isinstance(err, CalibrationDataError):
            raise
        raise CalibrationDataError(f"calib.path={str(path)!r} cannot be read ({type(err).__name__}: {err})") from None
    if isinstance(rows, list):
        for row in rows:
            if not isinstance(row, dict):
                continue
            for key in ("image", "audio"):
                if row.get(key) and isinstance(row[key], str):
                    p = Path(row[key]).expanduser()
                    p = p if p.is_absolute() else path.parent / p
                    if not p.exists():
                        i = rows.index(row)
                        raise CalibrationDataError(f"{path}: row {i} {key}={row[key]!r} not found at {p}")
                    row[key] = p
    return rows


def load_media(row: dict) -> dict:
    """question / answer, the image as PIL RGB and the audio as float32 samples (16-bit WAV files)."""
    out = {"question": row["question"], "image": None, "audio": None, "answer": row.get("answer")}
    if row.get("image") is not None:
        image = row["image"]
        if isinstance(image, (str, Path)):
            from PIL import Image

            image = Image.open(image).convert("RGB")
        out["image"] = image
    if row.get("audio") is not None:
        audio = row["audio"]
        if isinstance(audio, (str, Path)):
            import wave

            import numpy as np

            with wave.open(str(audio)) as w:
                audio = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype("float32") / 32768.0
        out["audio"] = audio
    return out


def require_answers(rows: list[dict], description: dict, who: str) -> None:
    """Raise, naming the rows and the fix, unless every row carries an answer (``who`` needs them)."""
    missing = [i for i, r in enumerate(rows) if not r.get("answer")][:5]
    if missing or not rows:
        raise CalibrationDataError(
            f"{who} needs calibration answers, but rows {missing} have no 'answer' "
            f"({description.get('source', 'calibration set')}); use calib=testbed, or a calib.path file "
            "whose rows carry an 'answer' field")


@dataclass
class CalibrationSet:
    """Processed calibration prompts; SFT inputs (answer labels) on demand; captured decoder inputs."""

    batches: list[dict]
    rows: list[dict] = field(default_factory=list, repr=False)
    processor: object = field(default=None, repr=False)
    description: dict = field(default_factory=dict)
    _sft: list | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.batches)

    @classmethod
    def from_rows(cls, processor, rows: list[dict], description: dict | None = None,
                  desc: str = "calibration prompts", with_answers: bool = False) -> "CalibrationSet":
        """``with_answers``: each prompt followed by its answer (``calib.with_answers``), labels dropped."""
        if processor is None:
            raise CalibrationDataError("calibration rows need the model's processor; this model has none")
        if with_answers:
            require_answers(rows, description or {}, "calib.with_answers=true")
        batches = []
        for row in tqdm(rows, desc=desc, leave=False):
            media = load_media(row)
            batch = chat_inputs(processor, media["question"], media["image"], media["audio"],
                                media["answer"] if with_answers else None)
            batch.pop("labels", None)
            batches.append(batch)
        return cls(batches, list(rows), processor, dict(description or {}))

    @property
    def has_answers(self) -> bool:
        return bool(self.rows) and all(r.get("answer") for r in self.rows)

    def sft_batches(self) -> list[dict]:
        """Prompt + answer inputs with ``labels`` (-100 except the answer), for methods that need a loss."""
        require_answers(self.rows, self.description, "this method")
        if self._sft is None:
            self._sft = []
            for row in tqdm(self.rows, desc="calibration answers", leave=False):
                m = load_media(row)
                self._sft.append(chat_inputs(self.processor, m["question"], m["image"], m["audio"], m["answer"]))
        return self._sft

    def token_counts(self, adapter, video_as: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for b in self.batches:
            for m, mask in adapter.modality_masks(b["input_ids"], video_as=video_as).items():
                counts[m] = counts.get(m, 0) + int(mask.sum())
        return counts

    def check_modalities_present(self, adapter, modalities, video_as: str) -> dict[str, int]:
        counts = self.token_counts(adapter, video_as)
        missing = [m for m in modalities if counts.get(m, 0) == 0]
        if missing:
            raise CalibrationDataError(
                f"the calibration set has no tokens of modality {missing} (token counts: {counts}); "
                f"requested modalities: {list(modalities)}. Use calibration prompts with that input, or another modality set."
            )
        return counts


def split_rows(rows: list[dict], n: int, held_out: int, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint row indices for calibration and held-out fidelity samples, by a seeded shuffle."""
    order = random.Random(seed).sample(range(len(rows)), n + held_out)
    return order[:n], order[n:]
