"""Training the testbed-omni audio projector (`model.audio_tower.proj`, 384 -> 576), everything else frozen.

Two phases, both on the "train" split of the synthetic speech (`masquant.testbed.audio_tasks`):
1. alignment (closed form): each audio token's Whisper feature (the projector's input) is mapped by ridge
   regression onto the embedding of the word token spoken at that moment (words are synthesised one by
   one, so their time spans are known; a word's BPE tokens share its span in order). The language model
   then reads speech as (repeated) text tokens.
2. end-to-end: AdamW on the projector with the answer loss of the frozen language model, on ASR prompts
   (lmms-eval's LibriSpeech prompt) and OmniBench-style prompts, for a wall-clock budget.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from masquant.calibration.data import chat_inputs
from masquant.testbed.audio_tasks import (
    asr_prompt,
    make_asr_doc,
    make_omnibench_doc,
    omnibench_prompt,
    omnibench_target,
)

logger = logging.getLogger(__name__)
TOKENS_PER_SECOND = 25.0  # mel 100/s, conv stride 2, average pooling 2
ANSWER_END = "<|im_end|>"


@dataclass
class OmniTrainConfig:
    align_docs: int = 400
    ridge: float = 1.0
    e2e_minutes: float = 15.0
    e2e_max_steps: int = 400
    batch_size: int = 4
    lr: float = 1e-3
    omnibench_fraction: float = 0.3
    eval_docs: int = 20
    seed: int = 0


def projector_inputs(model, inputs: dict) -> torch.Tensor:
    """The audio tower's features before `proj` [N_audio_tokens, 384] for processed inputs with one clip."""
    captured = []
    proj = model.model.audio_tower.proj
    handle = proj.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model.model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
    finally:
        handle.remove()
    return captured[0].reshape(-1, proj.in_features)


def word_token_targets(doc: dict, n_tokens: int, tokenizer, E: torch.Tensor) -> torch.Tensor:
    """[n_tokens, d]: per audio token, the embedding of the word token spoken at its time."""
    pieces = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in doc["words"]]
    targets = []
    for k in range(n_tokens):
        t = (k + 0.5) / TOKENS_PER_SECOND
        i = min(range(len(doc["spans"])), key=lambda j: 0 if doc["spans"][j][0] <= t <= doc["spans"][j][1]
                else min(abs(t - doc["spans"][j][0]), abs(t - doc["spans"][j][1])))
        start, end = doc["spans"][i]
        frac = min(max((t - start) / max(end - start, 1e-6), 0.0), 0.999)
        targets.append(E[pieces[i][int(frac * len(pieces[i]))]])
    return torch.stack(targets)


def fit_projector_(model, processor, config: OmniTrainConfig) -> dict:
    """Phase 1: ridge regression of the word-token embeddings on the projector's inputs."""
    t0 = time.perf_counter()
    E = model.model.language_model.embed_tokens.weight.detach()
    X, Y = [], []
    for i in range(config.align_docs):
        doc = make_asr_doc("train", i, with_spans=True)
        inputs = processor(text=["<|audio_bos|><|AUDIO|><|audio_eos|>"], audio=[doc["audio"]["array"]],
                           return_tensors="pt")
        feats = projector_inputs(model, inputs)
        X.append(feats)
        Y.append(word_token_targets(doc, feats.shape[0], processor.tokenizer, E))
    X, Y = torch.cat(X).double(), torch.cat(Y).double()
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)
    A = X1.T @ X1 + config.ridge * torch.eye(X1.shape[1], dtype=X.dtype)
    B = torch.linalg.solve(A, X1.T @ Y)  # [385, d]
    proj = model.model.audio_tower.proj
    with torch.no_grad():
        proj.weight.copy_(B[:-1].T.float())
        proj.bias.copy_(B[-1].float())
    residual = float(((X1 @ B - Y).norm() / Y.norm()))
    return {"align/tokens": len(X), "align/relative_residual": residual, "align/seconds": time.perf_counter() - t0}


def training_sample(rng: random.Random, index: int, omnibench_fraction: float) -> dict:
    if rng.random() < omnibench_fraction:
        doc = make_omnibench_doc("train", index)
        return {"question": omnibench_prompt(doc), "image": doc["image"], "audio": doc["audio"]["array"],
                "answer": omnibench_target(doc)}
    doc = make_asr_doc("train", 100_000 + index)
    return {"question": asr_prompt(), "image": None, "audio": doc["audio"]["array"], "answer": doc["gt"].lower()}


def answer_loss(model, inputs: dict) -> torch.Tensor:
    labels = inputs.pop("labels")
    hidden = model.model(**inputs, use_cache=False).last_hidden_state
    rows, cols = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
    logits = model.lm_head(hidden[rows, cols])
    return F.cross_entropy(logits, labels[rows, cols + 1])


def train_projector_e2e_(model, processor, config: OmniTrainConfig) -> dict:
    """Phase 2: the answer loss through the frozen model, projector only, until the step or time budget."""
    for p in model.parameters():
        p.requires_grad_(False)
    proj = model.model.audio_tower.proj
    for p in proj.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(proj.parameters(), lr=config.lr, weight_decay=0.0)
    rng = random.Random(config.seed)
    t0, step, losses = time.perf_counter(), 0, []
    while step < config.e2e_max_steps and (time.perf_counter() - t0) < config.e2e_minutes * 60:
        opt.zero_grad()
        total = 0.0
        for b in range(config.batch_size):
            s = training_sample(rng, step * config.batch_size + b, config.omnibench_fraction)
            inputs = chat_inputs(processor, s["question"], s["image"], s["audio"], s["answer"])
            loss = answer_loss(model, inputs) / config.batch_size
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(proj.parameters(), 1.0)
        opt.step()
        losses.append(total)
        step += 1
        if step % 10 == 0:
            logger.info("e2e step %d loss %.3f (%.0f s)", step, sum(losses[-10:]) / 10, time.perf_counter() - t0)
    for p in proj.parameters():
        p.requires_grad_(False)
    return {"e2e/steps": step, "e2e/seconds": time.perf_counter() - t0,
            "e2e/loss_first10": sum(losses[:10]) / max(1, min(10, len(losses))),
            "e2e/loss_last10": sum(losses[-10:]) / max(1, min(10, len(losses)))}


@torch.no_grad()
def greedy_answer(model, processor, question: str, image=None, audio=None, max_new_tokens: int = 16) -> str:
    inputs = chat_inputs(processor, question, image, audio)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def quick_eval(model, processor, n: int, split: str = "eval") -> dict:
    """WER (word edit distance / reference words, lower-cased) and OmniBench accuracy on `n` documents each."""
    import editdistance

    errors = words = correct = 0
    for i in range(n):
        doc = make_asr_doc(split, i)
        hyp = greedy_answer(model, processor, asr_prompt(), audio=doc["audio"]["array"]).lower().split()
        ref = doc["gt"].lower().split()
        errors += editdistance.eval(ref, hyp)
        words += len(ref)
        odoc = make_omnibench_doc(split, i)
        ans = greedy_answer(model, processor, omnibench_prompt(odoc), odoc["image"], odoc["audio"]["array"], 4)
        correct += ans[:1].upper() == omnibench_target(odoc)
    return {"eval/wer": 100.0 * errors / max(words, 1), "eval/omnibench_acc": 100.0 * correct / n}


def audio_state(model) -> dict[str, torch.Tensor]:
    return {f"model.audio_tower.proj.{k}": v.detach().clone().contiguous()
            for k, v in model.model.audio_tower.proj.state_dict().items()}
