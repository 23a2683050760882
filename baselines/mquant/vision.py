"""MQuant's vision-encoder quantization (``method.quantize_vision=true``), after the encoder's own rotation.

The encoder was transformed by :func:`masquant.transforms.rotation.rotate_vision_encoder_` (LayerNorm → RMSNorm
where needed, norm fusion, a random Hadamard of its width, a Hadamard per head between V and the attention's
output linear, an online Hadamard on the MLP's output linear). Its
blocks are then walked one at a time on the calibration images (:class:`masquant.calibration.walker.BlockWalker`,
fed by the model's own forward up to the encoder's exit norm); every linear of a block becomes a
:class:`QuantLinear` with

- weights as ``quant.w_quantizer`` says: rtn (``quant.w_mse_clip`` honoured) or gptq, whose Hessians come from
  the walk's quantized stream (the blocks before already quantized, activations included);
- one static per-tensor activation scale per input group (the encoder has only visual tokens: no MSQ), from the
  FP stream's abs-max over the calibration images, clip ``quant.a_clip_ratio``; an online Hadamard stays in
  front of the quantizer, as in the decoder.

The merger (the projector into the language model) stays in 16 bits, as lm_head does.
"""

from __future__ import annotations

import logging
import time

import torch

from baselines.mquant.core import msq_scale
from masquant.calibration.stats import RunningInputStats
from masquant.calibration.walker import BlockStep, BlockWalker, capture_block_inputs
from masquant.methods.base import MethodConfigError, QuantContext
from masquant.methods.weights import LayerHessians, gptq_options, rtn_weight
from masquant.quant.gptq import gptq_quantize
from masquant.quant.linear import DEFAULT_PATH, ModalityPath, QuantLinear
from masquant.quant.quantizer import quantize_weight

log = logging.getLogger(__name__)


def _round_weight(W: torch.Tensor, scheme, H: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """W [out, in] rounded as the scheme says (GPTQ with H, else to nearest); (W_q float32, GPTQ loss or 0)."""
    if H is not None:
        Wq, info = gptq_quantize(W.float(), H.to(W.device), **gptq_options(scheme))
        return Wq, float(info["loss"])
    if scheme.w_mse_clip:
        return rtn_weight(W.float(), scheme), 0.0
    return quantize_weight(W.float(), scheme), 0.0


@torch.no_grad()
def quantize_vision_encoder_(ctx: QuantContext) -> dict:
    """Deploy every linear of the (rotated) vision encoder's blocks; returns the report entries."""
    adapter, scheme = ctx.adapter, ctx.scheme
    spec = adapter.vision_encoder
    if ctx.calib is None or len(ctx.calib) == 0:
        raise MethodConfigError("method.quantize_vision=true calibrates the encoder on calibration images "
                                "(calib.n_samples > 0)")
    blocks = adapter.vision_blocks()
    records = capture_block_inputs(ctx.model, blocks, adapter.vision_part(spec.exit_norm), ctx.calib.batches,
                                   ctx.device, ctx.offload, desc="capture vision-encoder inputs")
    if not records:
        raise MethodConfigError("method.quantize_vision=true: no calibration prompt reached the vision encoder "
                                "(the calibration set has no images)")
    groups = spec.input_groups()
    role_group = {role: group for group, roles in groups.items() for role in roles}
    gptq = scheme.w_quantizer == "gptq"
    observed: list[RunningInputStats] = []

    def fp_observers(step: BlockStep):
        linears = adapter.vision_input_group_linears(step.block)
        observed.append(RunningInputStats({g: lin.in_features for g, lin in linears.items()}, ()))
        return linears, [observed[-1]]

    walker = BlockWalker(blocks, records, ctx.device, quantized_stream=gptq, fp_observers=fp_observers,
                         offload=ctx.offload, desc="mquant vision encoder")
    n, gptq_s, losses, scales = 0, 0.0, [], []
    for step in walker:
        stats = observed[step.index].stats
        linears = adapter.vision_input_group_linears(step.block)
        hessians = None
        if gptq:
            t0 = time.perf_counter()
            hessians = LayerHessians({g: lin.in_features for g, lin in linears.items()})
            step.run("quant", linears, [hessians], keep=False)
            gptq_s += time.perf_counter() - t0
        block_loss = 0.0
        for role, linear in adapter.vision_linears(step.block).items():
            group = role_group[role]
            t0 = time.perf_counter()
            Wq, loss = _round_weight(linear.weight.data, scheme, None if hessians is None else hessians.H(group))
            if gptq:
                gptq_s += time.perf_counter() - t0
            block_loss += loss
            scale = msq_scale(stats[group]["all"].absmax, scheme.a_bits, scheme.a_clip_ratio, scheme.int_range.value)
            scales.append(float(scale))
            bias = None if linear.bias is None else linear.bias.data
            new = QuantLinear(Wq.to(linear.weight.dtype), bias, scheme, router=None,
                              paths={DEFAULT_PATH: ModalityPath(act_scale=scale.to(linear.weight.device))},
                              input_transform=getattr(linear, "input_transform", None))
            adapter.set_vision_linear(step.block, role, new)
            n += 1
        losses.append(block_loss)
    report = {"quant/vision_linears": n, "mquant/vision_blocks": len(blocks),
              "mquant/vision_calib_images": len(records),
              "mquant/vision_calib_patches": sum(int(r.hidden.shape[0]) for r in records),
              "mquant/vision_act_scale_max": max(scales)}
    if gptq:
        report["mquant/vision_gptq_s"] = gptq_s
        report.update({f"mquant/vision_gptq_loss/block_{i}": loss for i, loss in enumerate(losses)})
    log.info("MQuant vision encoder: %d linears in %d blocks quantized on %d images", n, len(blocks), len(records))
    return report
