"""The engine: the one loop every method runs in (the method supplies the maths through its hooks).

:func:`quantize_model_` checks what the method needs, runs its whole-model transform and preparation, then walks
each stack the method quantizes (the vision encoder first when asked, then the decoder), block by block: the
walk gives the block's inputs, streams and statistics; the method's ``plan_block`` transforms the block and says
what it deploys; the engine deploys it through the one deploy path, times it, shows progress and writes the
report (``<method>/<name>/layer_<i>``; ``<method>/vision_<name>/block_<i>`` for the vision encoder).

Every block is deployed, also under ``quant=fp16`` (a sparsifier alone, a KV-cache quantizer alone, an invariance
check): a :class:`~masquant.quant.linear.QuantLinear` of a dense scheme computes in full precision, so one path
serves every case.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from tqdm.auto import tqdm

from masquant.engine.context import DECODER
from masquant.engine.deploy import PathsFn, TransformFn, WeightFn, deploy_block_
from masquant.engine.weights import BlockWeights
from masquant.errors import MethodConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Walk:
    """What a method needs from the walk over a stack's blocks."""

    fp_stream: bool = True  # the FP model's block outputs (targets; statistics are observed in this pass)
    quantized_stream: bool = False  # the outputs of the blocks as deployed so far (GPTQ, learning, measurements)
    # the quantized stream with the deployed blocks' activation quantizers on (False: weights only; the engine sets
    # it for quant.gptq_true_sequential, official GPTQ's stream)
    quantized_activations: bool = True
    stats: bool = True  # each block's FP input statistics in ``step.stats`` (cached)


@dataclass
class BlockPlan:
    """What a method deploys for one block, and what it reports about it."""

    weight_for: WeightFn | None = None  # (role, linear) -> the weight to deploy; None: the linear's own, rounded
    paths_for: PathsFn | None = None  # (role, linear, W_q) -> per-modality paths
    input_transform_for: TransformFn | None = None  # (role, linear) -> module before activation quantization
    weights: BlockWeights | None = None  # weights rounded by masquant.engine.weights (their GPTQ cost is reported)
    report: dict[str, Any] = field(default_factory=dict)  # {name: value} -> "<method>/<name>/layer_<i>"


@dataclass
class _Visit:
    """A block visited without a walk (round to nearest: no calibration data)."""

    stack: Any
    index: int
    block: Any
    device: Any = None

    @property
    def layer(self):
        return self.block


def report_key(method_id: str, stack, name: str, index: int | None = None) -> str:
    """``<method>/<stack prefix><name>[/<unit>_<index>]``, e.g. ``awq/alpha/attn_in/layer_3``."""
    key = f"{method_id}/{stack.report_prefix}{name}"
    return key if index is None else f"{key}/{stack.unit}_{index}"


def quantize_model_(method, ctx) -> dict:
    """Quantize ``ctx.model`` in place with ``method``; returns the report (written with the results)."""
    method.check_weight_options(ctx.scheme)
    if method.requires_calibration(ctx.scheme):
        try:
            ctx.require_calibration()
        except MethodConfigError as err:
            raise MethodConfigError(f"method={method.id}: {err}") from None
    t0 = time.perf_counter()
    transform = method.transform_model_(ctx)
    if transform is not None:
        ctx.cache_key = {**ctx.cache_key, "transform": transform}
        ctx.invalidate()
    t1 = time.perf_counter()
    walk_ctx = method.prepare(ctx) or ctx
    t2 = time.perf_counter()
    report: dict[str, Any] = {}
    for name in method.stacks(ctx):
        report.update(quantize_stack_(method, walk_ctx, name))
        if name != DECODER:  # what comes after it now sees the quantized stack: capture and key anew
            for c in {id(ctx): ctx, id(walk_ctx): walk_ctx}.values():
                c.cache_key = {**c.cache_key, f"{name}_quantized": repr(ctx.scheme)}
                c.invalidate()
    report.update(method.finish(ctx) or {})
    t3 = time.perf_counter()
    report.update({"time/transform_s": t1 - t0, "time/collect_s": t2 - t1, "time/apply_s": t3 - t2})
    return report


def quantize_stack_(method, ctx, name: str) -> dict:
    """One stack, block by block: plan (the method), deploy, measure (the method), time, report."""
    stack = ctx.stack(name)
    walk = method.walk(ctx, stack)
    if walk is not None and ctx.scheme.gptq_true_sequential and walk.quantized_stream:
        walk = replace(walk, quantized_activations=False)
    desc = method.id if name == DECODER else f"{method.id} {name}"
    if walk is None:
        steps = (_Visit(stack, i, b) for i, b in enumerate(tqdm(stack.blocks, desc=desc, leave=False)))
    else:
        steps = ctx.walk(name, fp_stream=walk.fp_stream, quantized_stream=walk.quantized_stream, stats=walk.stats,
                         fp_observers=lambda step: method.observers(ctx, step), desc=desc,
                         quantized_activations=walk.quantized_activations)
    report: dict[str, Any] = {}
    linears, gptq_seconds = 0, []
    for step in steps:
        t0 = time.perf_counter()
        plan = method.plan_block(ctx, step)
        weight_for = plan.weight_for if plan.weight_for is not None else (
            plan.weights.weight_for if plan.weights is not None else None)
        linears += deploy_block_(ctx, step.block, weight_for, plan.paths_for, plan.input_transform_for, stack)
        entries = {**plan.report, **(method.after_deploy(ctx, step, plan) or {})}
        if plan.weights is not None and plan.weights.seconds > 0:
            gptq_seconds.append(plan.weights.seconds)
            entries["gptq_loss"] = sum(plan.weights.gptq_loss.values())
        for key, value in entries.items():
            report[report_key(method.id, stack, key, step.index)] = value
        report[report_key(method.id, stack, "time_s", step.index)] = time.perf_counter() - t0
        scalars = {k: round(v, 4) if isinstance(v, float) else v for k, v in entries.items()
                   if isinstance(v, (int, float, str, bool))}
        log.debug("%s %s %s %d: %s", method.id, stack.name, stack.unit, step.index, scalars)
    report[f"quant/{stack.report_prefix}linears"] = linears
    if gptq_seconds:
        report[report_key(method.id, stack, f"gptq_s_per_{stack.unit}")] = sum(gptq_seconds) / len(gptq_seconds)
        report[report_key(method.id, stack, "gptq_s_total")] = sum(gptq_seconds)
    return report
