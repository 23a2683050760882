"""Training the testbed's vision tower and merger on the synthetic tasks, language model frozen."""

from __future__ import annotations

import logging
import math
import os
import random
import re
import string
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from masquant.testbed.tasks import (
    TESTBED_TASKS,
    benchmark_prompt,
    benchmark_target,
    doc_image,
    make_benchmark_docs,
    make_doc,
)

logger = logging.getLogger(__name__)

EASY_TASKS = ("vizwiz_vqa_val", "scienceqa_img", "mmmu_val")
ANSWER_END = "<|im_end|>"
TRAIN_DOCS_PER_SEED = 10_000_000  # each seed draws its own training documents


@dataclass
class TrainConfig:
    steps: int = 800
    batch_size: int = 4
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    curriculum_steps: int = 80  # easy tasks only for the first steps
    task_weights: dict[str, float] = field(
        default_factory=lambda: {"textvqa_val": 2.0, "vizwiz_vqa_val": 1.0, "scienceqa_img": 1.0, "ocrbench": 2.0, "mmmu_val": 1.5}
    )
    seed: int = 0
    log_every: int = 25
    save_every: int = 200
    eval_docs: int = 40
    max_minutes: float | None = None  # stop early (keeping the schedule) when the wall clock runs out


def user_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def chat_prompts(processor, prompts: Sequence[str]) -> list[str]:
    return [processor.apply_chat_template(user_messages(p), add_generation_prompt=True) for p in prompts]


def answer_batch(processor, samples: Sequence[dict]) -> tuple[dict, list[int]]:
    """Left-padded inputs of prompt + answer + <|im_end|>, and the number of answer tokens per row."""
    texts = chat_prompts(processor, [s["prompt"] for s in samples])
    answers = [s["answer"] + ANSWER_END for s in samples]
    n_answer = [len(processor.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    inputs = processor(
        text=[t + a for t, a in zip(texts, answers)], images=[s["image"] for s in samples], padding=True, return_tensors="pt"
    )
    return dict(inputs), n_answer


def answer_loss(model, inputs: dict, n_answer: Sequence[int]) -> torch.Tensor:
    """Cross-entropy on the answer tokens only; the LM head runs only at those positions."""
    hidden = model.model(**inputs, use_cache=False).last_hidden_state  # [B, L, d]
    L = hidden.shape[1]
    rows = torch.cat([torch.full((k,), i) for i, k in enumerate(n_answer)])
    targets_at = torch.cat([torch.arange(L - k, L) for k in n_answer])
    logits = model.lm_head(hidden[rows, targets_at - 1])  # [N_answer, V]
    return F.cross_entropy(logits, inputs["input_ids"][rows, targets_at])


def lr_factor(step: int, config: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay over the steps or the wall-clock budget, whichever runs out first."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = max((step - config.warmup_steps) / max(1, config.steps - config.warmup_steps), time_fraction)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def training_stream(config: TrainConfig) -> Iterator[dict]:
    """Endless deterministic samples (fresh documents per seed); easy tasks only during the curriculum steps."""
    rng = random.Random(config.seed)
    counters = {task: 0 for task in TESTBED_TASKS}
    produced = 0
    while True:
        easy = produced < config.curriculum_steps * config.batch_size
        tasks = EASY_TASKS if easy else TESTBED_TASKS
        task = rng.choices(tasks, weights=[config.task_weights[t] for t in tasks])[0]
        doc = make_doc(task, "train", config.seed * TRAIN_DOCS_PER_SEED + counters[task])
        counters[task] += 1
        produced += 1
        yield {"task": task, "image": doc_image(task, doc), "prompt": benchmark_prompt(task, doc), "answer": benchmark_target(task, doc)}


def vision_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if name.startswith("model.visual.")}


def freeze_all_but_vision_(model) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(vision_parameters(model).values())
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def save_vision_weights(model, path: str | Path, dtype=torch.float16) -> None:
    """Vision tower + merger weights as safetensors, written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: p.detach().to(dtype).contiguous() for name, p in vision_parameters(model).items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    save_file(state, tmp, metadata={"format": "pt", "testbed": "testbed-vl"})
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)


def train_vision_tower_(model, processor, config: TrainConfig, out_path: str | Path | None = None) -> list[float]:
    """Train `model.model.visual` in place; returns the loss per step."""
    torch.manual_seed(config.seed)
    params = freeze_all_but_vision_(model)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    stream = training_stream(config)
    model.train()
    losses, started = [], time.monotonic()
    progress = tqdm(range(config.steps), desc="train vision", mininterval=30)
    for step in progress:
        minutes = (time.monotonic() - started) / 60
        if config.max_minutes is not None and minutes > config.max_minutes:
            logger.warning("stopping at step %d: %.1f min budget used", step, minutes)
            break
        time_fraction = minutes / config.max_minutes if config.max_minutes else 0.0
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config, time_fraction)
        samples = [next(stream) for _ in range(config.batch_size)]
        inputs, n_answer = answer_batch(processor, samples)
        loss = answer_loss(model, inputs, n_answer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % config.log_every == 0:
            recent = losses[-config.log_every :]
            logger.info("step %d loss %.4f lr %.2e %.1f min", step + 1, sum(recent) / len(recent), optimizer.param_groups[0]["lr"], minutes)
        if out_path is not None and (step + 1) % config.save_every == 0:
            save_vision_weights(model, out_path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if out_path is not None:
        save_vision_weights(model, out_path)
    return losses


# ---------------------------------------------------------------- held-out evaluation (simplified lmms-eval metrics)


def normalise_answer(text: str) -> str:
    text = text.strip().lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def score_prediction(task: str, doc: dict, prediction: str) -> float:
    """Approximate lmms-eval metric of one document (exact lmms-eval scoring lives in masquant.evaluation)."""
    target = benchmark_target(task, doc)
    if task in ("textvqa_val", "vizwiz_vqa_val"):
        return float(normalise_answer(prediction) == normalise_answer(target))
    if task == "scienceqa_img":
        return float(prediction == target or (len(prediction) >= 2 and prediction[0] == target and prediction[1] == "."))
    if task == "ocrbench":
        return float(target.lower() in prediction.lower())
    match = re.search(r"\b([A-D])\b", prediction)
    return float(bool(match) and match.group(1) == target)


@torch.no_grad()
def greedy_answers(model, processor, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 8) -> list[str]:
    inputs = processor(text=chat_prompts(processor, prompts), images=list(images), padding=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def heldout_accuracy(model, processor, n_docs: int = 40, batch_size: int = 8, split: str = "eval") -> dict[str, float]:
    """Greedy accuracy per task on `n_docs` documents of `split`, with the benchmark prompts."""
    model.eval()
    accuracy = {}
    for task in TESTBED_TASKS:
        docs = make_benchmark_docs(task, n_docs, split=split)
        scores = []
        for start in range(0, n_docs, batch_size):
            chunk = docs[start : start + batch_size]
            predictions = greedy_answers(
                model, processor, [doc_image(task, d) for d in chunk], [benchmark_prompt(task, d) for d in chunk]
            )
            scores += [score_prediction(task, d, p) for d, p in zip(chunk, predictions)]
        accuracy[task] = sum(scores) / len(scores)
    return accuracy


# ---------------------------------------------------------------- modality gap of the activations


@torch.no_grad()
def modality_activation_gap(model, processor, images: Sequence, prompts: Sequence[str], layers: Sequence[int] = (0, 15, 29)) -> dict[str, dict[str, float]]:
    """Per-channel absmax of the inputs of q_proj and down_proj, image tokens vs text tokens.

    Returns, per linear, `image_absmax`, `text_absmax` (text without the first, attention-sink,
    token) and `median_channel_ratio` (median over channels of image absmax / text absmax).
    """
    decoder_layers = model.model.language_model.layers
    linears = {f"layers.{i}.{role}": getattr(getattr(decoder_layers[i], part), role) for i in layers for part, role in (("self_attn", "q_proj"), ("mlp", "down_proj"))}
    captured: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: captured.__setitem__(name, args[0].detach())) for name, m in linears.items()]
    try:
        inputs = processor(text=chat_prompts(processor, prompts), images=list(images), padding=True, return_tensors="pt")
        model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    image = inputs["input_ids"] == processor.image_token_id  # [B, L]
    text = inputs["attention_mask"].bool() & (inputs["mm_token_type_ids"] == 0)
    first = inputs["attention_mask"].int().argmax(dim=1)
    text[torch.arange(text.shape[0]), first] = False
    gap = {}
    for name, X in captured.items():  # X: [B, L, d]
        image_absmax, text_absmax = X[image].abs().amax(dim=0), X[text].abs().amax(dim=0)  # [d]
        gap[name] = {
            "image_absmax": image_absmax.max().item(),
            "text_absmax": text_absmax.max().item(),
            "median_channel_ratio": (image_absmax / text_absmax.clamp_min(1e-6)).median().item(),
        }
    return gap
