"""MASQuant as a method plugin: MAS (modality-aware smoothing, learned block-wise) + CMC deployment.

Spec: /work/shared/specs/masquant.md. Walk, one decoder layer at a time:

1. FP pass of the layer on the FP stream: the targets (= next layer's FP inputs) and, for CMC with
   whitening, one raw Gram matrix C = Σ xᵀx per (input group, non-text modality) in float64.
2. Init s_m for q, o, up from the per-modality absmax (§3 step 2); k, v start from q, gate from up.
3. ``learn``: AdamW on s_text / s_vision / s_audio of the six smoothed linears, block-wise
   (target = FP layer output on the FP stream, input = the quantized stream), loss Eq. 14.
4. Deploy into ``QuantLinear`` s: ``cmc`` -> shared weight Q(diag(s_text) W), text path
   ``ModalityPath(smooth=s_text)``, non-text path ``ModalityPath(smooth=s_m, L1, L2)``;
   ``per_modality_weights`` -> ``ModalityPath(smooth=s_m, weight=Q(diag(s_m) W))``.
5. The quantized stream advances through the deployed layer.

Deviations from the spec / brief, on purpose:
- The covariance for whitening is accumulated here, layer by layer, while the FP stream is walked
  (step 1), instead of through ``ctx.input_stats(with_cov=True)``: that call keeps Gram matrices of every
  layer, of "all" tokens and of text too (for a 3B model ~1 GB per down_proj Gram, ~100 GB in all). The
  data is the same (the FP model's inputs per input group and modality). ``collect`` only asks the
  (cached) absmax statistics.
- A modality with no calibration tokens gets no path (its tokens take the text path) and a warning,
  instead of the spec's clamp to 1e-5, which would deploy s ≈ 1e-5^α and blow up those tokens.
- CMC branches go on ``cmc.roles``, by default every quantized linear (spec §4 "one quantized weight per
  linear"), down_proj included: its s = 1, so ΔW_m = W − Q(W), the weight-quantization error seen
  through modality m's activations. An earlier default left down_proj out; on the testbed at W4A6 that
  left the unsmoothed down_proj as the vision tokens' largest error (e2e vision SQNR 4.5 vs 6.4 dB at
  the MAS initialisation).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from masquant.adapters.base import INPUT_GROUPS, ROLE_TO_GROUP
from masquant.calibration.layerwise import LayerInputs, LayerSample, advance, layer_sample_on
from masquant.methods.base import Method, MethodConfigError, QuantContext, count_lowrank
from masquant.methods.masquant import core
from masquant.methods.masquant.config import SMOOTHED_ROLES, Deploy, MASQuantConfig
from masquant.quant.linear import DEFAULT_PATH, ModalityPath, ModalityRouter, QuantLinear
from masquant.quant.quantizer import quantize_weight
from masquant.quant.scheme import QuantScheme
from masquant.resources import peak_memory_mb

log = logging.getLogger(__name__)

INIT_ROLES = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "up", "up": "up"}  # role -> role whose init it copies
TIED_TO = {"k": "q", "v": "q", "gate": "up"}  # tie_scales
KNOWN_MODALITIES = ("text", "vision", "audio")

Scales = dict[str, dict[str, torch.Tensor]]  # role -> modality -> s [in]


class MASLearnLinear(nn.Module):
    """Differentiable stand-in for one linear during learning: Eq. 13 with the STE, rows routed by modality."""

    def __init__(self, W: torch.Tensor, bias: torch.Tensor | None, scheme: QuantScheme, router: ModalityRouter,
                 scales: dict[str, torch.Tensor] | None, modalities: tuple[str, ...]):
        super().__init__()
        self.register_buffer("W", W.detach().float())  # [out, in]
        self.register_buffer("b", None if bias is None else bias.detach().float())
        self.scheme = scheme
        self.router = router
        self.scales = scales  # modality -> nn.Parameter s [in] (shared objects when tied / uniform); None: down
        self.path_names = (DEFAULT_PATH,) + tuple(m for m in modalities if m != DEFAULT_PATH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        n = xf[..., 0].numel()
        index = self.router.partition(self.path_names, n, x.device)
        scales = self.scales or {m: None for m in self.path_names}
        return core.mas_linear(xf, index, scales, self.W, self.b, self.scheme, ste=True).to(x.dtype)


class MASQuant(Method):
    id = "masquant"

    def __init__(self, cfg: MASQuantConfig | None = None):
        super().__init__(cfg if cfg is not None else MASQuantConfig())
        # a composed DictConfig works too (attribute access only); MASQuantConfig validated it already
        self.deploy = Deploy(self.cfg.deploy)

    # --- plugin interface -------------------------------------------------------------------------
    def check(self, scheme: QuantScheme, modalities: tuple[str, ...]) -> None:
        if scheme.is_dense:
            raise MethodConfigError("method=masquant with quant=fp16 quantizes nothing; use method=dense")
        bad = [m for m in modalities if m not in KNOWN_MODALITIES]
        if bad:
            raise MethodConfigError(f"method=masquant: unknown modalities {bad}; valid: {list(KNOWN_MODALITIES)}")
        if not any(m != "text" for m in modalities):
            log.warning("method=masquant with text only: MAS reduces to smoothing with text scales, CMC adds nothing")

    def collect(self, ctx: QuantContext):
        """Per-layer, per-input-group, per-modality absmax of the FP model (cached by ``ctx``)."""
        return ctx.input_stats(with_cov=False)

    def apply(self, ctx: QuantContext, stats) -> dict:
        cfg = self.cfg
        if ctx.calib is None:
            raise MethodConfigError("method=masquant needs calibration data (calib.n_samples > 0)")
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        modalities = ("text",) + tuple(m for m in ctx.modalities if m != "text")
        use_cmc = self.deploy == Deploy.cmc
        report: dict = {"masquant/deploy": Deploy(cfg.deploy).value, "masquant/learn": cfg.learn, "masquant/uniform": cfg.uniform}
        fp_in = q_in = ctx.calib
        layers = ctx.adapter.decoder_layers()
        ranks: list[int] = []
        missing_warned: set[str] = set()
        for i, layer in enumerate(layers):
            t0 = time.perf_counter()
            active = self._active_modalities(stats[i], modalities, missing_warned)
            cov_groups = {ROLE_TO_GROUP[r] for r in cfg.cmc.roles} if (use_cmc and cfg.cmc.whiten) else set()
            fp_out, covs = self._fp_pass(ctx, layer, fp_in, active, cov_groups)
            linears = ctx.adapter.linears(layer)
            scales = self.init_scales(stats[i], linears, active)
            if cfg.learn and cfg.epochs > 0:
                before, after = self._learn_layer(ctx, i, layer, linears, scales, q_in, fp_out, active)
                report[f"masquant/loss_before/layer_{i}"] = before
                report[f"masquant/loss_after/layer_{i}"] = after
            ranks += self._deploy_layer(ctx, layer, linears, scales, covs, active)
            del covs
            q_in = advance(layer, q_in, ctx.device, ctx.router)
            fp_in = fp_out
            report[f"masquant/time_s/layer_{i}"] = time.perf_counter() - t0
        if use_cmc:
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

    @torch.no_grad()
    def _fp_pass(self, ctx, layer, fp_in: LayerInputs, active, cov_groups) -> tuple[LayerInputs, dict]:
        """FP outputs (targets, next FP inputs) and raw Gram matrices C = Σ xᵀx per (group, non-text modality)."""
        covs: dict[str, dict[str, torch.Tensor]] = {}
        handles = []
        current: dict = {}
        linears = ctx.adapter.linears(layer)
        nontext = [m for m in active if m != "text"]
        for group in cov_groups if nontext else ():
            lin = linears[INPUT_GROUPS[group][0]]
            covs[group] = {m: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64, device=ctx.device)
                           for m in nontext}

            def hook(module, args, group=group):
                x = args[0].reshape(-1, args[0].shape[-1])
                for m in nontext:
                    mask = current["masks"].get(m)
                    if mask is None:
                        continue
                    xm = x[mask.reshape(-1).to(x.device)].double()
                    if xm.shape[0]:
                        covs[group][m] += xm.T @ xm

            handles.append(lin.register_forward_pre_hook(hook))
        try:
            out = LayerInputs(offload=fp_in.offload)
            for s in fp_in:
                current["masks"] = s.masks
                h = _layer_forward(layer, layer_sample_on(s, ctx.device))
                out.samples.append(LayerSample(h.to(fp_in.offload), s.kwargs, s.masks))
        finally:
            for h in handles:
                h.remove()
        return out, covs

    def init_scales(self, layer_stats, linears: dict[str, nn.Module], active) -> Scales:
        """Spec §3 step 2 for q, o, up (k, v copy q; gate copies up); ``uniform`` uses all-token statistics."""
        cfg = self.cfg
        base: dict[str, dict[str, torch.Tensor]] = {}
        for role in ("q", "o", "up"):
            group = ROLE_TO_GROUP[role]
            w_absmax = core.weight_input_absmax(linears[role].weight)
            if cfg.uniform:
                s = core.smooth_factors(layer_stats[group]["all"].absmax, w_absmax, cfg.alpha)
                base[role] = {m: s for m in active}
            else:
                base[role] = {m: core.smooth_factors(layer_stats[group][m].absmax, w_absmax, cfg.alpha) for m in active}
        return {role: {m: s.clone() for m, s in base[INIT_ROLES[role]].items()} for role in SMOOTHED_ROLES}

    def _learn_layer(self, ctx, layer_idx, layer, linears, scales: Scales, q_in: LayerInputs, fp_out: LayerInputs,
                     active) -> tuple[float, float]:
        """OmniQuant-style block-wise learning of the scales (Eq. 13-14); updates ``scales`` in place."""
        cfg = self.cfg
        device = ctx.device
        params = self._make_params(scales, active, device)
        router = ModalityRouter()
        originals = dict(linears)
        frozen = [(p, p.requires_grad) for p in layer.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        for role, lin in linears.items():
            ctx.adapter.set_linear(layer, role, MASLearnLinear(lin.weight, lin.bias, ctx.scheme, router,
                                                               params.get(role), active))
        n = len(q_in) if cfg.n_learn_samples is None else min(cfg.n_learn_samples, len(q_in))
        lambdas = {"text": cfg.lambda_text, "vision": cfg.lambda_vision, "audio": cfg.lambda_audio}
        unique = list({id(p): p for per_m in params.values() for p in per_m.values()}.values())

        def sample_loss(k: int) -> torch.Tensor:
            s_in = layer_sample_on(q_in.samples[k], device)
            router.set_masks(s_in.masks)
            y = _layer_forward(layer, s_in)
            target = fp_out.samples[k].hidden.to(device)
            return core.weighted_mae(y.float(), target.float(), s_in.masks, lambdas)

        def mean_loss() -> float:
            with torch.no_grad():
                for p in unique:
                    core.truncate_scales_(p.data, cfg.scale_floor)
                return sum(float(sample_loss(k)) for k in range(n)) / max(n, 1)

        try:
            before = mean_loss()
            opt = torch.optim.AdamW(unique, lr=cfg.lr, weight_decay=0.0)
            bar = tqdm(total=cfg.epochs * n, desc=f"masquant layer {layer_idx}", leave=False)
            with torch.enable_grad():
                for _ in range(cfg.epochs):
                    for k in range(n):
                        for p in unique:
                            core.truncate_scales_(p.data, cfg.scale_floor)
                        loss = sample_loss(k)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        loss = loss.detach()
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss.item():.4g}")
            bar.close()
            after = mean_loss()
        finally:
            for role, lin in originals.items():
                ctx.adapter.set_linear(layer, role, lin)
            for p, flag in frozen:
                p.requires_grad_(flag)
        for role, per_m in params.items():
            for m, p in per_m.items():
                scales[role][m] = p.detach().clone()
        log.info("masquant layer %d: block loss %.4g -> %.4g", layer_idx, before, after)
        return before, after

    def _make_params(self, scales: Scales, active, device) -> dict[str, dict[str, nn.Parameter]]:
        """Trainable fp32 scales; ``tie_scales`` shares k, v with q and gate with up, ``uniform`` shares modalities."""
        cfg = self.cfg
        params: dict[str, dict[str, nn.Parameter]] = {}
        for role in SMOOTHED_ROLES:
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

    @torch.no_grad()
    def _deploy_layer(self, ctx, layer, linears, scales: Scales, covs, active) -> list[int]:
        """Replace the layer's seven linears by QuantLinears (MAS paths, CMC low-rank branches); returns ranks."""
        cfg = self.cfg
        scheme = ctx.scheme
        ranks = []
        for role, lin in linears.items():
            W = lin.weight.data.float()  # [out, in]
            dtype = lin.weight.dtype
            bias = None if lin.bias is None else lin.bias.data
            s = scales.get(role)
            if s is None:  # down_proj: quantized, not smoothed
                paths: dict[str, ModalityPath] = {}
                W_q = quantize_weight(W, scheme)
            else:
                s = {m: v.to(W.device).float() for m, v in s.items()}
                W_q = quantize_weight(core.smooth_weight(W, s["text"]), scheme)
                paths = {"text": ModalityPath(smooth=s["text"].to(dtype))}
                for m in active:
                    if m == "text":
                        continue
                    if self.deploy == Deploy.per_modality_weights:
                        W_m = quantize_weight(core.smooth_weight(W, s[m]), scheme)
                        paths[m] = ModalityPath(smooth=s[m].to(dtype), weight=W_m.to(dtype))
                    elif role in cfg.cmc.roles:
                        L1, L2 = self.cmc_factors(W, s[m], W_q, covs.get(ROLE_TO_GROUP[role], {}).get(m), scheme)
                        ranks.append(L1.shape[1])
                        paths[m] = ModalityPath(smooth=s[m].to(dtype), L1=L1.to(dtype), L2=L2.to(dtype))
                    else:
                        paths[m] = ModalityPath(smooth=s[m].to(dtype))
            if s is None and self.deploy == Deploy.cmc and role in cfg.cmc.roles:
                for m in active:
                    if m != "text":
                        ones = torch.ones(W.shape[1], device=W.device)
                        L1, L2 = self.cmc_factors(W, ones, W_q, covs.get(ROLE_TO_GROUP[role], {}).get(m), scheme)
                        ranks.append(L1.shape[1])
                        paths[m] = ModalityPath(L1=L1.to(dtype), L2=L2.to(dtype))
            ctx.adapter.set_linear(layer, role, QuantLinear(W_q.to(dtype), bias, scheme, ctx.router, paths))
        return ranks

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
        L1, L2 = core.whitened_low_rank(dW, T, T_inv, r)
        return L1.float(), L2.float()


def _layer_forward(layer: nn.Module, sample: LayerSample) -> torch.Tensor:
    out = layer(sample.hidden, **sample.kwargs)
    return out[0] if isinstance(out, tuple) else out
