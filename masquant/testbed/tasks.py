"""Deterministic synthetic stand-ins for the five lmms-eval benchmarks, drawn with PIL.

Each task keeps the real lmms-eval document schema (docs/evaluation.md) and the
prompt the real task sends (`benchmark_prompt`, mirroring lmms-eval 0.7.3's default
`doc_to_text`), so a model trained on `make_training_samples` answers the real prompts.

Small vocabulary, learnable by a 3 M-parameter vision tower on a CPU:
- vizwiz_vqa_val: the colour or shape of one object, or "unanswerable" for blank/noise images;
- textvqa_val: the word on a sign, or the sign's colour;
- ocrbench: the word written in the image;
- scienceqa_img: which shape a diagram shows (4 choices), or on which side (2 choices);
- mmmu_val: the colour of the shape (4 options) or the number of dots (4 options).

Every document is drawn from its own RNG seeded by sha256(task, split, index), so the
splits "train", "calib" and "eval" never share a seed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from masquant.evaluation.tasks import EVAL_TASKS

TESTBED_TASKS = EVAL_TASKS  # documents of the five image tasks (MASQuant Table 1)
SPLITS = ("train", "calib", "eval")

COLORS = {
    "red": (215, 35, 35),
    "green": (35, 150, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 45, 175),
    "orange": (240, 130, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
WORDS = ("go", "up", "bus", "cat", "stop", "taxi", "hotel", "pizza", "coffee", "parking")  # 2-7 letters: length helps
MMMU_COLORS = ("red", "green", "blue", "yellow")
COUNTS = ("1", "2", "3", "4")
UNANSWERABLE = "unanswerable"

SMALL = (112, 112)  # 16 visual tokens
WIDE = (224, 112)  # 32 visual tokens, for reading

TEXTVQA_POST = "\nAnswer the question using a single word or phrase."
VIZWIZ_POST = (
    "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    "\nAnswer the question using a single word or phrase."
)
SCIENCEQA_POST = "\nAnswer with the option's letter from the given choices directly."
MMMU_MC_PROMPT = "Answer with the option's letter from the given choices directly."


def doc_rng(task: str, split: str, index: int) -> random.Random:
    """RNG of one document; stable across processes (never Python's `hash`)."""
    digest = hashlib.sha256(f"testbed-vl|{task}|{split}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def doc_uid(task: str, split: str, index: int) -> int:
    digest = hashlib.sha256(f"testbed-vl-id|{task}|{split}|{index}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


# ---------------------------------------------------------------- drawing


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 20) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _light_background(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(200, 250)
    return _jitter((base, base, base), rng, 8)


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    import math

    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_shape_(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(cx, cy, r * 1.1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def render_word(word: str, rng: random.Random, size: tuple[int, int], color, background) -> Image.Image:
    """The word in large letters (PIL's default font) near the centre (small jitter keeps it learnable)."""
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    font = _font(rng.randint(38, 46))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    w, h = right - left, bottom - top
    x = (size[0] - w) // 2 + rng.randint(-10, 10) - left
    y = (size[1] - h) // 2 + rng.randint(-6, 6) - top
    draw.text((x, y), word, font=font, fill=color)
    return image


def shape_image(rng: random.Random, shape: str, color: str, x_range=(0.25, 0.75)) -> Image.Image:
    image = Image.new("RGB", SMALL, _light_background(rng))
    r = rng.uniform(18, 30)
    cx = rng.uniform(*x_range) * SMALL[0]
    cy = rng.uniform(0.3, 0.7) * SMALL[1]
    draw_shape_(ImageDraw.Draw(image), shape, cx, cy, r, _jitter(COLORS[color], rng))
    return image


def unanswerable_image(rng: random.Random) -> Image.Image:
    """A blank, dark, or blurred-noise picture: nothing to answer from."""
    kind = rng.choice(("blank", "dark", "noise"))
    if kind == "noise":
        noise = Image.frombytes("L", SMALL, rng.randbytes(SMALL[0] * SMALL[1])).convert("RGB")
        return noise.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 3)))
    level = rng.randint(180, 250) if kind == "blank" else rng.randint(5, 50)
    return Image.new("RGB", SMALL, _jitter((level, level, level), rng, 6))


def sign_image(rng: random.Random, word: str, sign_color: str) -> Image.Image:
    """A coloured sign with a white or black word on a plain scene (TextVQA-like)."""
    scene = _jitter((rng.randint(150, 230),) * 3, rng, 15)
    image = Image.new("RGB", WIDE, scene)
    text_color = (20, 20, 20) if sign_color in ("yellow", "orange") else (250, 250, 250)
    sign = render_word(word, rng, (rng.randint(196, 218), rng.randint(76, 100)), text_color, _jitter(COLORS[sign_color], rng))
    image.paste(sign, (rng.randint(0, WIDE[0] - sign.width), rng.randint(0, WIDE[1] - sign.height)))
    return image


def diagram_image(rng: random.Random, shape: str, side: str) -> Image.Image:
    """A framed diagram with one black-outlined shape on the left or right (ScienceQA-like)."""
    image = Image.new("RGB", SMALL, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((2, 2, SMALL[0] - 3, SMALL[1] - 3), outline=(0, 0, 0), width=2)
    draw.line((SMALL[0] // 2, 8, SMALL[0] // 2, SMALL[1] - 8), fill=(160, 160, 160), width=1)
    cx = rng.uniform(0.2, 0.32) if side == "left" else rng.uniform(0.68, 0.8)
    color = COLORS[rng.choice(sorted(COLORS))]
    draw_shape_(draw, shape, cx * SMALL[0], rng.uniform(0.35, 0.65) * SMALL[1], rng.uniform(14, 20), color)
    return image


def dots_image(rng: random.Random, count: int) -> Image.Image:
    """`count` same-coloured dots in distinct cells of a 3x3 grid on graph paper (MMMU-like)."""
    image = Image.new("RGB", SMALL, (236, 236, 226))
    draw = ImageDraw.Draw(image)
    for k in range(0, SMALL[0], 14):
        draw.line((k, 0, k, SMALL[1]), fill=(205, 205, 215))
        draw.line((0, k, SMALL[0], k), fill=(205, 205, 215))
    color = _jitter(COLORS[rng.choice(MMMU_COLORS)], rng)
    cell = SMALL[0] / 3
    for c in rng.sample(range(9), count):
        cx = (c % 3 + 0.5) * cell + rng.uniform(-4, 4)
        cy = (c // 3 + 0.5) * cell + rng.uniform(-4, 4)
        draw_shape_(draw, "circle", cx, cy, rng.uniform(9, 13), color)
    return image


def graph_paper_shape_image(rng: random.Random, color: str) -> Image.Image:
    image = dots_image(rng, 0)
    shape = rng.choice(SHAPES)
    draw_shape_(ImageDraw.Draw(image), shape, rng.uniform(35, 77), rng.uniform(35, 77), rng.uniform(20, 28), _jitter(COLORS[color], rng))
    return image


# ---------------------------------------------------------------- documents (real lmms-eval schemas)


def textvqa_doc(rng: random.Random, uid: int) -> dict:
    word, sign_color = rng.choice(WORDS), rng.choice(sorted(COLORS))
    if rng.random() < 0.65:
        question = rng.choice(
            ("what does the sign say?", "what word is written on the sign?", "what is written on the sign?")
        )
        answer = word
    else:
        question, answer = rng.choice(("what color is the sign?", "what is the color of the sign?")), sign_color
    return {"image": sign_image(rng, word, sign_color), "question": question, "answers": [answer] * 10, "question_id": uid}


def vizwiz_doc(rng: random.Random, uid: int) -> dict:
    kind = rng.choices(("color", "shape", UNANSWERABLE), weights=(0.55, 0.25, 0.2))[0]
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    color_questions = ("what color is this?", "what color is this object?", "can you tell me the color of this?")
    shape_questions = ("what shape is this?", "what is the shape of this object?")
    if kind == UNANSWERABLE:
        image, question, answer, category = unanswerable_image(rng), rng.choice(color_questions + shape_questions), UNANSWERABLE, "unanswerable"
    elif kind == "color":
        image, question, answer, category = shape_image(rng, shape, color), rng.choice(color_questions), color, "other"
    else:
        image, question, answer, category = shape_image(rng, shape, color), rng.choice(shape_questions), shape, "other"
    return {"image": image, "question": question, "answers": [answer] * 10, "question_id": f"VizWiz_val_{uid:012d}.jpg", "category": category}


def scienceqa_doc(rng: random.Random, uid: int) -> dict:
    shape, side = rng.choice(SHAPES), rng.choice(("left", "right"))
    if rng.random() < 0.6:
        question, choices, answer = "Which shape is shown in the diagram?", list(SHAPES), SHAPES.index(shape)
        hint = "The diagram shows one shape."
    else:
        question, choices, answer = "Which side of the diagram is the shape on?", ["left", "right"], ["left", "right"].index(side)
        hint = ""
    return {"image": diagram_image(rng, shape, side), "question": question, "choices": choices, "answer": answer, "hint": hint}


def ocrbench_doc(rng: random.Random, uid: int) -> dict:
    word = rng.choice(WORDS)
    ink = _jitter(rng.choice(((20, 20, 20), (30, 30, 120), (120, 20, 20))), rng)
    image = render_word(word, rng, WIDE, ink, _light_background(rng))
    return {"image": image, "question": "what is written in the image?", "answer": [word], "dataset": "IIIT5K", "question_type": "Regular Text Recognition"}


def mmmu_doc(rng: random.Random, uid: int, index: int) -> dict:
    letters = "ABCD"
    if rng.random() < 0.5:
        color = rng.choice(MMMU_COLORS)
        subject, question, options = "Art", "What is the color of the shape in <image 1>?", list(MMMU_COLORS)
        image, answer = graph_paper_shape_image(rng, color), letters[MMMU_COLORS.index(color)]
    else:
        count = rng.randint(1, 4)
        subject, question, options = "Math", "How many dots are there in <image 1>?", list(COUNTS)
        image, answer = dots_image(rng, count), letters[count - 1]
    doc = {
        "id": f"validation_{subject}_{index + 1}",
        "question": question,
        "options": repr(options),
        "explanation": "",
        "image_1": image,
        "img_type": "['Diagrams']",
        "answer": answer,
        "topic_difficulty": "Easy",
        "question_type": "multiple-choice",
        "subfield": subject,
    }
    doc.update({f"image_{k}": None for k in range(2, 8)})
    return doc


def make_doc(task: str, split: str, index: int) -> dict:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
    rng, uid = doc_rng(task, split, index), doc_uid(task, split, index)
    builders: dict[str, Callable[[], dict]] = {
        "textvqa_val": lambda: textvqa_doc(rng, uid),
        "vizwiz_vqa_val": lambda: vizwiz_doc(rng, uid),
        "scienceqa_img": lambda: scienceqa_doc(rng, uid),
        "ocrbench": lambda: ocrbench_doc(rng, uid),
        "mmmu_val": lambda: mmmu_doc(rng, uid, index),
    }
    if task not in builders:
        raise ValueError(f"unknown testbed task {task!r}; valid: {TESTBED_TASKS}")
    return builders[task]()


def make_benchmark_docs(task: str, n: int, split: str = "eval") -> list[dict]:
    """`n` documents of `task` in the real lmms-eval schema (images as PIL RGB)."""
    return [make_doc(task, split, i) for i in range(n)]


# ---------------------------------------------------------------- prompts and targets (lmms-eval 0.7.3 defaults)


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def benchmark_prompt(task: str, doc: dict) -> str:
    """The text lmms-eval's default `doc_to_text` sends for `doc`."""
    if task == "textvqa_val":
        return f"{doc['question'].capitalize()}{TEXTVQA_POST}"
    if task == "vizwiz_vqa_val":
        return f"{doc['question'].capitalize()}{VIZWIZ_POST}"
    if task == "scienceqa_img":
        choices = "\n".join(f"{l}. {c}" for l, c in zip(_letters(len(doc["choices"])), doc["choices"]))
        context = f"Context: {doc['hint']}\n" if doc["hint"] else ""
        return f"{context}{doc['question']}\n{choices}{SCIENCEQA_POST}"
    if task == "ocrbench":
        return doc["question"].strip()
    if task == "mmmu_val":
        import ast

        options = ast.literal_eval(doc["options"])
        choices = "\n".join(f"{l}. {o}" for l, o in zip(_letters(len(options)), options))
        return f"{doc['question']}\n{choices}\n\n{MMMU_MC_PROMPT}"
    raise ValueError(f"unknown testbed task {task!r}; valid: {TESTBED_TASKS}")


def benchmark_target(task: str, doc: dict) -> str:
    """The answer a perfect model gives."""
    if task in ("textvqa_val", "vizwiz_vqa_val"):
        return doc["answers"][0]
    if task == "scienceqa_img":
        return _letters(len(doc["choices"]))[doc["answer"]]
    if task == "ocrbench":
        return doc["answer"][0]
    if task == "mmmu_val":
        return doc["answer"]
    raise ValueError(f"unknown testbed task {task!r}; valid: {TESTBED_TASKS}")


def doc_image(task: str, doc: dict) -> Image.Image:
    return doc["image_1"] if task == "mmmu_val" else doc["image"]


def chance_level(task: str) -> float:
    """Expected score of a uniform guess among the answers that fit the question's kind.

    vizwiz: colour questions guess among 6 colours + "unanswerable", shape questions among
    4 shapes + "unanswerable" (always answering "unanswerable" would score 0.2).
    """
    vizwiz = (0.55 + 0.2 * 0.6) / (len(COLORS) + 1) + (0.25 + 0.2 * 0.4) / (len(SHAPES) + 1)
    return {
        "textvqa_val": 0.65 / len(WORDS) + 0.35 / len(COLORS),
        "vizwiz_vqa_val": vizwiz,
        "scienceqa_img": 0.6 / len(SHAPES) + 0.4 / 2,
        "ocrbench": 1 / len(WORDS),
        "mmmu_val": 0.25,
    }[task]


# ---------------------------------------------------------------- calibration and training samples


def make_training_samples(
    n: int, split: str = "train", tasks: Sequence[str] = TESTBED_TASKS, start: int = 0
) -> list[dict]:
    """`n` samples `dict(task, image, prompt, answer)` cycling through `tasks` (doc index = start + i)."""
    samples = []
    for i in range(start, start + n):
        task = tasks[i % len(tasks)]
        doc = make_doc(task, split, i // len(tasks))
        samples.append(
            {"task": task, "image": doc_image(task, doc), "prompt": benchmark_prompt(task, doc), "answer": benchmark_target(task, doc)}
        )
    return samples


def make_calibration_samples(n: int, seed_split: str = "calib") -> list[dict]:
    """`n` calibration samples `dict(image, question, answer)`, cycling through the five tasks.

    Calibration prompts are the questions alone (the paper's setting); the answers serve methods that need
    the loss of the answers (MBQ's sensitivities).
    """
    return [{"image": s["image"], "question": s["prompt"], "answer": s["answer"]}
            for s in make_training_samples(n, split=seed_split)]
