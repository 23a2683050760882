"""QuaRot's rotations (Ashkboos et al., 2024), one function per step, driven only through the model adapter.

Every step is function-preserving in exact arithmetic (the tests check the FP logits on every adapter
that supports rotation); all folds are computed in float64 and cast back to each weight's dtype.

1. :func:`fuse_norms_`: each RMSNorm's scale (w, or 1 + w for Gemma's kind) is folded into the linears
   it feeds (input norm → q, k, v; MLP norm → gate, up; final norm → lm_head, untied from the embeddings
   first) and the norm becomes a weightless :class:`WeightlessRMSNorm`. RMSNorm(x Q) = RMSNorm(x) Q for
   orthogonal Q once the norm has no per-channel scale: this is what lets the residual stream rotate.
2. :func:`rotate_residual_`: the residual stream is rotated by Q (random Hadamard H·diag(±1)/√n, float64):
   every writer into it (embeddings W Q; o_proj and down_proj Qᵀ W and their biases; the encoders' projector
   outputs, which the model merges into inputs_embeds; Qwen3-VL's DeepStack mergers) and every reader of it
   (q, k, v, gate, up W Q with their biases unchanged; lm_head W Q).
3. :func:`rotate_ov_`: a Hadamard per head between v_proj's output and o_proj's input (v's rows and bias,
   o's input columns; one H for every head, so grouped-query attention is fine). With ``o_rotation="full"``
   (official QuaRot) :func:`rotate_o_input_full_` then makes o's input a Hadamard of its whole width: the
   cross-head factor H_heads ⊗ I is folded into o's weight and applied online (x (H_heads ⊗ I_hd), reshaped per
   head); a head count with no Hadamard matrix (the testbed's 9) undoes the per-head H online and applies a full
   Hadamard of the width instead (the same function, more work).
4. :func:`rotate_down_input_`: an online Hadamard on down_proj's input: one half folded into the weight
   (W M), the other applied to the activations at run time (``input_transform`` of
   :class:`OnlineRotatedLinear`, kept by the deploy path as the QuantLinear's input transform).

5. :func:`rotate_vision_encoder_` (MQuant's encoder quantization): the vision encoder's own stream, declared by
   the adapter (``vision_encoder``), gets the same treatment with its own Q of its width: LayerNorm → RMSNorm
   where the encoder has LayerNorm (below), norm fusion (:func:`fuse_vision_norms_`), the residual rotation
   (:func:`rotate_vision_residual_`: patch embedding and block outputs write Qᵀ W, block inputs and the merger's
   first linear read W Q, each merged token's columns), a Hadamard per head between V (a fused qkv's third
   chunk) and the attention's output linear (:func:`rotate_heads_`), and an online Hadamard on the MLP's
   output linear (MQuant's released code does these steps on Qwen2-VL's tower).
   After the LayerNorm conversion the stream has no component along the Hadamard's constant column, so the
   rotated writers' row 0 is zero (harmless for quantization: a per-channel grid of one zero row).

Widths with no Hadamard matrix (n ≠ K·2^m, e.g. Qwen2.5-VL-7B's MLP 18944 = 74·256, or 148 = 74·2):
the online down_proj rotation uses ``mode`` of :func:`masquant.transforms.hadamard.rotation_for_width`,
**pad by default**: the input is zero-padded to the next valid size p (148 → 156, 18944 → 19968) and
rotated there, so down_proj's weight becomes [out, p]. That module's recommendation holds here: a
Hadamard works by spreading an outlier over the whole width, and the block-diagonal alternative only mixes
within a block (18944: blocks of 512, an outlier shrinks by √512 instead of √19968; 148: blocks of 4,
almost no mixing), for 5.4 % more work in one linear (5.4 % at 148 too). ``mode="block"`` stays available where
weight shapes must not change. The residual and per-head rotations must stay square (padding the residual
would change every norm's width), so they use a block-diagonal Hadamard when their width has no Hadamard
matrix (none of the supported models needs it: 576, 2048, 3584 and the head dims are all valid).

LayerNorm (SliceGPT's conversion, for encoders with LayerNorm; the supported decoders all use RMSNorm):
:func:`center_output_channels_` on every writer into a residual stream makes the stream zero-mean per
token, where LayerNorm(x) = x / rms(x) · w + b; :func:`fold_layernorm_` then moves w and b into the
consuming linears and leaves a weightless RMSNorm.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from masquant.adapters.norms import NormKind, norm_scale
from masquant.transforms.hadamard import (
    RotationPlan,
    block_hadamard_size,
    hadamard_matrix,
    hadamard_transform,
    is_hadamard_size,
    random_hadamard_matrix,
    rotation_for_width,
)

log = logging.getLogger(__name__)

ROTATION_VERSION = 2  # 2: random signs before the Hadamard (the seed had no effect); bump when a step changes what it computes (part of the statistics cache key)


class RotationMode(str, Enum):
    """How a width without a Hadamard matrix is rotated (see the module docstring)."""

    pad = "pad"  # zero-pad to the next Hadamard size (recommended)
    block = "block"  # block-diagonal Hadamard of the largest valid block dividing the width


class ORotation(str, Enum):
    """How o_proj's input is rotated (step 3 of the module docstring)."""

    full = "full"  # a Hadamard of o's whole input width: per head offline in V, across heads online (official QuaRot)
    per_head = "per_head"  # a Hadamard within each head only, all offline (MQuant's released code)


class RotationUnsupported(ValueError):
    """The model cannot be rotated exactly; the message says why."""


# --- modules ------------------------------------------------------------------------------------------
class WeightlessRMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps), in float32 as the HF RMSNorms; a norm whose scale was folded away."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        # contiguous as a LayerNorm's output is (SigLIP's stream is a transposed view; its connector views it)
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype).contiguous()

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class OnlineHadamard(nn.Module):
    """x -> x M with the fast transform (M of a :class:`RotationPlan`: [width, size], orthonormal rows)."""

    def __init__(self, plan: RotationPlan):
        super().__init__()
        self.plan = plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plan.apply(x)

    def extra_repr(self) -> str:
        p = self.plan
        return f"width={p.width}, size={p.size}, block={p.block}, mode={p.mode}"


class OnlineRotatedLinear(nn.Linear):
    """y = (x M) W'ᵀ + b with W' = W M folded offline, so y = x Wᵀ + b; M applied online (``input_transform``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_transform: nn.Module):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.input_transform = input_transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_transform(x), self.weight, self.bias)


class ResidualBasis(nn.Module):
    """How a transformed model's hidden states map back to the original model's, for fidelity comparisons.

    After :func:`rotate_residual_` the residual stream is h Q (h: the original's); after :func:`fuse_norms_`
    the final norm outputs x / rms(x) without its scale w (folded into lm_head). :meth:`to_reference` undoes
    both, so SQNR against an FP reference recorded before the transform stays meaningful. Kept on the language
    model as ``masquant_residual_basis`` (buffers, not saved with the weights).
    """

    ATTRIBUTE = "masquant_residual_basis"

    def __init__(self, hidden_size: int):
        super().__init__()
        self.register_buffer("Q", None, persistent=False)  # [n, n] float32, None = identity
        self.register_buffer("final_scale", None, persistent=False)  # [n] float32, None = ones
        self.hidden_size = hidden_size

    @classmethod
    def of(cls, adapter, create: bool = False) -> "ResidualBasis | None":
        lm = adapter.language_model()
        basis = getattr(lm, cls.ATTRIBUTE, None)
        if basis is None and create:
            basis = cls(adapter.text_config().hidden_size)
            setattr(lm, cls.ATTRIBUTE, basis)
        return basis

    def to_reference(self, h: torch.Tensor, final: bool = False) -> torch.Tensor:
        """h [..., n] in the transformed basis -> the original's (final: the final norm's output)."""
        out = h.float()
        if self.Q is not None:
            out = out @ self.Q.to(out.device).T
        if final and self.final_scale is not None:
            out = out * self.final_scale.to(out.device)
        return out


# --- small folds (float64, cast back) -------------------------------------------------------------------
def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


@torch.no_grad()
def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(device=param.device, dtype=param.dtype).contiguous()


def _tiled(v: torch.Tensor, width: int) -> torch.Tensor:
    """v [n] repeated to [width] (a linear reading k = width / n tokens concatenated, e.g. a patch merger)."""
    n = v.shape[-1]
    if width % n:
        raise ValueError(f"a reader of width {width} cannot read tokens of width {n}")
    return v.repeat(width // n)


@torch.no_grad()
def rotate_input_(linear: nn.Module, Q: torch.Tensor) -> None:
    """A reader of the rotated stream: W [out, n] -> W Q [out, n] (its input x Q gives x Wᵀ).

    A reader of k tokens concatenated (W [out, k·n]) takes Q on each token's columns: W -> W blockdiag(Q, ..., Q).
    """
    W = linear.weight.data
    n = Q.shape[0]
    if W.shape[1] % n:
        raise ValueError(f"a reader of width {W.shape[1]} cannot read a stream of width {n}")
    Wd = W.double().reshape(W.shape[0], W.shape[1] // n, n)
    _set(linear.weight, (Wd @ Q.to(W.device, torch.float64)).reshape(W.shape))


@torch.no_grad()
def rotate_output_(linear: nn.Module, Q: torch.Tensor) -> None:
    """A writer into the rotated stream: W [n, in] -> Qᵀ W, b [n] -> Qᵀ b (its output y becomes y Q).

    A convolution (a patch embedding, W [n, C, ...]) is the same map on its flattened input.
    """
    W = linear.weight.data
    Qd = Q.to(W.device, torch.float64)
    _set(linear.weight, (Qd.T @ W.double().reshape(W.shape[0], -1)).reshape(W.shape))
    if linear.bias is not None:
        _set(linear.bias, linear.bias.data.double() @ Qd)


@torch.no_grad()
def rotate_embedding_(embedding: nn.Module, Q: torch.Tensor, rows_per_chunk: int = 8192) -> None:
    """Embedding rows E [V, n] -> E Q, a chunk of rows at a time (no float64 copy of a large table)."""
    E = embedding.weight.data
    Qd = Q.to(E.device, torch.float64)
    for i in range(0, E.shape[0], rows_per_chunk):
        E[i : i + rows_per_chunk] = (E[i : i + rows_per_chunk].double() @ Qd).to(E.dtype)


@torch.no_grad()
def fold_scale_into_inputs_(linears: Iterable[nn.Module], scale: torch.Tensor) -> None:
    """W [out, n] -> W diag(scale) for each linear reading a norm's output (k tokens concatenated: scale tiled)."""
    for linear in linears:
        W = linear.weight.data
        _set(linear.weight, W.double() * _tiled(scale.to(W.device, torch.float64), W.shape[1])[None, :])


# --- 1. norm fusion -------------------------------------------------------------------------------------
def _norm_pairs(adapter, layer) -> list:
    return adapter.norm_fold_pairs(layer)


@torch.no_grad()
def fuse_norms_(adapter) -> int:
    """Fold every decoder RMSNorm's scale (and the final norm's) into the linears it feeds; the norms become
    :class:`WeightlessRMSNorm` s. lm_head is untied from the embeddings first. Returns the norms fused."""
    kind = adapter.norm_kind
    if kind == NormKind.layer:
        raise RotationUnsupported(
            f"{type(adapter).__name__}: LayerNorm decoders need the residual made zero-mean first "
            "(center_output_channels_ on every residual writer, then fold_layernorm_); not wired for decoders")
    n = 0
    for layer in adapter.decoder_layers():
        lin = adapter.linears(layer)
        for pair in _norm_pairs(adapter, layer):
            norm = adapter.norm(layer, pair.producer)
            if isinstance(norm, WeightlessRMSNorm):
                continue
            fold_scale_into_inputs_([lin[r] for r in pair.consumers], norm_scale(norm, kind))
            adapter.replace_norm_(layer, pair.producer, WeightlessRMSNorm(_eps(norm)))
            n += 1
    final = adapter.final_norm()
    if not isinstance(final, WeightlessRMSNorm):
        adapter.untie_lm_head_()
        scale = norm_scale(final, kind)
        fold_scale_into_inputs_([adapter.lm_head()], scale)
        ResidualBasis.of(adapter, create=True).final_scale = scale.detach().float().cpu()
        adapter.replace_final_norm_(WeightlessRMSNorm(_eps(final)))
        n += 1
    return n


def norms_fused(adapter) -> bool:
    layers = adapter.decoder_layers()
    return isinstance(adapter.final_norm(), WeightlessRMSNorm) and all(
        isinstance(adapter.norm(layer, p.producer), WeightlessRMSNorm) for layer in layers
        for p in _norm_pairs(adapter, layer))


# --- 2. residual rotation -------------------------------------------------------------------------------
def check_residual_rotation(adapter) -> None:
    """Raise :class:`RotationUnsupported` (with the adapter's reason) when the residual cannot rotate exactly."""
    reason = type(adapter).residual_rotation_refusal()
    if reason:
        raise RotationUnsupported(reason)


def residual_rotation(n: int, seed: int) -> torch.Tensor:
    """Q [n, n] float64: QuaRot's random Hadamard H·diag(±1)/√n; block-diagonal where n has no Hadamard matrix."""
    if is_hadamard_size(n):
        return random_hadamard_matrix(n, seed)
    log.warning("hidden size %d has no Hadamard matrix: block-diagonal residual rotation (blocks of %d)",
                n, block_hadamard_size(n))
    return rotation_for_width(n, "block", seed).matrix()


@torch.no_grad()
def rotate_residual_(adapter, Q: torch.Tensor) -> None:
    """Rotate the residual stream by Q [n, n]: writers W -> Qᵀ W (biases too), readers W -> W Q.

    Needs fused norms (a per-channel norm scale does not commute with Q) and an adapter that supports it.
    """
    check_residual_rotation(adapter)
    if not norms_fused(adapter):
        raise RotationUnsupported("rotate_residual_ needs fuse_norms_ first (norm scales do not commute with Q)")
    adapter.untie_lm_head_()
    rotate_embedding_(adapter.embed_tokens(), Q)
    for linear in adapter.encoder_output_linears():
        rotate_output_(linear, Q)
    for layer in adapter.decoder_layers():
        lin = adapter.linears(layer)
        for role in ("q", "k", "v", "gate", "up"):
            rotate_input_(lin[role], Q)
        for role in ("o", "down"):
            rotate_output_(lin[role], Q)
    rotate_input_(adapter.lm_head(), Q)
    basis = ResidualBasis.of(adapter, create=True)
    Qf = Q.detach().to("cpu", torch.float64)
    basis.Q = (Qf if basis.Q is None else basis.Q.double() @ Qf).float()


# --- 3. per-head Hadamard between v and o ---------------------------------------------------------------
def head_rotation(head_dim: int) -> torch.Tensor:
    """H_hd / √hd [hd, hd] float64 (plain Hadamard, as QuaRot); block-diagonal where hd has none."""
    mode = "pad" if is_hadamard_size(head_dim) else "block"
    return rotation_for_width(head_dim, mode).matrix()


@torch.no_grad()
def rotate_ov_(adapter, layer: nn.Module, H: torch.Tensor | None = None) -> None:
    """v's output per head v_h -> v_h H (rows and bias), o's input columns per head W_o[:, h] -> W_o[:, h] H."""
    hd = adapter.head_dim()
    lin = adapter.linears(layer)
    rotate_heads_(lin["v"], lin["o"], hd, head_rotation(hd) if H is None else H)


@torch.no_grad()
def rotate_heads_(v: nn.Module, o: nn.Module, hd: int, H: torch.Tensor, chunk: int = 0, chunks: int = 1) -> None:
    """V's rows per head v_h -> v_h H (and bias), o's input columns per head W_o[:, h] -> W_o[:, h] H [hd, hd].

    V is chunk ``chunk`` of ``chunks`` equal parts of v's output (a fused qkv linear: chunk 2 of 3)."""
    n = v.out_features // chunks
    rows = slice(chunk * n, (chunk + 1) * n)
    Hd = H.to(v.weight.device, torch.float64)
    Wv = v.weight.data.double()
    Wv[rows] = torch.einsum("ji,hjd->hid", Hd, Wv[rows].reshape(-1, hd, v.in_features)).reshape(n, v.in_features)
    _set(v.weight, Wv)  # [kv_heads, hd, D] per head above
    if v.bias is not None:
        b = v.bias.data.double()
        b[rows] = (b[rows].reshape(-1, hd) @ Hd).reshape(-1)
        _set(v.bias, b)
    Wo = o.weight.data.double().reshape(o.out_features, -1, hd)  # [D, heads, hd]
    _set(o.weight, (Wo @ H.to(o.weight.device, torch.float64)).reshape(o.out_features, o.in_features))


class CrossHeadHadamard(nn.Module):
    """o_proj's online transform after :func:`rotate_ov_` (its input already carries H_hd within each head).

    x [..., heads·hd] -> x (H_heads ⊗ I_hd) / √heads when ``heads`` has a Hadamard matrix (official QuaRot's online
    partial Hadamard: the per-head H_hd is in V already, so o's input ends up x_orig (H_heads ⊗ H_hd), a full
    Hadamard). Otherwise, for any head count: the per-head H_hd is undone and a full Hadamard of the width
    (``plan``, padded where the width has none) applied, x (I ⊗ H_hdᵀ) M."""

    def __init__(self, heads: int, head_dim: int, head_H: torch.Tensor, plan: RotationPlan | None):
        super().__init__()
        self.heads, self.head_dim, self.plan = heads, head_dim, plan
        self.register_buffer("head_H", head_H.float() if plan is not None else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = x.reshape(*lead, self.heads, self.head_dim)
        if self.plan is None:  # across heads: the Hadamard of size `heads` on the head axis
            y = hadamard_transform(h.transpose(-1, -2).contiguous(), n=self.heads).transpose(-1, -2)
            return y.reshape(*lead, self.heads * self.head_dim)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        undone = (h.to(work) @ self.head_H.to(x.device, work).T).to(x.dtype)
        return self.plan.apply(undone.reshape(*lead, self.heads * self.head_dim))

    def extra_repr(self) -> str:
        how = "across heads" if self.plan is None else f"undo per head, full width {self.plan.width}->{self.plan.size}"
        return f"heads={self.heads}, head_dim={self.head_dim}, {how}"


def cross_head_rotation(heads: int, head_dim: int, head_H: torch.Tensor, mode: str = "pad"):
    """(the online module, the matrix T [n, size] it computes, float64) of o_proj's full rotation after the
    per-head H_hd: x_r T = x_orig M_full (see :class:`CrossHeadHadamard`)."""
    n = heads * head_dim
    if is_hadamard_size(heads):
        T = torch.kron(hadamard_matrix(heads), torch.eye(head_dim, dtype=torch.float64)) / heads**0.5
        return CrossHeadHadamard(heads, head_dim, head_H, None), T
    plan = rotation_for_width(n, mode)
    undo = torch.block_diag(*[head_H.to(torch.float64).T] * heads)  # (I ⊗ H_hd)ᵀ
    return CrossHeadHadamard(heads, head_dim, head_H, plan), undo @ plan.matrix()


@torch.no_grad()
def rotate_o_input_full_(adapter, layer: nn.Module, head_H: torch.Tensor, mode: str = "pad") -> None:
    """After :func:`rotate_ov_`: o_proj -> :class:`OnlineRotatedLinear` with W_o T offline and T online
    (:func:`cross_head_rotation`), so o's input is a full Hadamard of the attention output, as official QuaRot."""
    o = adapter.linears(layer)["o"]
    if getattr(o, "input_transform", None) is not None:
        raise RotationUnsupported("o_proj already has an online rotation")
    hd = adapter.head_dim()
    online, T = cross_head_rotation(o.in_features // hd, hd, head_H, mode)
    W = (o.weight.data.double() @ T.to(o.weight.device)).to(o.weight.dtype)
    adapter.set_linear(layer, "o", OnlineRotatedLinear(W, None if o.bias is None else o.bias.data, online))


# --- 4. online Hadamard on down_proj's input ------------------------------------------------------------
@torch.no_grad()
def rotate_down_input_(adapter, layer: nn.Module, mode: str = "pad") -> RotationPlan:
    """down_proj -> :class:`OnlineRotatedLinear` (W M offline, x M online); returns the plan of M."""
    down = adapter.linears(layer)["down"]
    if getattr(down, "input_transform", None) is not None:
        raise RotationUnsupported("down_proj already has an online rotation")
    rotated, plan = online_rotated_(down, mode)
    adapter.set_linear(layer, "down", rotated)
    return plan


@torch.no_grad()
def online_rotated_(linear: nn.Module, mode: str = "pad") -> tuple[OnlineRotatedLinear, RotationPlan]:
    """The :class:`OnlineRotatedLinear` computing ``linear`` with a Hadamard M of its input width (W M offline,
    x M online), and M's plan."""
    plan = rotation_for_width(linear.in_features, mode)
    M = plan.matrix().to(linear.weight.device)  # [n, p]
    W = (linear.weight.data.double() @ M).to(linear.weight.dtype)
    return OnlineRotatedLinear(W, None if linear.bias is None else linear.bias.data, OnlineHadamard(plan)), plan


# --- all steps ------------------------------------------------------------------------------------------
@torch.no_grad()
def rotate_model_(adapter, *, seed: int = 0, mode: str = "pad", online_down: bool = True,
                  o_rotation: str = "per_head") -> dict:
    """QuaRot's offline transform: fuse norms, rotate the residual (Q), v→o per head, online Hadamard on down.

    ``o_rotation``: ``per_head`` keeps o_proj's input rotated within each head; ``full`` adds the online transform
    across heads (:func:`rotate_o_input_full_`), as official QuaRot.

    Returns the transform's identity (for the statistics cache key). Raises :class:`RotationUnsupported`
    before changing anything when the adapter cannot be rotated exactly.
    """
    mode = str(getattr(mode, "value", mode))
    o_rotation = ORotation(getattr(o_rotation, "value", o_rotation))
    check_residual_rotation(adapter)
    fuse_norms_(adapter)
    n = adapter.text_config().hidden_size
    rotate_residual_(adapter, residual_rotation(n, seed))
    H = head_rotation(adapter.head_dim())
    plans = []
    for layer in adapter.decoder_layers():
        rotate_ov_(adapter, layer, H)
        if o_rotation == ORotation.full:
            rotate_o_input_full_(adapter, layer, H, mode)
        if online_down:
            plans.append(rotate_down_input_(adapter, layer, mode))
    ident = {"rotation": "quarot", "version": ROTATION_VERSION, "seed": seed, "mode": mode, "online_down": online_down}
    if o_rotation == ORotation.full:  # (per head: the identity of earlier versions, so their caches stay valid)
        ident["o_rotation"] = o_rotation.value
    if plans:
        ident["down_width"] = [plans[0].width, plans[0].size]
    return ident


# --- the vision encoder's own rotation (MQuant) -------------------------------------------------------------
def check_vision_encoder(adapter) -> None:
    """Raise :class:`RotationUnsupported` (naming the adapter) when its vision encoder is not declared."""
    reason = adapter.vision_encoder_missing()
    if reason:
        raise RotationUnsupported(reason)


def _vision_norm_sites(adapter) -> list[tuple[nn.Module, str, list[nn.Module]]]:
    """(parent module, norm path in it, the linears reading the norm) for every norm on the encoder's stream."""
    spec = adapter.vision_encoder
    sites = []
    for block in adapter.vision_blocks():
        lin = adapter.vision_linears(block)
        sites += [(block, path, [lin[r] for r in roles]) for path, roles in spec.norm_feeds]
    sites.append((adapter.model, spec.exit_norm, [adapter.vision_part(spec.exit_linear)]))
    return sites


@torch.no_grad()
def fuse_vision_norms_(adapter) -> int:
    """Every norm on the vision encoder's stream becomes a :class:`WeightlessRMSNorm`, its scale (and bias) folded
    into the linears it feeds. LayerNorm encoders are converted first (SliceGPT / MQuant): every writer into the
    stream is centred (:func:`center_output_channels_`: patch embedding, attention and MLP outputs), so the stream
    is zero-mean per token and each LayerNorm is an RMSNorm with a scale and a bias (:func:`fold_layernorm_`).
    Returns the norms fused."""
    check_vision_encoder(adapter)
    spec = adapter.vision_encoder
    sites = [site for site in _vision_norm_sites(adapter)
             if not isinstance(site[0].get_submodule(site[1]), WeightlessRMSNorm)]
    if not sites:
        return 0
    if spec.norm_kind == NormKind.layer:
        for path in spec.entry:
            center_output_channels_(adapter.vision_part(path))
        for block in adapter.vision_blocks():
            lin = adapter.vision_linears(block)
            for role in spec.writers:
                center_output_channels_(lin[role])
    for parent, path, consumers in sites:
        norm = parent.get_submodule(path)
        if spec.norm_kind == NormKind.layer:
            new = fold_layernorm_(norm, consumers)
        else:
            fold_scale_into_inputs_(consumers, norm_scale(norm, spec.norm_kind))
            new = WeightlessRMSNorm(_eps(norm))
        adapter.replace_norm_(parent, path, new)
    return len(sites)


@torch.no_grad()
def rotate_vision_residual_(adapter, Q: torch.Tensor) -> None:
    """Rotate the vision encoder's stream by Q [n, n]: the patch embedding and the blocks' output linears write
    Qᵀ W (biases too), a position embedding E Q, the blocks' input linears and the merger's first linear (each
    merged token) read W Q."""
    check_vision_encoder(adapter)
    if not all(isinstance(parent.get_submodule(path), WeightlessRMSNorm) for parent, path, _ in _vision_norm_sites(adapter)):
        raise RotationUnsupported("rotate_vision_residual_ needs fuse_vision_norms_ first")
    spec = adapter.vision_encoder
    for path in spec.entry:
        module = adapter.vision_part(path)
        if isinstance(module, nn.Embedding):  # its rows are stream vectors: E Q
            rotate_embedding_(module, Q)
        else:
            rotate_output_(module, Q)
    for block in adapter.vision_blocks():
        lin = adapter.vision_linears(block)
        for _, roles in spec.norm_feeds:
            for role in roles:
                rotate_input_(lin[role], Q)
        for role in spec.writers:
            rotate_output_(lin[role], Q)
    rotate_input_(adapter.vision_part(spec.exit_linear), Q)


@torch.no_grad()
def rotate_vision_encoder_(adapter, *, seed: int = 0, mode: str = "pad", online_mlp: bool = True) -> dict:
    """MQuant's encoder transform: LayerNorm → RMSNorm where needed, norm fusion, the encoder's own residual
    rotation (random Hadamard of its width), a Hadamard per head between V and the attention's output linear
    (where the adapter declares ``values``), an online Hadamard on the MLP's output linear (fc2 / down_proj).
    The encoder's output (and so the model's) is unchanged in exact arithmetic. Returns the transform's identity."""
    mode = str(getattr(mode, "value", mode))
    check_vision_encoder(adapter)
    fused = fuse_vision_norms_(adapter)
    blocks = adapter.vision_blocks()
    first = adapter.vision_part(adapter.vision_encoder.entry[0])
    n = first.embedding_dim if isinstance(first, nn.Embedding) else first.weight.shape[0]
    rotate_vision_residual_(adapter, residual_rotation(n, seed))
    spec = adapter.vision_encoder
    hd = None
    if spec.values is not None:  # MQuant's per-head Hadamard between V and the attention's output linear
        role, chunk, chunks = spec.values
        hd = n // int(getattr(adapter.vision_module().config, spec.num_heads_attr))
        H = head_rotation(hd)
        for block in blocks:
            lin = adapter.vision_linears(block)
            rotate_heads_(lin[role], lin[spec.values_reader], hd, H, chunk, chunks)
    plans = []
    if online_mlp:
        for block in blocks:
            for role in adapter.vision_encoder.mlp_output:
                rotated, plan = online_rotated_(adapter.vision_linears(block)[role], mode)
                adapter.set_vision_linear(block, role, rotated)
                plans.append(plan)
    ident = {"rotation": "vision", "version": ROTATION_VERSION, "seed": seed, "mode": mode, "online_mlp": online_mlp,
             "width": n, "ov_head_dim": hd, "norms_fused": fused, "layernorm": adapter.vision_encoder.norm_kind == NormKind.layer}
    if plans:
        ident["mlp_width"] = [plans[0].width, plans[0].size]
    return ident


# --- LayerNorm -> RMSNorm (SliceGPT / MQuant's conversion) ----------------------------------------------
@torch.no_grad()
def center_output_channels_(module: nn.Module) -> None:
    """Make a residual writer's output zero-mean over its channels, for every input.

    Linear / Conv W [n, ...] -> W - mean over the n output channels, b -> b - mean(b); Embedding E [V, n] ->
    each row minus its mean. A stream written only by centred writers is zero-mean per token.
    """
    if isinstance(module, nn.Embedding):
        E = module.weight.data.double()
        _set(module.weight, E - E.mean(1, keepdim=True))
        return
    W = module.weight.data.double()
    _set(module.weight, W - W.mean(0, keepdim=True))
    if getattr(module, "bias", None) is not None:
        b = module.bias.data.double()
        _set(module.bias, b - b.mean())


@torch.no_grad()
def fold_layernorm_(norm: nn.LayerNorm, consumers: Iterable[nn.Linear]) -> WeightlessRMSNorm:
    """On a zero-mean stream LayerNorm(x) = x / rms(x) · w + b: W -> W diag(w), bias -> bias + W b for each
    consumer (k tokens concatenated: w and b tiled); returns the weightless RMSNorm to put in the norm's place
    (same eps)."""
    w = norm.weight.data.double() if norm.weight is not None else None
    b = norm.bias.data.double() if norm.bias is not None else None
    for linear in consumers:
        W = linear.weight.data.double()
        if b is not None:
            extra = W @ _tiled(b.to(W.device), W.shape[1])
            if linear.bias is None:
                linear.bias = nn.Parameter(extra.to(linear.weight.dtype), requires_grad=False)
            else:
                _set(linear.bias, linear.bias.data.double() + extra)
        if w is not None:
            _set(linear.weight, W * _tiled(w.to(W.device), W.shape[1])[None, :])
    return WeightlessRMSNorm(norm.eps)


__all__ = [
    "ROTATION_VERSION", "RotationMode", "ORotation", "RotationUnsupported", "CrossHeadHadamard", "cross_head_rotation",
    "rotate_o_input_full_", "ResidualBasis", "WeightlessRMSNorm", "OnlineHadamard", "OnlineRotatedLinear",
    "rotate_input_", "rotate_output_", "rotate_heads_", "rotate_embedding_", "fold_scale_into_inputs_", "fuse_norms_", "norms_fused",
    "check_residual_rotation", "residual_rotation", "rotate_residual_", "head_rotation", "rotate_ov_",
    "rotate_down_input_", "online_rotated_", "rotate_model_", "center_output_channels_", "fold_layernorm_",
    "check_vision_encoder", "fuse_vision_norms_", "rotate_vision_residual_", "rotate_vision_encoder_",
]
