"""MBQ baseline (thu-nics/MBQ, arXiv 2412.19509) on the layer walker, sharing AWQ's scale search.

The method in docs/methods/mbq.md.

1. ``collect``: modality sensitivities from the gradients of the SFT loss of the calibration answers
   (``ctx.calib.sft_batches()``: labels -100 except the answer). One sample at a time, backward through the
   whole model with requires_grad on activations only (the embedding output; every parameter frozen);
   hooks on the outputs of o_proj and down_proj of every layer take, per sample, mean |grad| over the vision
   rows and over the answer rows (the rows whose logits the loss reads: row t iff labels[t+1] != -100);
   averaged over samples. r_attn (o_proj) and r_mlp (down_proj) = vision / answer per layer, each floored
   at its median over layers. Language weight 1; only answer rows count as language. Cached like the
   input statistics (the calibration set and the weights key it).
2. ``apply``: AWQ's search (``baselines.awq.search.search_pair_scale``, the same function AWQ calls) for
   every scheme (W3A16, W4A16, W4A8, W8A8), α ∈ {0, 0.05, ..., 0.95}, with the MAE loss (Σ_answer|Δ| +
   r Σ_vision|Δ|) / (elements of both) on the pair's loss block (r_attn for attn_in and v_o, r_mlp for
   mlp_in and up_down); the answer rows are those of step 1, where the answer's loss is read (the official
   search masks the answer tokens themselves, one row later); no clip search; layer inputs from the FP
   model (the FP stream). The calibration
   sequences are the prompt + answer inputs (the answer rows must exist in the layers' inputs); they carry
   the model's real position ids: the walker replays each layer's own keyword arguments captured from the
   model's forward, so Qwen2-VL / Qwen2.5-VL keep their M-RoPE positions (the official MBQ code calls the
   layers with 1-D positions there, losing M-RoPE).
3. Deploy through the shared quantize step: W3/W4A16 asymmetric per group; W4A8/W8A8 weights per-channel
   symmetric and activations per-token dynamic, as the scheme says (the search's trial linears quantize the
   activations too, so W4A8 is never silently searched or evaluated weight-only).

Options: ``uniform_weights: true`` gives every row of the sequence weight 1 (the official
``reweight=False`` path; no gradient pass) and ``loss: mse`` the official ``loss_mode="mse"``: with both,
MBQ's search is AWQ's without clipping (a test checks the deployed weights are identical).
Vision rows are the adapter's vision tokens; audio tokens (Omni) weigh 0 (the method balances vision
against answers only).
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import torch
from tqdm.auto import tqdm

from baselines.awq.core import alpha_grid
from baselines.awq.method import fold_layer_scales_, search_layer_scales, search_report
from baselines.mbq.core import answer_rows, modality_grad_means, modality_row_weights, sensitivity_ratios, sft_loss
from masquant.calibration.data import CalibrationSet
from masquant.engine.walker import to_device
from masquant.errors import CalibrationDataError
from masquant.methods.base import BlockPlan, Method, MethodConfigError
from masquant.methods.registry import register_method
from masquant.quant.scheme import QuantScheme

log = logging.getLogger(__name__)

GRAD_ROLES = {"o": "attn", "down": "mlp"}  # the linear whose output gradient gives the block's sensitivity


class MBQLoss(str, Enum):
    mae = "mae"  # the paper and the official configs
    mse = "mse"  # official loss_mode option (AWQ's norm)


@dataclass
class MBQConfig:
    id: str = "mbq"
    n_grid: int = 20  # α ∈ {0, 1/n_grid, ..., (n_grid-1)/n_grid}
    loss: MBQLoss = MBQLoss.mae
    uniform_weights: bool = False  # every row weight 1 (official reweight=False); no gradient pass

    def __post_init__(self):
        if self.n_grid < 1:
            raise ValueError(f"method.n_grid={self.n_grid}: must be >= 1")
        if not isinstance(self.loss, MBQLoss):
            try:
                self.loss = MBQLoss(getattr(self.loss, "value", self.loss))
            except ValueError:
                raise ValueError(f"method.loss={self.loss!r}: valid choices are {[e.value for e in MBQLoss]}") from None


@contextmanager
def _gradient_hooks(model, adapter, record):
    """Activations require grad (embedding output), parameters do not; o/down outputs report their gradient."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = []

    def embed_hook(module, args, out):
        return out.detach().requires_grad_(True)

    def out_hook(i, role):
        def hook(module, args, out):
            if out.requires_grad:
                out.register_hook(lambda g: record(i, role, g))
        return hook

    try:
        for p, _ in flags:
            p.requires_grad_(False)
        handles.append(adapter.embed_tokens().register_forward_hook(embed_hook))
        for i, layer in enumerate(adapter.decoder_layers()):
            linears = adapter.linears(layer)
            handles += [linears[role].register_forward_hook(out_hook(i, role)) for role in GRAD_ROLES]
        yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def modality_gradients(model, adapter, sft: list[dict], device, video_as: str = "vision") -> dict[str, torch.Tensor]:
    """Per layer and role (o, down): mean over samples of the per-sample mean |∂L/∂out| over vision rows and
    over answer rows: {"vision_o": [L], "answer_o": [L], "vision_down": [L], "answer_down": [L]}."""
    L = adapter.num_layers()
    per_sample: dict[str, list[torch.Tensor]] = {f"{m}_{r}": [] for m in ("vision", "answer") for r in GRAD_ROLES}
    current: dict = {}

    def record(i, role, g):
        v, a = modality_grad_means(g, current["vision"], current["answer"])
        current[f"vision_{role}"][i], current[f"answer_{role}"][i] = v, a

    with _gradient_hooks(model, adapter, record), torch.enable_grad():
        for batch in tqdm(sft, desc="mbq gradients", leave=False):
            labels = batch["labels"]
            inputs = to_device({k: v for k, v in batch.items() if k != "labels"}, device)
            current.update(
                vision=adapter.modality_masks(inputs["input_ids"], video_as=video_as).get(
                    "vision", torch.zeros_like(inputs["input_ids"], dtype=torch.bool)).reshape(-1),
                answer=answer_rows(labels).to(device),
                **{f"{m}_{r}": torch.full((L,), float("nan")) for m in ("vision", "answer") for r in GRAD_ROLES})
            logits = model(**inputs, use_cache=False).logits
            sft_loss(logits, labels).backward()
            del logits
            for key in per_sample:
                per_sample[key].append(current[key].clone())
    return {key: torch.nanmean(torch.stack(vals), dim=0) for key, vals in per_sample.items()}


@register_method("mbq", config=MBQConfig, order=40)
class MBQ(Method):
    needs_answers = True  # the SFT loss of the calibration answers (checked before the model loads)
    needs_whole_model_backward = True  # the gradients of that loss

    def check_config(self, scheme: QuantScheme, modalities) -> None:
        if "vision" not in modalities and not self.cfg.uniform_weights:
            raise MethodConfigError(
                f"method=mbq balances vision tokens against answer tokens, but modality.modalities={list(modalities)} "
                "has no vision; use modality=text_vision (or method.uniform_weights=true, the official reweight=False)")

    # --- steps ------------------------------------------------------------------------------------
    def _sft(self, ctx) -> list[dict]:
        """The calibration prompts with their answers; fails first, before any model work, without answers."""
        try:
            return ctx.require_calibration().sft_batches()
        except CalibrationDataError as err:
            raise MethodConfigError(f"method=mbq: {err}") from None

    def sensitivities(self, ctx, sft: list[dict]) -> dict[str, torch.Tensor]:
        """Step 1: {"r_attn", "r_mlp", "r_attn_raw", "r_mlp_raw", + the gradient means} per layer (cached)."""
        key = {**ctx.cache_key, "kind": "mbq_grad", "video_as": ctx.video_as}
        grads = ctx.cache.load(key)
        if grads is None:
            grads = modality_gradients(ctx.model, ctx.adapter, sft, ctx.device, ctx.video_as)
            if not torch.isfinite(torch.stack(list(grads.values()))).all():
                raise MethodConfigError(
                    "method=mbq: the calibration set gives no vision (or no answer) rows at some layer, so the "
                    f"vision/answer gradient ratio is undefined (gradient means {grads}); use calibration rows with "
                    "images and answers, or method.uniform_weights=true")
            ctx.cache.save(key, grads)
        out = dict(grads)
        out["r_attn"], out["r_attn_raw"] = sensitivity_ratios(grads["vision_o"], grads["answer_o"])
        out["r_mlp"], out["r_mlp_raw"] = sensitivity_ratios(grads["vision_down"], grads["answer_down"])
        return out

    def sft_context(self, ctx, sft: list[dict]):
        """A context whose calibration sequences are prompt + answer (labels dropped), with its own statistics
        cache key, and each sample's answer rows."""
        inputs = [{k: v for k, v in b.items() if k != "labels"} for b in sft]
        sft_ctx = dataclasses.replace(ctx, calib=CalibrationSet(inputs, description=dict(ctx.calib.description)),
                                      cache_key={**ctx.cache_key, "sequences": "prompt+answer"})
        return sft_ctx, [answer_rows(b["labels"]) for b in sft]

    # --- hooks ------------------------------------------------------------------------------------
    def prepare(self, ctx):
        """Step 1 (the gradients, unless uniform_weights), then the walk over prompt + answer sequences."""
        sft = self._sft(ctx)
        self.stats = None if self.cfg.uniform_weights else self.sensitivities(ctx, sft)
        self.alphas: list[float] = []
        sft_ctx, self.answers = self.sft_context(ctx, sft)
        return sft_ctx

    def plan_block(self, ctx, step) -> BlockPlan:
        """Step 2 on one layer of the prompt + answer walk; step 3 (the deploy) is the engine's."""
        found = self.scale_layer_(ctx, step, self.stats, self.answers)
        self.alphas += [r.alpha for r in found.values()]
        return BlockPlan(report=search_report(found))

    def scale_layer_(self, ctx, step, stats, answers: list[torch.Tensor]) -> dict:
        """Every pair of one layer of the prompt + answer walk searched with the modality-weighted loss on the
        unscaled FP layer, then all chosen s folded; returns the searches."""
        i = step.index
        row_weights_for = None
        if not self.cfg.uniform_weights:
            vision = [step.masks(k).get("vision", torch.zeros_like(step.masks(k)["text"])).reshape(-1)
                      for k in range(step.n_samples)]

            def row_weights_for(pair):
                r = float(stats["r_attn" if pair.block == "attn" else "r_mlp"][i])
                return [modality_row_weights(a, v, r) for a, v in zip(answers, vision)]

        p = 1 if MBQLoss(self.cfg.loss) == MBQLoss.mae else 2
        found = search_layer_scales(ctx, step, alpha_grid(self.cfg.n_grid), row_weights_for, p)
        fold_layer_scales_(ctx, step.layer, found)
        return found

    def finish(self, ctx) -> dict:
        cfg = self.cfg
        report: dict = {"mbq/n_grid": cfg.n_grid, "mbq/loss": MBQLoss(cfg.loss).value,
                        "mbq/uniform_weights": cfg.uniform_weights}
        if self.stats is not None:
            for i in range(ctx.adapter.num_layers()):
                for name in ("r_attn", "r_mlp", "r_attn_raw", "r_mlp_raw"):
                    report[f"mbq/{name}/layer_{i}"] = float(self.stats[name][i])
        report["mbq/alpha_mean"] = sum(self.alphas) / max(len(self.alphas), 1)
        return report
