"""Synthetic stand-ins for the audio benchmarks, in lmms-eval's document schemas, spoken by espeak-ng.

- `librispeech_test_other`: a clip of 1-3 words (digits, colours, shapes) in one of several voices and
  speeds; fields `audio` ({"array", "sampling_rate"}), `gt` (upper case, as LibriSpeech), `source`, `task`
  ("asr_en"); scored by lmms-eval's own `librispeech_wer` (Whisper normaliser + edit distance).
- `omni_bench`: an image of a coloured shape and a spoken question ("what colour is it" / "what shape is
  it"); four options (the true colour, the true shape, one distractor of each) of which the answer is the one
  the audio asks for, so image and audio are both needed; fields `audio`, `image`, `question`, `options`,
  `answer`, `task type`, `audio content`, `image content`; scored by lmms-eval's `omni_bench` utilities.

Documents are drawn from `sha256(task, split, index)` as the image tasks are: "train" (projector
training), "calib" (calibration) and "eval" never share a seed.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np

from masquant.testbed.speech import SAMPLE_RATE, VOICES, synthesize
from masquant.testbed.tasks import SHAPES, shape_image

AUDIO_TASKS = ("librispeech_test_other", "omni_bench")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOR_WORDS = ("red", "green", "blue", "yellow")
SHAPE_WORDS = tuple(SHAPES)
WORDS = DIGITS + COLOR_WORDS + SHAPE_WORDS
GAP_S = 0.08
ASR_PROMPT_TASK = "librispeech_test_other"
OMNI_QUESTION = "Which option answers the question spoken in the audio about the image?"
OMNI_SPOKEN = {"color": "what colour is it", "shape": "what shape is it"}


def _rng(task: str, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"testbed-omni|{task}|{split}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _voice(rng: random.Random) -> dict:
    return {"voice": rng.choice(VOICES), "speed": rng.randint(135, 185), "pitch": rng.randint(35, 65)}


def spoken_words(words: list[str], voice: dict) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The words spoken one by one, joined by short silences; (samples, [(start_s, end_s) per word])."""
    gap = np.zeros(int(GAP_S * SAMPLE_RATE), dtype=np.float32)
    parts, spans, t = [], [], 0.0
    for i, word in enumerate(words):
        clip = synthesize(word, **voice)
        if i:
            parts.append(gap)
            t += GAP_S
        parts.append(clip)
        spans.append((t, t + len(clip) / SAMPLE_RATE))
        t += len(clip) / SAMPLE_RATE
    return np.concatenate(parts), spans


def make_asr_doc(split: str, index: int, with_spans: bool = False) -> dict:
    rng = _rng("librispeech_test_other", split, index)
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
    audio, spans = spoken_words(words, _voice(rng))
    doc = {"audio": {"array": audio, "sampling_rate": SAMPLE_RATE}, "gt": " ".join(words).upper(),
           "source": "testbed", "task": "asr_en", "id": f"testbed-{split}-{index}"}
    if with_spans:
        doc["words"], doc["spans"] = words, spans
    return doc


def make_omnibench_doc(split: str, index: int) -> dict:
    rng = _rng("omni_bench", split, index)
    color, shape = rng.choice(COLOR_WORDS), rng.choice(SHAPE_WORDS)
    asked = rng.choice(("color", "shape"))
    other_color = rng.choice([c for c in COLOR_WORDS if c != color])
    other_shape = rng.choice([s for s in SHAPE_WORDS if s != shape])
    options = [color, other_color, shape, other_shape]
    rng.shuffle(options)
    spoken = OMNI_SPOKEN[asked]
    audio = synthesize(spoken, **_voice(rng))
    return {"audio": {"array": audio, "sampling_rate": SAMPLE_RATE}, "image": shape_image(rng, shape, color),
            "question": OMNI_QUESTION, "options": options, "answer": color if asked == "color" else shape,
            "task type": asked, "audio type": "speech", "audio content": spoken,
            "image content": f"a {color} {shape}", "index": index}


def make_audio_doc(task: str, split: str, index: int) -> dict:
    if task == "librispeech_test_other":
        return make_asr_doc(split, index)
    if task == "omni_bench":
        return make_omnibench_doc(split, index)
    raise KeyError(f"unknown testbed audio task {task!r}; valid: {AUDIO_TASKS}")


def make_audio_benchmark_docs(task: str, n: int, split: str = "eval") -> list[dict]:
    return [make_audio_doc(task, split, i) for i in range(n)]


def asr_prompt() -> str:
    """lmms-eval's LibriSpeech prompt (default pre/post prompts)."""
    return "Please recognize the speech and only output the recognized content:"


def omnibench_prompt(doc: dict) -> str:
    """lmms-eval's OmniBench prompt (`omni_bench_original_doc_to_text`, default kwargs)."""
    letters = "ABCD"
    options = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(doc["options"]))
    return (f"Question:\n{doc['question']}\n\nOptions:\n{options}\n\n"
            "Answer with the option's letter from the given choices directly.")


def omnibench_target(doc: dict) -> str:
    return "ABCD"[doc["options"].index(doc["answer"])]


def make_omni_calibration_samples(n: int, split: str = "calib") -> list[dict]:
    """Tri-modal calibration rows (image + audio + question): OmniBench-style prompts, and ASR prompts with
    an image of the same calibration split, alternating. Never drawn from the "eval" split."""
    from masquant.testbed.tasks import make_calibration_samples

    images = make_calibration_samples(n)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            doc = make_omnibench_doc(split, i)
            rows.append({"image": doc["image"], "audio": doc["audio"]["array"], "question": omnibench_prompt(doc),
                         "answer": omnibench_target(doc)})
        else:
            doc = make_asr_doc(split, i)
            rows.append({"image": images[i]["image"], "audio": doc["audio"]["array"], "question": asr_prompt(),
                         "answer": doc["gt"].lower()})
    return rows
