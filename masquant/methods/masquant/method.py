"""MASQuant as a method plugin: MAS (modality-aware smoothing, learned block-wise) + CMC deployment.

The method in docs/methods/masquant.md. One walk of the shared layer walker, with both streams:

1. FP pass of the layer on the FP stream (the walker's, made anyway): the targets (= next layer's FP
   inputs), the per-modality absmax statistics when the cache has none, and for CMC with whitening one
   raw Gram matrix C = Σ xᵀx per (input group, non-text modality) in float64.
2. Init s_m for q, o, up from the per-modality absmax (§3 step 2); k, v start from q, gate from up.
3. ``learn``: AdamW on s_text / s_vision / s_audio of the six smoothed linears, block-wise
   (target = FP layer output on the FP stream, input = the quantized stream), loss Eq. 14.
4. Deploy into ``QuantLinear`` s: ``cmc`` -> shared weight Q(diag(s_text) W), text path
   ``ModalityPath(smooth=s_text)``, non-text path ``ModalityPath(smooth=s_m, L1, L2)``;
   ``per_modality_weights`` -> ``ModalityPath(smooth=s_m, weight=Q(diag(s_m) W))``.
5. The quantized stream advances through the deployed layer; that pass also gives the deployed block
   loss (``masquant/loss_deployed``). The learning loss is reported as the mean of the first and of the
   last epoch's steps, so no pass is made only to report a loss.

Deviations from the paper and the official code, on purpose:
- The covariance for whitening is accumulated layer by layer in the FP pass (step 1) and dropped after
  the layer is deployed, not cached with the statistics: keeping Gram matrices of every layer would cost
  ~100 GB at 3B. The data is the same (the FP model's inputs per input group and modality).
- The learning forward divides activations by (s + ``learn_eps``) and multiplies weights by s, as the
  official code does (its ``forward_mas_train``); ``learn_eps`` = 1e-5 by default, 0 for the exact Eq. 13.
- A modality with no calibration tokens gets no path (its tokens take the text path) and a warning,
  instead of the official clamp to 1e-5, which would deploy s ≈ 1e-5^α and blow up those tokens.
- CMC branches go on ``cmc.roles``, by default every quantized linear ("one quantized weight per
  linear"), down_proj included: its s = 1, so ΔW_m = W − Q(W), the weight-quantization error seen
  through modality m's activations. An earlier default left down_proj out; on the testbed at W4A6 that
  left the unsmoothed down_proj as the vision tokens' largest error (e2e vision SQNR 4.5 vs 6.4 dB at
  the MAS initialisation).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from masquant.adapters.base import ROLE_TO_GROUP
from masquant.calibration.stats import GramObserver
from masquant.engine.deploy import DeployWeight
from masquant.engine.walker import StackStep
from masquant.methods.base import BlockPlan, Method, MethodConfigError, Walk
from masquant.methods.masquant import core
from masquant.methods.masquant.config import SMOOTHED_ROLES, Deploy, MASQuantConfig
from masquant.methods.masquant.cost import count_lowrank
from masquant.quant.grid import IntGrid
from masquant.quant.linear import DEFAULT_PATH, ModalityPath, ModalityRouter
from masquant.quant.quantizer import (
    quantize_activation,
    quantize_weight,
    quantize_weight_grid,
    weight_global_scale,
)
from masquant.quant.scheme import QuantScheme
from masquant.quant.smoothing import smooth_factors, weight_input_absmax
from masquant.methods.registry import register_method
from masquant.engine.memory import peak_memory_mb

log = logging.getLogger(__name__)

INIT_ROLES = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "up", "up": "up"}  # role -> role whose init it copies
TIED_TO = {"k": "q", "v": "q", "gate": "up"}  # tie_scales
KNOWN_MODALITIES = ("text", "vision", "audio")

Scales = dict[str, dict[str, torch.Tensor]]  # role -> modality -> s [in]


class MASLearnLinear(nn.Module):
    """Differentiable stand-in for one linear during learning: Eq. 13 with the STE, rows routed by modality."""

    def __init__(self, W: torch.Tensor, bias: torch.Tensor | None, scheme: QuantScheme, router: ModalityRouter,
                 scales: dict[str, torch.Tensor] | None, modalities: tuple[str, ...], eps: float = 0.0,
                 scratch: dict | None = None):
        super().__init__()
        self.register_buffer("W", W.detach().float())  # [out, in]
        self.register_buffer("b", None if bias is None else bias.detach().float())
        self.scheme = scheme
        self.router = router
        self.scales = scales  # modality -> nn.Parameter s [in] (shared objects when tied / uniform); None: down
        self.eps = eps
        self.path_names = (DEFAULT_PATH,) + tuple(m for m in modalities if m != DEFAULT_PATH)
        # an unsmoothed linear (down_proj, s = 1) has one weight for every modality and nothing to learn in it:
        # Q(W) is rounded once here, not at every step and per modality, and all rows share one matmul
        self.register_buffer("W_q", None if scales else quantize_weight(self.W, scheme))
        # its integer codes and scales, W_q = c_w·s_w, for the forward on the codes on CPU (core.IntCodesLinearSTE)
        self.W_codes = None if scales else core.weight_codes(self.W, scheme)
        # the fused path's [out, in] tensors, reused from step to step (``scratch``: shared by a layer's linears)
        self.buffers = core.FusedBuffers(scratch) if scales else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.W_q is not None:
            xq = quantize_activation(xf, self.scheme, ste=True)
            if self.W_codes is not None and torch.is_grad_enabled() and core.int_matmul_applies(self.scheme, xf):
                grid = IntGrid(self.scheme.a_bits, True, self.scheme.int_range)
                return core.IntCodesLinearSTE.apply(xq, xf, self.W_q, *self.W_codes, self.b, grid,
                                                    float(self.scheme.a_clip_ratio)).to(x.dtype)
            return F.linear(xq, self.W_q, self.b).to(x.dtype)
        n = xf[..., 0].numel()
        index = self.router.partition(self.path_names, n, x.device)
        scales = self.scales or {m: None for m in self.path_names}
        return core.mas_linear(xf, index, scales, self.W, self.b, self.scheme, ste=True, eps=self.eps,
                               buffers=self.buffers).to(x.dtype)


@register_method("masquant", config=MASQuantConfig, order=80)
class MASQuant(Method):
    # one shared weight Q(diag(s_text) W) per linear: another modality's scales are reconciled by CMC's rank-r branch,
    # exact only at full rank (cmc.rank_ratio=1), so even at quant=fp16 the function changes a little
    function_preserving = False

    def __init__(self, cfg: MASQuantConfig | None = None):
        super().__init__(cfg if cfg is not None else MASQuantConfig())
        # a composed DictConfig works too (attribute access only); MASQuantConfig validated it already
        self.deploy = Deploy(self.cfg.deploy)

    # --- plugin interface -------------------------------------------------------------------------
    def check_config(self, scheme: QuantScheme, modalities: tuple[str, ...]) -> None:
        bad = [m for m in modalities if m not in KNOWN_MODALITIES]
        if bad:
            raise MethodConfigError(f"method=masquant: unknown modalities {bad}; valid: {list(KNOWN_MODALITIES)}")
        if not any(m != "text" for m in modalities):
            log.warning("method=masquant with text only: MAS reduces to smoothing with text scales, CMC adds nothing")

    def prepare(self, ctx):
        cfg = self.cfg
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        self.modalities = ("text",) + tuple(m for m in ctx.modalities if m != "text")
        self.nontext = self.modalities[1:]
        whiten = self.deploy == Deploy.cmc and cfg.cmc.whiten
        self.cov_groups = sorted({ROLE_TO_GROUP[r] for r in cfg.cmc.roles}) if whiten else []
        self.grams: GramObserver | None = None
        self.ranks: list[int] = []
        self.missing_warned: set[str] = set()

    def walk(self, ctx, stack):
        return Walk(stats=True, quantized_stream=True)

    def observers(self, ctx, step) -> list:
        """CMC's whitening: raw Gram matrices C = Σ xᵀx per (input group, non-text modality) of the FP pass."""
        if not (self.cov_groups and self.nontext):
            self.grams = None
            return []
        self.grams = GramObserver.for_block(step.stack, step.block, self.cov_groups, self.nontext, step.device)
        return [self.grams]

    def plan_block(self, ctx, step) -> BlockPlan:
        """MAS init (§3 step 2), the block-wise learning (Eq. 13-14), then the deploy plan (MAS paths, CMC)."""
        cfg = self.cfg
        active = self._active_modalities(step.stats, self.modalities, self.missing_warned)
        linears = ctx.adapter.linears(step.layer)
        scales = self.init_scales(step.stats, linears, active)
        report = {}
        if cfg.learn and cfg.epochs > 0:
            report["loss_epoch1"], report["loss_last_epoch"] = self._learn_layer(ctx, step, linears, scales, active)
        covs = {}
        if self.grams is not None:
            covs = {g: {m: self.grams.gram(g, m) for m in self.nontext} for g in self.grams.grams}
            self.grams = None
        weight_for, paths_for = self._deploy_fns(ctx, linears, scales, covs, active)
        return BlockPlan(weight_for=weight_for, paths_for=paths_for, report=report)

    def after_deploy(self, ctx, step, plan) -> dict:
        deployed = step.quant_outputs()  # the pass that advances the quantized stream
        return {"loss_deployed": self._mean_loss(step, deployed, self.cfg.lambdas())}

    def finish(self, ctx) -> dict:
        cfg = self.cfg
        report: dict = {"masquant/deploy": Deploy(cfg.deploy).value, "masquant/learn": cfg.learn,
                        "masquant/uniform": cfg.uniform}
        if self.deploy == Deploy.cmc:
            report["cmc/rank_ratio"] = cfg.cmc.rank_ratio
            report["cmc/rank"] = cfg.cmc.rank
            report["cmc/rank_floor"] = cfg.cmc.rank_floor
            report["cmc/whiten"] = cfg.cmc.whiten
            report["cmc/quantized_target"] = cfg.cmc.quantized_target
        report.update(count_lowrank(ctx.model))
        report["mem/peak_mb"] = peak_memory_mb(ctx.device)
        return report

    # --- steps ------------------------------------------------------------------------------------
    def _active_modalities(self, layer_stats, modalities, warned: set) -> tuple[str, ...]:
        """Modalities with calibration tokens at this layer; the others fall back to the text path."""
        active = []
        for m in modalities:
            if m == "text" or layer_stats["qkv"][m].count > 0:
                active.append(m)
            elif m not in warned:
                warned.add(m)
                log.warning("masquant: no %s tokens in the calibration set; %s tokens will take the text path", m, m)
        return tuple(active)

    def init_scales(self, layer_stats, linears: dict[str, nn.Module], active) -> Scales:
        """MAS step 2 for q, o, up (k, v copy q; gate copies up); ``uniform`` uses all-token statistics."""
        cfg = self.cfg
        base: dict[str, dict[str, torch.Tensor]] = {}
        for role in ("q", "o", "up"):
            group = ROLE_TO_GROUP[role]
            w_absmax = weight_input_absmax(linears[role].weight)
            if cfg.uniform:
                s = smooth_factors(layer_stats[group]["all"].absmax, w_absmax, cfg.alpha)
                base[role] = {m: s for m in active}
            else:
                base[role] = {m: smooth_factors(layer_stats[group][m].absmax, w_absmax, cfg.alpha) for m in active}
        return {role: {m: s.clone() for m, s in base[INIT_ROLES[role]].items()} for role in SMOOTHED_ROLES}

    @staticmethod
    def _mean_loss(step: StackStep, outputs: list[torch.Tensor], lambdas: dict[str, float]) -> float:
        total = 0.0
        for k, y in enumerate(outputs):
            masks = step.masks(k)
            total += float(core.weighted_mae(y.float(), step.fp_outputs[k].float(), masks, lambdas))
        return total / max(len(outputs), 1)

    def _learn_layer(self, ctx, step: StackStep, linears, scales: Scales, active) -> tuple[float, float]:
        """OmniQuant-style block-wise learning of the scales (Eq. 13-14); updates ``scales`` in place.

        Returns the mean loss of the first and of the last epoch's steps.
        """
        cfg = self.cfg
        device = step.device
        layer = step.layer
        params = self._make_params(scales, active, device)
        router = ModalityRouter()
        originals = dict(linears)
        frozen = [(p, p.requires_grad) for p in layer.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        scratch: dict = {}  # one dL/dW scratch per weight shape for the layer's fused linears
        for role, lin in linears.items():
            ctx.adapter.set_linear(layer, role, MASLearnLinear(lin.weight, lin.bias, ctx.scheme, router,
                                                               params.get(role), active, cfg.learn_eps, scratch))
        n = step.n_samples if cfg.n_learn_samples is None else min(cfg.n_learn_samples, step.n_samples)
        lambdas = cfg.lambdas()
        unique = list({id(p): p for per_m in params.values() for p in per_m.values()}.values())
        epoch_losses: list[float] = []
        try:
            opt = torch.optim.AdamW(unique, lr=cfg.lr, weight_decay=0.0)
            bar = tqdm(total=cfg.epochs * n, desc=f"masquant layer {step.index}", leave=False)
            with torch.enable_grad():
                for _ in range(cfg.epochs):
                    total = 0.0
                    for k in range(n):
                        for p in unique:
                            core.truncate_scales_(p.data, cfg.scale_floor)
                        s_in = step.sample("quant", k)
                        router.set_masks(s_in.masks)
                        y = s_in.run(layer)
                        loss = core.weighted_mae(y.float(), step.fp_outputs[k].to(device).float(), s_in.masks, lambdas)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        value = float(loss.detach())
                        total += value
                        bar.update(1)
                        bar.set_postfix(loss=f"{value:.4g}")
                    epoch_losses.append(total / max(n, 1))
            bar.close()
            with torch.no_grad():
                for p in unique:
                    core.truncate_scales_(p.data, cfg.scale_floor)
        finally:
            for role, lin in originals.items():
                ctx.adapter.set_linear(layer, role, lin)
            for p, flag in frozen:
                p.requires_grad_(flag)
        for role, per_m in params.items():
            for m, p in per_m.items():
                scales[role][m] = p.detach().clone()
        log.info("masquant layer %d: learning loss %.4g (epoch 1) -> %.4g (epoch %d)", step.index, epoch_losses[0],
                 epoch_losses[-1], len(epoch_losses))
        return epoch_losses[0], epoch_losses[-1]

    def _make_params(self, scales: Scales, active, device) -> dict[str, dict[str, nn.Parameter]]:
        """Trainable fp32 scales; ``tie_scales`` shares k, v with q and gate with up, ``uniform`` shares modalities."""
        cfg = self.cfg
        params: dict[str, dict[str, nn.Parameter]] = {}
        for role in sorted(SMOOTHED_ROLES, key=lambda r: r in TIED_TO):  # owners (q, o, up) before the tied roles
            owner = TIED_TO.get(role) if cfg.tie_scales else None
            if owner is not None:
                params[role] = params[owner]
                continue
            if cfg.uniform:
                p = nn.Parameter(scales[role][active[0]].detach().float().clone().to(device))
                params[role] = {m: p for m in active}
            else:
                params[role] = {m: nn.Parameter(scales[role][m].detach().float().clone().to(device)) for m in active}
        return params

    def _deploy_fns(self, ctx, linears, scales: Scales, covs, active):
        """``weight_for`` and ``paths_for`` of the layer's seven linears: one shared weight, MAS paths, CMC
        low-rank branches (their ranks are collected in ``self.ranks`` as they are deployed)."""
        cfg = self.cfg
        scheme = ctx.scheme
        ranks = self.ranks
        smooth = {role: {m: v.to(lin.weight.device).float() for m, v in scales[role].items()}
                  for role, lin in linears.items() if role in scales}

        def weight_for(role, lin):  # one shared weight W_q = Q(diag(s_text) W); down_proj (s = 1): Q(W)
            W = lin.weight.data.float()
            s = smooth.get(role)
            W_s = W if s is None else core.smooth_weight(W, s["text"])
            W_q, scale, zero = quantize_weight_grid(W_s, scheme)
            return DeployWeight(W_q, True, scale, zero, global_scale=weight_global_scale(W_s, scheme))

        def paths_for(role, lin, W_q):
            W, dtype = lin.weight.data.float(), lin.weight.dtype
            s = smooth.get(role)
            paths = {} if s is None else {"text": ModalityPath(smooth=s["text"].to(dtype))}
            for m in active:
                if m == "text":
                    continue
                s_m = None if s is None else s[m]
                if self.deploy == Deploy.per_modality_weights:
                    if s_m is not None:
                        W_m = quantize_weight(core.smooth_weight(W, s_m), scheme)
                        paths[m] = ModalityPath(smooth=s_m.to(dtype), weight=W_m.to(dtype))
                elif role in cfg.cmc.roles:
                    ones = torch.ones(W.shape[1], device=W.device)
                    L1, L2 = self.cmc_factors(W, ones if s_m is None else s_m, W_q.float(),
                                              covs.get(ROLE_TO_GROUP[role], {}).get(m), scheme)
                    ranks.append(L1.shape[1])
                    paths[m] = ModalityPath(smooth=None if s_m is None else s_m.to(dtype), L1=L1.to(dtype),
                                            L2=L2.to(dtype))
                elif s_m is not None:
                    paths[m] = ModalityPath(smooth=s_m.to(dtype))
            return paths

        return weight_for, paths_for

    def cmc_factors(self, W: torch.Tensor, s_m: torch.Tensor, W_q: torch.Tensor, C: torch.Tensor | None,
                    scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 22-28 for one linear and modality: ΔW_m, whitening from C (raw Gram of x), rank-r L1 [in, r], L2 [r, out]."""
        c = self.cfg.cmc
        dW = core.cmc_residual(W, s_m, W_q, scheme if c.quantized_target else None)  # [in, out]
        r = core.resolve_rank(dW.shape[0], dW.shape[1], c.rank_ratio, c.rank, c.rank_floor)
        if c.whiten and C is not None:
            T, T_inv = core.whitening(core.rescale_covariance(C, s_m), c.damping)
        else:
            T = T_inv = None
        try:
            L1, L2 = core.whitened_low_rank(dW, T, T_inv, r)
            L1, L2 = L1.float(), L2.float()
            finite = bool(torch.isfinite(L1).all() and torch.isfinite(L2).all())
        except torch.linalg.LinAlgError:
            finite = False
        if not finite:
            raise MethodConfigError(
                f"method.cmc.damping={c.damping}: the whitened low-rank factors are not finite (a singular Gram "
                f"matrix: fewer calibration tokens of the modality than input channels, {dW.shape[0]}); raise "
                "method.cmc.damping (default 0.01) or use more calibration samples")
        return L1, L2
