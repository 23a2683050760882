"""One fake-quantized linear that routes tokens by modality.

Every method deploys through :class:`QuantLinear`. A linear owns one shared (fake-)quantized weight
and a set of :class:`ModalityPath` s. A path may carry a smoothing vector s_m (the input is divided by
it), its own weight (MAS without CMC), a low-rank branch L1 L2 applied to the *unquantized* smoothed
input (CMC), and a static activation scale (MQuant's MSQ). Tokens are routed by the masks held in a
shared :class:`ModalityRouter`; each path only sees its own rows, so routing costs one matmul's worth
of work in total, never a full matmul per modality.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from masquant.quant.quantizer import quantize_activation
from masquant.quant.scheme import QuantScheme

DEFAULT_PATH = "text"


class ModalityRouter:
    """Per-token modality masks of the forward pass in flight, shared by all QuantLinears of a model.

    ``mask_fn(input_ids) -> {modality: bool[B, T]}`` comes from the model adapter. Masks are set by a
    forward pre-hook on the model (see :func:`attach_router`) or directly by layer-wise code.
    """

    def __init__(self, mask_fn: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None):
        self.mask_fn = mask_fn
        self._masks: dict[str, torch.Tensor] | None = None
        self._partitions: dict[tuple, dict[str, torch.Tensor]] = {}
        self.enabled = True

    @property
    def masks(self) -> dict[str, torch.Tensor] | None:
        return self._masks

    def set_masks(self, masks: dict[str, torch.Tensor] | None) -> None:
        self._masks = None if masks is None else {k: v.reshape(-1).bool() for k, v in masks.items()}
        self._partitions = {}

    def set_from_input_ids(self, input_ids: torch.Tensor | None) -> None:
        if input_ids is None or self.mask_fn is None:
            self.set_masks(None)
        else:
            self.set_masks(self.mask_fn(input_ids))

    def partition(self, path_names: tuple[str, ...], n_tokens: int, device) -> dict[str, torch.Tensor] | None:
        """Flat token indices per path; tokens of modalities without a path go to the default path.

        Returns None when every token takes the default path (text-only input, decoding).
        """
        if not self.enabled or self._masks is None:
            return None
        key = (path_names, n_tokens, str(device))
        if key in self._partitions:
            return self._partitions[key]
        any_mask = next(iter(self._masks.values()))
        if any_mask.numel() != n_tokens:
            raise RuntimeError(
                f"modality masks cover {any_mask.numel()} tokens but the linear received {n_tokens}: "
                "the model was called with inputs the router did not see (pass input_ids, not inputs_embeds)"
            )
        routed = torch.zeros(n_tokens, dtype=torch.bool, device=any_mask.device)
        parts: dict[str, torch.Tensor] = {}
        for name in path_names:
            if name == DEFAULT_PATH or name not in self._masks:
                continue
            mask = self._masks[name] & ~routed
            routed |= mask
            if mask.any():
                parts[name] = mask.nonzero().squeeze(1).to(device)
        result = None
        if parts:
            parts[DEFAULT_PATH] = (~routed).nonzero().squeeze(1).to(device)
            result = parts
        self._partitions[key] = result
        return result


def attach_router(model: nn.Module, router: ModalityRouter):
    """Set the router's masks from ``input_ids`` at every call of the top-level model."""

    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and torch.is_tensor(args[0]) and not torch.is_floating_point(args[0]):
            input_ids = args[0]
        router.set_from_input_ids(input_ids)
        return None

    return model.register_forward_pre_hook(hook, with_kwargs=True)


class ModalityPath(nn.Module):
    """What one modality's tokens see: Y = Qa(X / s) W_m + (X / s) L1 L2."""

    def __init__(
        self,
        smooth: torch.Tensor | None = None,  # s_m [in]
        weight: torch.Tensor | None = None,  # W_m [out, in], already fake-quantized
        L1: torch.Tensor | None = None,  # [in, r]
        L2: torch.Tensor | None = None,  # [r, out]
        act_scale: torch.Tensor | None = None,  # static per-tensor activation scale
    ):
        super().__init__()
        if (L1 is None) != (L2 is None):
            raise ValueError("a low-rank branch needs both L1 and L2")
        self.register_buffer("smooth", smooth)
        self.register_buffer("weight", weight)
        self.register_buffer("L1", L1)
        self.register_buffer("L2", L2)
        self.register_buffer("act_scale", act_scale)

    @property
    def rank(self) -> int:
        return 0 if self.L1 is None else self.L1.shape[1]


def scatter_rows(n_rows: int, parts: dict[str, torch.Tensor], rows_fn) -> torch.Tensor:
    """Y [n_rows, out] with Y[idx] = rows_fn(name, idx) for each part {name: flat row indices}.

    The routing step of every modality-aware linear (deployed and during learning); autograd flows
    through it (out-of-place ``index_copy``).
    """
    Y = None
    for name, idx in parts.items():
        if idx.numel() == 0:
            continue
        y = rows_fn(name, idx)
        if Y is None:
            Y = y.new_zeros(n_rows, y.shape[-1])
        Y = Y.index_copy(0, idx, y)
    if Y is None:
        raise ValueError("scatter_rows: every part is empty")
    return Y


class QuantLinear(nn.Module):
    """Fake-quantized linear with per-modality paths and one shared quantized weight.

    ``input_transform`` (a module, e.g. an online Hadamard) is applied to the input before the paths,
    i.e. before smoothing and activation quantization.

    The shared weight's integer grid, when the deploy path knows it, is kept beside it: ``weight_scale`` and
    ``weight_zero`` [out, n_groups] (zero: asymmetric grids only) over the groups of
    :func:`~masquant.quant.grid.group_slices`, or over the groups ``weight_g_idx`` [in] assigns (GPTQ's act
    order). ``weight`` = (codes - zero) · scale for integer codes: what an export writes (``masquant.export``). A
    float format's codes are its element values; NVFP4 also keeps its global scale ``weight_global_scale`` [1] (the
    scale of a block is then an E4M3 value divided by it).
    """

    def __init__(
        self,
        weight: torch.Tensor,  # [out, in], already fake-quantized (or FP for dense)
        bias: torch.Tensor | None,
        scheme: QuantScheme,
        router: ModalityRouter | None = None,
        paths: dict[str, ModalityPath] | None = None,
        input_transform: nn.Module | None = None,
        weight_scale: torch.Tensor | None = None,
        weight_zero: torch.Tensor | None = None,
        weight_g_idx: torch.Tensor | None = None,
        weight_global_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        self.input_transform = input_transform
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_zero", weight_zero)
        self.register_buffer("weight_g_idx", weight_g_idx)
        self.register_buffer("weight_global_scale", weight_global_scale)
        self.scheme = scheme
        self.router = router
        self.paths = nn.ModuleDict(paths or {})
        if DEFAULT_PATH not in self.paths:
            self.paths[DEFAULT_PATH] = ModalityPath()
        self.lowrank_tokens = 0  # rows that went through a low-rank branch (cost accounting, tests)
        self.quantize_inputs = True  # False inside activations_unquantized (weights only, e.g. GPTQ's stream)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme.tag}, paths={list(self.paths)}"

    def _path_forward(self, x: torch.Tensor, path: ModalityPath) -> torch.Tensor:
        xs = x / path.smooth if path.smooth is not None else x
        xq = quantize_activation(xs, self.scheme, static_scale=path.act_scale) if self.quantize_inputs else xs
        W = path.weight if path.weight is not None else self.weight
        y = F.linear(xq, W, self.bias)
        if path.L1 is not None:
            y = y + (xs @ path.L1) @ path.L2
            self.lowrank_tokens += xs.shape[0] if xs.dim() == 2 else xs[..., 0].numel()
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        default = self.paths[DEFAULT_PATH]
        if len(self.paths) == 1 or self.router is None:
            return self._path_forward(x, default)
        lead = x.shape[:-1]
        n_tokens = lead.numel()
        parts = self.router.partition(tuple(self.paths.keys()), n_tokens, x.device)
        if parts is None:
            return self._path_forward(x, default)
        x2 = x.reshape(n_tokens, x.shape[-1])
        out = scatter_rows(n_tokens, parts, lambda name, idx: self._path_forward(x2[idx], self.paths[name]))
        return out.reshape(*lead, self.out_features)




@contextmanager
def activations_unquantized(module: nn.Module) -> Iterator[None]:
    """Within the block, every :class:`QuantLinear` under ``module`` leaves its inputs unquantized (its weight, paths
    and low-rank branches unchanged): the weight-only model GPTQ's official code calibrates on."""
    linears = [m for m in module.modules() if isinstance(m, QuantLinear)]
    saved = [q.quantize_inputs for q in linears]
    for q in linears:
        q.quantize_inputs = False
    try:
        yield
    finally:
        for q, flag in zip(linears, saved):
            q.quantize_inputs = flag
