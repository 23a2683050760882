"""CPU time of MASQuant's block-wise learning per decoder layer, ours against the official code, on the testbed.

    python benchmarks/masquant_speed.py                                   # ours; prints the recorded anchor
    python benchmarks/masquant_speed.py --official-repo PATH              # ours and the official code, same inputs
    python benchmarks/masquant_speed.py --official-repo PATH --profile    # + where the time goes (cProfile)

``PATH`` is a checkout of https://github.com/alibaba/EfficientAI (its ``masquant/`` folder is imported; nothing of
it is copied here). One process: the testbed (``model=testbed_vl``) is loaded, its calibration prompts captured, and
the decoder walked with MASQuant as the pipeline walks it. At each layer of ``--layers``, from the same state:

- **ours**: ``MASQuant._learn_layer`` (AdamW on s_text / s_vision, Eq. 13-14), timed with ``time.process_time``;
- **official**: the official ``QuantQwenDecoderLayerV2`` built from the same HF decoder layer (bf16, as the official
  code loads models), its ``QuantLinear.forward_mas_train`` (split scales), ``UniformAffineQuantizer``,
  ``truncate_scale``, ``reuse_scale``, ``let_parameters``, ``get_mas_parameters``, ``FlexibleScaler`` (backward +
  AdamW step) and ``check_gradient``, driven by a loop of this script that follows ``quantize/masquant.py``'s
  training loop line for line (timed the same way). Its inputs are ours: the quantized stream at the layer's
  input, the FP layer's outputs as targets, the modality masks, the position embeddings, the per-modality abs-max
  statistics for the initialisation (the official ``act_scales`` file holds the same statistic).

Then both learned scale sets are deployed the same way (MAS with one quantized weight per modality, Eq. 13 with
ε = 0: ``deploy=per_modality_weights``) and scored by the same code on the same inputs: the block loss (Eq. 14
with the run's λ) and the SQNR per modality of the layer output against the FP output. Layers between the
timed ones are deployed with MASQuant's initial scales (no learning), so the walk stays quick.

What is not the official code (the adapter, all in this file): the shims the official modules need to import
under this environment's transformers (``apply_multimodal_rotary_pos_emb``: transformers 5 already applies the
M-RoPE sections in the rotary embedding, so the shim is the plain rotation; ``Qwen2RMSNorm``: the Qwen2.5-VL norm;
``termcolor``: only used for log colours); the ``args`` namespace (the values ``main.py`` builds for
``--wbits 4 --abits 8 --symmetric --group_size 0 --let --loss_multi_modal_mae_alpha``); the initialisation of
q/o/up from the statistics (the 8 lines inlined in ``masquant()``; k, v, gate then come from ``reuse_scale``); the
loop and the loss expression (inlined in ``masquant()``, which cannot be called on one layer).

Every figure is printed with the date, the load average and the torch thread count. CPU time is the figure to
compare on a shared machine (the process's own CPU seconds, all threads).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import datetime
import os
import pstats
import sys
import time
import types
from statistics import median

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

# The anchor as recorded in docs/methods/masquant.md ("Speed"), printed when --official-repo is not given.
RECORDED_ANCHOR = """\
official learning, testbed W4A8, 16 prompts, 2 epochs, lr 0.05, 1 thread, bf16 (median of 3, CPU s per layer):
  layer 0: 6.41 s, layer 6: 5.98 s, layer 12: 6.36 s (2026-12-03, load average 5.5-6.2 on a shared 2-core machine;
  ours beside it (647543b): 1.24, 1.26, 1.14 s; ratios 0.19, 0.21, 0.18; a second run at load 4.3-5.6: 0.19, 0.22,
  0.17). Command:
  python benchmarks/masquant_speed.py --official-repo PATH --layers 0,6,12 --repeat 3 --profile
  (docs/methods/masquant.md, "Speed of the learning (CPU)")"""

ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj"}
INIT_FROM = {"self_attn.q_proj": "qkv", "self_attn.o_proj": "o", "mlp.up_proj": "gate_up"}  # the official `pairs`


def env_line() -> str:
    load = os.getloadavg()
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')}, load average {load[0]:.2f} {load[1]:.2f} "
            f"{load[2]:.2f}, torch threads {torch.get_num_threads()}")


# --- the testbed and our learning -------------------------------------------------------------------------------
def build(opts):
    from hydra import compose, initialize_config_dir

    from masquant.adapters.registry import get_adapter
    from masquant.app import pipeline
    from masquant.app.config import register_configs
    from masquant.app.main import CONF_DIR
    from masquant.engine.context import QuantContext
    from masquant.methods.registry import build_method
    from masquant.quant.linear import ModalityRouter, attach_router
    from masquant.sources import loading

    overrides = ["model=testbed_vl", "method=masquant", f"quant={opts.quant}", f"calib.n_samples={opts.samples}",
                 f"method.epochs={opts.epochs}", f"method.lr={opts.lr}", f"method.lambda_vision={opts.lambda_vision}",
                 *opts.overrides]
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    spec = pipeline.resolve(cfg)
    model, processor = pipeline.load_model(spec)
    adapter = get_adapter(model)
    calib, _, _ = loading.calibration_sets(cfg, processor, adapter)
    router = ModalityRouter(lambda ids: adapter.modality_masks(ids, video_as=spec.video_as))
    attach_router(model, router)
    method = build_method(spec.method_cfg)
    ctx = QuantContext(model, adapter, spec.scheme, router, spec.device, spec.modalities, calib)
    return overrides, ctx, method


def profile_rows(prof: cProfile.Profile, wanted: dict[str, tuple[str, str]]) -> dict[str, float]:
    """Cumulative seconds of the functions in ``wanted`` ({label: (file suffix, function name)}); of several
    functions of one name in one file (``run``, ``forward``), the outermost (the largest)."""
    stats = pstats.Stats(prof).stats
    out = {}
    for label, (suffix, name) in wanted.items():
        out[label] = max([v[3] for (f, _, fn), v in stats.items() if fn == name and f.endswith(suffix)], default=0.0)
    return out


OURS_PROFILE = {
    "block forward": ("walker.py", "run"),
    "  Eq. 13 linears (routing included)": ("core.py", "mas_linear"),
    "    weight fake-quant, fused (fwd)": ("core.py", "_smoothed_weight_quant_"),
    "    weight fake-quant, composed (fwd)": ("quantizer.py", "quantize_weight"),
    "    activation fake-quant (fwd)": ("quantizer.py", "quantize_activation"),
    "    linear matmuls, float32 (fwd)": ("", "<built-in method torch._C._nn.linear>"),
    "    linear matmuls, int8 codes (fwd)": ("", "<built-in method torch._int_mm>"),
    "loss (Eq. 14)": ("core.py", "weighted_mae"),
    "backward": ("_tensor.py", "backward"),
    "  fused Eq. 13 linears (bwd)": ("core.py", "backward"),
    "    matmuls dL/dX, dL/dW (bwd)": ("", "<built-in method torch.mm>"),
    "    weight fake-quant, dL/ds (bwd)": ("core.py", "_smoothed_weight_grad_s"),
    "  activation fake-quant (bwd)": ("grid.py", "backward"),
    "optimizer (AdamW)": ("adam.py", "step"),
    "scale truncation": ("core.py", "truncate_scales_"),
}
OFFICIAL_PROFILE = {
    "block forward": ("int_qwen_vl_layer.py", "forward"),
    "  fake-quant, weights and activations (fwd)": ("quantizer.py", "forward"),
    "  linear matmuls (fwd)": ("", "<built-in method torch._C._nn.linear>"),
    "loss + backward + AdamW (FlexibleScaler)": ("utils.py", "__call__"),
    "  backward": ("_tensor.py", "backward"),
    "  optimizer (AdamW)": ("adam.py", "step"),
    "check_gradient": ("masquant.py", "check_gradient"),
    "scale truncation": ("utils.py", "truncate_scale"),
}


def print_profile(title: str, rows: dict[str, float], total: float) -> None:
    print(f"    {title} (cProfile, cumulative wall s under the profiler; total {total:.2f} s)")
    for label, sec in rows.items():
        print(f"      {label:<46} {sec:7.2f} s  {100 * sec / total if total else 0:5.1f} %")


# --- evaluation: both scale sets deployed the same way ----------------------------------------------------------
@torch.no_grad()
def deployed_quality(ctx, method, step, scales, active) -> dict[str, float]:
    """Eq. 14 loss (the run's λ) and SQNR per modality of the layer with ``scales`` deployed as MAS with one
    quantized weight per modality (Eq. 13, ε = 0), on the quantized stream against the FP outputs."""
    from masquant.methods.masquant import core
    from masquant.methods.masquant.method import MASLearnLinear
    from masquant.quant.linear import ModalityRouter

    layer = step.layer
    linears = ctx.adapter.linears(layer)
    router = ModalityRouter()
    for role, lin in linears.items():
        s = None if role not in scales else {m: scales[role][m].float().to(step.device) for m in active}
        ctx.adapter.set_linear(layer, role, MASLearnLinear(lin.weight, lin.bias, ctx.scheme, router, s, active, 0.0))
    loss, energy = 0.0, {}
    try:
        for k in range(step.n_samples):
            s_in = step.sample("quant", k)
            router.set_masks(s_in.masks)
            y = s_in.run(layer).double()
            t = step.fp_outputs[k].to(y.device).double()
            loss += float(core.weighted_mae(y, t, s_in.masks, method.cfg.lambdas()))
            for m, mask in {"all": None, **s_in.masks}.items():
                rows = slice(None) if mask is None else mask.reshape(-1)
                a, b = t.reshape(-1, t.shape[-1])[rows], y.reshape(-1, y.shape[-1])[rows]
                e = energy.setdefault(m, [0.0, 0.0])
                e[0] += float(a.pow(2).sum())
                e[1] += float((a - b).pow(2).sum())
    finally:
        for role, lin in linears.items():
            ctx.adapter.set_linear(layer, role, lin)
    out = {"loss": loss / step.n_samples}
    for m, (sig, noise) in energy.items():
        if sig > 0 and noise > 0:
            out[f"sqnr_{m}"] = 10 * torch.log10(torch.tensor(sig / noise)).item()
    return out


# --- the official code --------------------------------------------------------------------------------------------
def import_official(repo: str):
    """The official modules, imported from a checkout (the repository root or its masquant/ folder)."""
    root = os.path.join(repo, "masquant") if os.path.isdir(os.path.join(repo, "masquant", "quantize")) else repo
    if not os.path.isfile(os.path.join(root, "quantize", "int_linear.py")):
        raise SystemExit(f"--official-repo {repo}: no masquant/quantize/int_linear.py there")
    os.environ["inference_mode"] = "split_scales"  # every official script; read when a QuantLinear is built
    sys.modules.setdefault("termcolor", types.SimpleNamespace(colored=lambda text, *a, **k: text))
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as hf_vl
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    if not hasattr(hf_vl, "apply_multimodal_rotary_pos_emb"):  # transformers 5: cos/sin come M-RoPE-sectioned
        hf_vl.apply_multimodal_rotary_pos_emb = (
            lambda q, k, cos, sin, mrope_section, unsqueeze_dim=1: apply_rotary_pos_emb(q, k, cos, sin,
                                                                                       unsqueeze_dim=unsqueeze_dim))
    if not hasattr(hf_vl, "Qwen2RMSNorm"):
        hf_vl.Qwen2RMSNorm = hf_vl.Qwen2_5_VLRMSNorm
    sys.path.insert(0, root)
    with contextlib.redirect_stdout(sys.stderr):
        import quantize.masquant as off_masquant  # noqa: F401 (check_gradient)
        import utils as off_utils
        from models.int_qwen_vl_layer import QuantQwenDecoderLayerV2
        from quantize import utils as off_qutils
        from quantize.int_linear import QuantLinear
    return types.SimpleNamespace(layer_cls=QuantQwenDecoderLayerV2, QuantLinear=QuantLinear, qutils=off_qutils,
                                 utils=off_utils, check_gradient=off_masquant.check_gradient, root=root)


def official_args(scheme, opts):
    """The namespace main.py builds (``--wbits W --abits A --symmetric --group_size 0 --let``)."""
    act = {"n_bits": scheme.a_bits, "per_channel_axes": [], "symmetric": True, "dynamic_method": "per_token"}
    asym = {**act, "symmetric": False}
    return types.SimpleNamespace(
        mode="train", let=True, lwc=False, alpha=opts.alpha, epochs=opts.epochs, let_lr=opts.lr, wd=0.0,
        nsamples=opts.samples, batch_size=1, deactive_amp=True, aug_loss=False,
        weight_quant_params={"n_bits": scheme.w_bits, "per_channel_axes": [0], "symmetric": True,
                             "dynamic_method": "per_channel", "group_size": 0, "lwc": False,
                             "disable_zero_point": False},
        act_quant_params=act, q_quant_params=asym, k_quant_params=asym, v_quant_params=asym,
        p_quant_params={"n_bits": 16, "metric": "fix0to1"})


def official_learn(off, ctx, step, opts, lambda_vision: float, profile: bool):
    """The official learning of one layer on our inputs; returns the learned scales, CPU s and the loss per epoch."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[opts.official_dtype]
    text_cfg = ctx.model.config.get_text_config()
    config = copy.copy(text_cfg)
    if getattr(config, "rope_scaling", None) is None:
        config.rope_scaling = dict(getattr(text_cfg, "rope_parameters", {}) or {})
    args = official_args(ctx.scheme, opts)
    layer = copy.deepcopy(step.layer).to(dtype)
    with contextlib.redirect_stdout(sys.stderr):
        qlayer = off.layer_cls(config, layer, args, layer_idx=step.index)
        off.qutils.set_quant_state(qlayer, weight_quant=True, act_quant=True)
        qlayer.let = True
        # the initialisation inlined in masquant(): q, o, up from the abs-max statistics (k, v, gate: reuse_scale)
        for name, module in qlayer.named_modules():
            if isinstance(module, off.QuantLinear) and name in INIT_FROM:
                stats = step.stats[INIT_FROM[name]]

                def act(m):
                    st = stats[m] if m in stats else None
                    r = st.absmax if st is not None and st.count > 0 else torch.zeros(module.in_features)
                    return r.to(dtype=dtype).clamp(min=1e-5)

                weight = module.weight.abs().max(dim=0)[0].clamp(min=1e-5)
                init = {key: (act(m).pow(args.alpha) / weight.pow(1 - args.alpha)).clamp(min=1e-5)
                        for key, m in (("all_in_one", "all"), ("text", "text"), ("audio", "audio"),
                                       ("vision", "vision"))}
                with torch.no_grad():
                    for key, value in init.items():
                        getattr(module, f"{key}_smooth_scale").data.copy_(value)
        off.qutils.reuse_scale(qlayer, args)
    n = step.n_samples
    samples = []
    for k in range(n):
        s = step.sample("quant", k)
        x = s.hidden.to(dtype)
        x = x.unsqueeze(0) if x.dim() == 2 else x
        image = s.masks["vision"].reshape(1, -1, 1).expand(1, x.shape[1], x.shape[2]).to(x.device)
        text = torch.ones_like(image) & ~image
        cos, sin = s.call.kwargs["position_embeddings"]
        samples.append((x, s.call.kwargs.get("attention_mask"), (cos.to(dtype), sin.to(dtype)), (None, image, text),
                        step.fp_outputs[k].to(x.device).to(dtype)))
    prof = cProfile.Profile() if profile else None
    epoch_losses = []
    c0 = time.process_time()
    if prof:
        prof.enable()
    with contextlib.redirect_stdout(sys.stderr):
        optimizer = torch.optim.AdamW([{"params": off.qutils.let_parameters(qlayer, False), "lr": args.let_lr}],
                                      weight_decay=args.wd)
        loss_scaler = off.utils.FlexibleScaler(dtype=torch.bfloat16)
        for _ in range(args.epochs):
            losses = []
            for j in range(n):
                x, attn, pos, mmm, target = samples[j]
                off.qutils.truncate_scale(qlayer, args)
                quant_out = qlayer(x, attention_mask=attn, position_embeddings=pos, multi_modal_mask=mmm)[0]
                # the loss_multi_modal_mae_alpha branch (audio_mask None, no gradient file): text 1, vision 0.5
                audio_mask, image_mask, text_mask = mmm
                quant_diff = (quant_out - target).abs()
                text_diff = quant_diff * text_mask
                total_mask = text_mask.sum()
                vision_diff = quant_diff * image_mask
                total_mask += image_mask.sum()
                loss = (text_diff.sum() + lambda_vision * vision_diff.sum()) / total_mask
                losses.append(loss.detach().cpu())
                optimizer.zero_grad()
                loss_scaler(loss, optimizer, parameters=off.qutils.get_mas_parameters(qlayer, False))
                off.check_gradient(qlayer)
            epoch_losses.append(float(torch.stack(losses).float().mean()))
    if prof:
        prof.disable()
    cpu = time.process_time() - c0
    learned = {}
    for role, name in ROLES.items():
        module = qlayer.get_submodule(name)
        learned[role] = {"text": module.text_smooth_scale.detach().float(),
                         "vision": module.vision_smooth_scale.detach().float()}
    return learned, cpu, epoch_losses, prof


# --- the walk ------------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official-repo", help="a checkout of alibaba/EfficientAI (its masquant/ folder is imported)")
    p.add_argument("--layers", default="0,6", help="decoder layers to time (comma-separated)")
    p.add_argument("--quant", default="w4a8")
    p.add_argument("--samples", type=int, default=16, help="calibration prompts (calib.n_samples)")
    p.add_argument("--epochs", type=int, default=2, help="learning epochs (the official scripts: 2)")
    p.add_argument("--lr", type=float, default=5e-2, help="AdamW learning rate (official --let_lr 5e-2)")
    p.add_argument("--lambda-vision", type=float, default=0.5,
                   help="vision loss weight in both (the official loss_multi_modal_mae_alpha: 0.5)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="torch threads for both")
    p.add_argument("--official-dtype", choices=("bf16", "fp32"), default="bf16",
                   help="dtype of the official layer (the official code loads models in bf16)")
    p.add_argument("--repeat", type=int, default=1,
                   help="time each learning this many times (same start each time); the median is reported")
    p.add_argument("--profile", action="store_true", help="also run both under cProfile and print the breakdown")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for our run (e.g. method.learn_eps=0)")
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    layers = sorted({int(i) for i in opts.layers.split(",")})

    off = import_official(opts.official_repo) if opts.official_repo else None
    overrides, ctx, method = build(opts)
    cfg = method.cfg
    print(f"# masquant_speed: {' '.join(overrides)}; layers {layers}; {env_line()}")
    if off is not None:
        print(f"# official code from {off.root} (dtype {opts.official_dtype}, inference_mode=split_scales)")
    method.prepare(ctx)
    stack = ctx.stack("decoder")
    from masquant.engine.deploy import deploy_block_

    learn = method._learn_layer
    rows = []
    for step in ctx.walk("decoder", quantized_stream=True, stats=True, fp_observers=lambda s: method.observers(ctx, s)):
        if step.index in layers:
            active = method._active_modalities(step.stats, method.modalities, method.missing_warned)
            linears = ctx.adapter.linears(step.layer)
            init = method.init_scales(step.stats, linears, active)
            cpus = []
            for _ in range(opts.repeat):
                scales = copy.deepcopy(init)
                c0 = time.process_time()
                losses = learn(ctx, step, linears, scales, active)
                cpus.append(time.process_time() - c0)
            ours_cpu = median(cpus)
            row = {"layer": step.index, "ours_cpu": ours_cpu, "ours_cpus": cpus, "ours_loss": losses, "env": env_line(),
                   "ours": deployed_quality(ctx, method, step, scales, active),
                   "init": deployed_quality(ctx, method, step, init, active)}
            if opts.profile:
                prof = cProfile.Profile()
                prof.enable()
                t0 = time.perf_counter()
                learn(ctx, step, linears, copy.deepcopy(init), active)
                prof.disable()
                row["ours_profile"] = (profile_rows(prof, OURS_PROFILE), time.perf_counter() - t0)
            if off is not None:
                off_cpus = []
                for _ in range(opts.repeat):
                    learned, off_cpu, off_losses, _ = official_learn(off, ctx, step, opts, cfg.lambda_vision, False)
                    off_cpus.append(off_cpu)
                off_cpu = median(off_cpus)
                row.update(official_cpus=off_cpus)
                row.update(official_cpu=off_cpu, official_loss=off_losses,
                           official=deployed_quality(ctx, method, step, learned, active), env_official=env_line())
                if opts.profile:
                    t0 = time.perf_counter()
                    _, _, _, prof = official_learn(off, ctx, step, opts, cfg.lambda_vision, True)
                    row["official_profile"] = (profile_rows(prof, OFFICIAL_PROFILE), time.perf_counter() - t0)
            rows.append(row)
            report(row)
            method._learn_layer = lambda c, s, lin, sc, act, _learned=scales, _losses=losses: (
                sc.update(_learned), _losses)[1]
            plan = method.plan_block(ctx, step)
            method._learn_layer = learn
        else:
            cfg.learn = False
            plan = method.plan_block(ctx, step)
            cfg.learn = True
        deploy_block_(ctx, step.block, plan.weight_for, plan.paths_for, plan.input_transform_for, stack)
        method.after_deploy(ctx, step, plan)
        if step.index >= layers[-1]:
            break
    summary(rows, off is not None)


def fmt_q(q: dict) -> str:
    return (f"block loss {q['loss']:.4f}, SQNR all {q.get('sqnr_all', float('nan')):.2f} / text "
            f"{q.get('sqnr_text', float('nan')):.2f} / vision {q.get('sqnr_vision', float('nan')):.2f} dB")


def fmt_all(values) -> str:
    return "" if len(values) < 2 else "(median of " + " ".join(f"{v:.2f}" for v in values) + ") "


def report(row) -> None:
    print(f"\nlayer {row['layer']}:")
    print(f"  ours      CPU {row['ours_cpu']:6.2f} s {fmt_all(row['ours_cpus'])}  learning loss {row['ours_loss'][0]:.4f} -> "
          f"{row['ours_loss'][1]:.4f}   deployed: {fmt_q(row['ours'])}   [{row['env']}]")
    if "official_cpu" in row:
        ol = row["official_loss"]
        print(f"  official  CPU {row['official_cpu']:6.2f} s {fmt_all(row['official_cpus'])}  learning loss {ol[0]:.4f} -> {ol[-1]:.4f}   "
              f"deployed: {fmt_q(row['official'])}   [{row['env_official']}]")
        print(f"  ratio ours / official CPU: {row['ours_cpu'] / row['official_cpu']:.3f}")
    print(f"  (initial scales, not learned: {fmt_q(row['init'])})")
    if "ours_profile" in row:
        print_profile("ours", *row["ours_profile"])
    if "official_profile" in row:
        print_profile("official", *row["official_profile"])
    sys.stdout.flush()


def summary(rows, with_official: bool) -> None:
    if not rows:
        return
    ours = sum(r["ours_cpu"] for r in rows) / len(rows)
    print(f"\nmean CPU per layer over {len(rows)} layer(s): ours {ours:.2f} s", end="")
    if with_official:
        off = sum(r["official_cpu"] for r in rows) / len(rows)
        print(f", official {off:.2f} s, ratio {ours / off:.3f}  [{env_line()}]")
    else:
        print(f"  [{env_line()}]\nofficial anchor (not run; pass --official-repo PATH): {RECORDED_ANCHOR}")


if __name__ == "__main__":
    main()
