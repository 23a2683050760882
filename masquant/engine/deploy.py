"""The one deploy path: a block's linears become :class:`QuantLinear` s, decoder and vision encoder alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from masquant.adapters.stack import BlockStack
from masquant.quant.linear import ModalityPath, QuantLinear
from masquant.quant.quantizer import quantize_weight_grid, weight_global_scale


@dataclass
class DeployWeight:
    """The weight a linear deploys: FP (quantized by the scheme at deploy) or already quantized (e.g. GPTQ).

    An already quantized weight may carry its grid (``scale``, ``zero`` [out, n_groups], ``g_idx`` [in]: see
    :class:`~masquant.quant.linear.QuantLinear`); one without it deploys and evaluates, but cannot be exported."""

    W: torch.Tensor  # [out, in]
    quantized: bool = False
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None  # NVFP4's per-tensor global scale g [1]


WeightFn = Callable[[str, nn.Module], "DeployWeight | torch.Tensor | None"]
PathsFn = Callable[[str, nn.Module, torch.Tensor], "dict[str, ModalityPath]"]
TransformFn = Callable[[str, nn.Module], "nn.Module | None"]


@torch.no_grad()
def deploy_block_(ctx, block: nn.Module, weight_for: WeightFn | None = None, paths_for: PathsFn | None = None,
                  input_transform_for: TransformFn | None = None, stack: BlockStack | str = "decoder") -> int:
    """Replace the linears of ``block`` (a block of ``stack``) by :class:`QuantLinear` s; returns their number.

    ``weight_for(role, linear)`` gives the shared weight (default, or None: the linear's own, quantized by the
    scheme; a :class:`DeployWeight` with ``quantized=True`` is used as is). ``paths_for(role, linear, W_q)`` adds
    per-modality :class:`ModalityPath` s. ``input_transform_for(role, linear)`` gives a module applied to the
    input before activation quantization (an online Hadamard); by default a linear keeps its own
    ``input_transform`` (a rotated model's online Hadamard, whose other half is folded into the weight).
    """
    stack = ctx.stack(stack) if isinstance(stack, str) else stack
    router = ctx.router if stack.routed else None
    n = 0
    for role, linear in stack.linears(block).items():
        spec = weight_for(role, linear) if weight_for is not None else None
        if spec is None:
            spec = DeployWeight(linear.weight.data)
        elif torch.is_tensor(spec):
            spec = DeployWeight(spec)
        dtype = linear.weight.dtype
        scale, zero, g_idx, global_scale = spec.scale, spec.zero, spec.g_idx, spec.global_scale
        if spec.quantized or not ctx.scheme.quantize_weights:
            W_q = spec.W
        else:
            W_q, scale, zero = quantize_weight_grid(spec.W.float(), ctx.scheme)
            global_scale = weight_global_scale(spec.W, ctx.scheme)
        W_q = W_q.to(dtype)
        paths = paths_for(role, linear, W_q) if paths_for is not None else {}
        if input_transform_for is not None:
            transform = input_transform_for(role, linear)
        else:
            transform = getattr(linear, "input_transform", None)
        bias = None if linear.bias is None else linear.bias.data
        grid = {} if scale is None else dict(weight_scale=scale.float(), weight_g_idx=g_idx,
                                              weight_zero=None if zero is None else zero.float(),
                                              weight_global_scale=global_scale)
        stack.set_linear(block, role, QuantLinear(W_q, bias, ctx.scheme, router, paths, transform, **grid))
        n += 1
    return n
