"""Model adapters: the only code that knows Hugging Face model classes.

An adapter says where things are (decoder layers, linears by role, norms, encoders) and what they mean:
the norm's formula and the folds that are exact for it, the fold pairs of a layer (norm→q/k/v, v→o,
norm→gate/up, up→down), the attention and MLP blocks, what the model adds between decoder layers, how to
load a checkpoint folder and its processor, and its own tiny model. Methods never test ``model_type``.
Where declared (``vision_encoder``: a :class:`VisionEncoderSpec`), the vision encoder's blocks, norms, the
linears they feed and its residual stream's entry and exit, for transforms of the encoder itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from masquant.adapters import norms
from masquant.adapters.norms import NormKind
from masquant.adapters.stack import BlockStack

log = logging.getLogger(__name__)

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
# Linears that share one input: statistics are kept once per input group.
INPUT_GROUPS: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
ROLE_TO_GROUP = {role: group for group, roles in INPUT_GROUPS.items() for role in roles}
VIDEO_AS_CHOICES = ("vision", "text")
MODALITIES = ("text", "vision", "audio")


@dataclass(frozen=True)
class FoldPair:
    """A producer whose output is the input of ``consumers``: a smoothing vector s folds exactly as
    producer output ÷ s, consumer input columns × s. ``block`` is the block whose output the fold affects
    (the AWQ/MBQ search loss); ``input_group`` keys the consumers' input statistics."""

    name: str  # attn_in | v_o | mlp_in | up_down
    producer: str  # a norm's attribute path inside the layer, or a role
    consumers: tuple[str, ...]
    input_group: str
    block: str  # attn | mlp
    producer_is_norm: bool


@dataclass(frozen=True)
class VisionEncoderSpec:
    """A vision encoder's residual stream, declared as the decoder's is: what reads it, what writes it.

    The encoder is a stack of pre-norm blocks over one residual stream of width ``hidden_size``: in each block
    a norm feeds the attention's input linears, the attention's output linear adds into the stream, a norm
    feeds the MLP's input linears, the MLP's output linear adds into the stream. ``entry`` modules write the
    stream's first value (the patch embedding, a convolution or a linear with one output channel per stream
    channel, and a learned position embedding added to it, an Embedding whose rows are stream vectors);
    ``exit_norm`` reads the last block's output and ``exit_linear`` reads the exit norm's output (the
    merger/projector's first linear; it may read several tokens concatenated, in_features = k · width, each
    token's channels contiguous). ``entry``, ``exit_norm`` and ``exit_linear`` are paths from the model's root,
    ``blocks`` from the encoder (``path``), the others from a block. Nothing else may touch the stream (no
    class token, no norm applied to the stream itself).
    """

    path: str  # the encoder module, e.g. "model.visual"
    blocks: str  # its ModuleList of blocks, inside path
    norm_kind: NormKind  # rms or layer (LayerNorm: converted to RMSNorm before a rotation)
    linears: tuple[tuple[str, str], ...]  # (role, linear path inside a block), every linear of a block
    norm_feeds: tuple[tuple[str, tuple[str, ...]], ...]  # (norm path inside a block, roles reading its output)
    writers: tuple[str, ...]  # roles whose outputs are added to the stream (attention output, MLP output)
    mlp_output: tuple[str, ...]  # roles reading the MLP's hidden activation (MQuant's online Hadamard: fc2/down)
    entry: tuple[str, ...]  # writers of the stream's first value (patch embedding, position embedding)
    exit_norm: str
    exit_linear: str
    # V for the per-head Hadamard between V and the attention's output linear: (role, chunk, chunks), V being
    # chunk ``chunk`` of ``chunks`` equal parts of that linear's output (a fused qkv: ("qkv", 2, 3)); None: no
    # per-head rotation. ``values_reader`` reads the heads; ``num_heads_attr`` names the encoder config's heads.
    values: tuple[str, int, int] | None = None
    values_reader: str = "o"
    num_heads_attr: str = "num_heads"

    def roles(self) -> dict[str, str]:
        return dict(self.linears)

    def input_groups(self) -> dict[str, tuple[str, ...]]:
        """{group: roles sharing one input}: the readers of each norm together, every other linear alone."""
        groups = {"_".join(roles): tuple(roles) for _, roles in self.norm_feeds}
        fed = {r for roles in groups.values() for r in roles}
        groups.update({role: (role,) for role, _ in self.linears if role not in fed})
        return groups


class ModelAdapter:
    """Decoder-only MLLM adapter; subclasses set the paths, token ids, norm kind and tiny model."""

    model_types: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[str] = ""  # transformers class that loads a checkpoint folder
    processor_class: ClassVar[str] = ""  # transformers processor class
    language_model_path: ClassVar[str] = "model.language_model"  # has .layers, .norm, .embed_tokens
    lm_head_path: ClassVar[str] = "lm_head"
    encoder_paths: ClassVar[dict[str, str]] = {}
    role_paths: ClassVar[dict[str, str]] = {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    }
    attention_path: ClassVar[str] = "self_attn"
    mlp_path: ClassVar[str] = "mlp"
    norm_kind: ClassVar[NormKind] = NormKind.rms
    attn_norm_path: ClassVar[str] = "input_layernorm"  # feeds q, k, v
    mlp_norm_path: ClassVar[str] = "post_attention_layernorm"  # feeds gate, up
    # config attribute names holding each modality's placeholder token id ("video" counts as vision or text)
    token_id_attrs: ClassVar[dict[str, tuple[str, ...]]] = {}
    final_norm_path: ClassVar[str] = "norm"  # inside the language model
    # Rotations (QuaRot, MQuant) rotate the residual stream by an orthogonal Q, exactly only when every norm on it
    # is an RMSNorm reading the stream and every writer into it is a linear map (folded with Q). False, with the
    # reason, where the architecture breaks that; methods refuse such a model instead of giving a wrong result.
    supports_residual_rotation: ClassVar[bool] = True
    residual_rotation_blocker: ClassVar[str] = ""
    # Linears outside the decoder whose outputs the model writes into the residual stream (the encoders' projector
    # outputs, merged into inputs_embeds); None = not declared (a residual rotation then refuses the model).
    encoder_output_paths: ClassVar[tuple[str, ...] | None] = None
    # The vision encoder's blocks and residual stream (MQuant's encoder quantization); None = not declared.
    vision_encoder: ClassVar[VisionEncoderSpec | None] = None

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- structure -------------------------------------------------------------------------
    def language_model(self) -> nn.Module:
        return self.model.get_submodule(self.language_model_path)

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model().layers

    def num_layers(self) -> int:
        return len(self.decoder_layers())

    def embed_tokens(self) -> nn.Module:
        return self.language_model().embed_tokens

    def final_norm(self) -> nn.Module:
        return self.language_model().get_submodule(self.final_norm_path)

    def replace_final_norm_(self, new: nn.Module) -> None:
        _set_submodule(self.language_model(), self.final_norm_path, new)

    def untie_lm_head_(self) -> bool:
        """Give lm_head its own copy of a weight it shares with the embeddings (a rotation folds a different
        matrix into each); True when it was tied. The configs are updated so that nothing re-ties them."""
        head, embed = self.lm_head(), self.embed_tokens()
        if head.weight is not embed.weight and head.weight.data_ptr() != embed.weight.data_ptr():
            return False
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
        for cfg in (self.config, self.text_config()):
            if getattr(cfg, "tie_word_embeddings", None):
                cfg.tie_word_embeddings = False
        return True

    @classmethod
    def residual_rotation_refusal(cls) -> str | None:
        """Why the residual stream cannot be rotated exactly (known before loading), or None."""
        if not cls.supports_residual_rotation:
            return f"{cls.__name__} cannot be rotated exactly: {cls.residual_rotation_blocker or 'see the adapter'}"
        if cls.encoder_output_paths is None:
            return (f"{cls.__name__} does not declare which encoder linears write into the decoder's residual "
                    "stream (encoder_output_paths); a residual rotation would leave those tokens unrotated")
        return None

    def encoder_output_linears(self) -> list[nn.Module]:
        """The linears whose outputs enter the residual stream from the encoders (see ``encoder_output_paths``)."""
        if self.encoder_output_paths is None:
            raise NotImplementedError(
                f"{type(self).__name__} does not declare which encoder linears write into the decoder's residual "
                "stream (encoder_output_paths); a residual rotation would leave those tokens unrotated")
        return [self.model.get_submodule(p) for p in self.encoder_output_paths]

    def lm_head(self) -> nn.Module:
        return self.model.get_submodule(self.lm_head_path)

    # --- the vision encoder's blocks (see VisionEncoderSpec) -------------------------------
    @classmethod
    def vision_encoder_missing(cls) -> str | None:
        """Why the vision encoder cannot be transformed block by block, or None when it is declared."""
        if cls.vision_encoder is None:
            return (f"{cls.__name__} does not declare its vision encoder's blocks and residual stream "
                    "(vision_encoder: a VisionEncoderSpec)")
        return None

    def _vision_spec(self) -> VisionEncoderSpec:
        reason = self.vision_encoder_missing()
        if reason:
            raise NotImplementedError(reason)
        return self.vision_encoder

    def vision_module(self) -> nn.Module:
        """The vision encoder (``vision_encoder.path``)."""
        return self.model.get_submodule(self._vision_spec().path)

    def vision_part(self, path: str) -> nn.Module:
        """A module on the encoder's stream outside its blocks (entry, exit norm, exit linear): path from the root."""
        self._vision_spec()
        return self.model.get_submodule(path)

    def replace_vision_part_(self, path: str, new: nn.Module) -> None:
        _set_submodule(self.model, path, new)

    def vision_blocks(self) -> nn.ModuleList:
        return self.vision_module().get_submodule(self._vision_spec().blocks)

    def vision_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {role: block.get_submodule(path) for role, path in self._vision_spec().linears}

    def vision_input_group_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        lin = self.vision_linears(block)
        return {group: lin[roles[0]] for group, roles in self._vision_spec().input_groups().items()}

    def set_vision_linear(self, block: nn.Module, role: str, new: nn.Module) -> None:
        _set_submodule(block, self._vision_spec().roles()[role], new)

    def encoders(self) -> dict[str, nn.Module]:
        return {name: self.model.get_submodule(path) for name, path in self.encoder_paths.items()}

    def linears(self, layer: nn.Module) -> dict[str, nn.Module]:
        """The seven decoder linears of a layer keyed by role."""
        return {role: layer.get_submodule(path) for role, path in self.role_paths.items()}

    def input_group_linears(self, layer: nn.Module) -> dict[str, nn.Module]:
        """One linear per input group (they share their input): where input statistics are observed."""
        lin = self.linears(layer)
        return {group: lin[roles[0]] for group, roles in INPUT_GROUPS.items()}

    def linear_names(self, layer_idx: int) -> dict[str, str]:
        prefix = f"{self.language_model_path}.layers.{layer_idx}"
        return {role: f"{prefix}.{path}" for role, path in self.role_paths.items()}

    def set_linear(self, layer: nn.Module, role: str, new: nn.Module) -> None:
        _set_submodule(layer, self.role_paths[role], new)

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attention_path)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mlp_path)

    def text_config(self):
        return self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config

    def head_dim(self) -> int:
        text = self.text_config()
        return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads

    # --- the stacks of blocks the engine walks (masquant.engine.walker.BlockStack) ----------
    def decoder_stack(self, video_as: str = "vision"):
        """The decoder layers as a stack: their linears by role, the model's step between layers, the modality
        of every token (from ``input_ids``, video counted as ``video_as``)."""
        return BlockStack(
            name="decoder", blocks=self.decoder_layers(), exit=self.final_norm(), linears=self.linears,
            set_linear=self.set_linear, input_groups=INPUT_GROUPS, routed=True,
            masks=lambda batch: self.modality_masks(batch["input_ids"], video_as=video_as),
            entry=self.language_model(), between_state=self.between_layers_state, after_block=self.after_layer)

    def vision_stack(self):
        """The vision encoder's blocks as a stack (declared by ``vision_encoder``); batches without an image skip it."""
        spec = self._vision_spec()
        return BlockStack(
            name="vision", blocks=self.vision_blocks(), exit=self.vision_part(spec.exit_norm),
            linears=self.vision_linears, set_linear=self.set_vision_linear, input_groups=spec.input_groups(),
            every_batch=False, unit="block")

    def stack(self, name: str, video_as: str = "vision"):
        """The stack called ``name``: "decoder" or "vision"."""
        if name == "decoder":
            return self.decoder_stack(video_as)
        if name == "vision":
            return self.vision_stack()
        raise ValueError(f"stack={name!r}: valid stacks are 'decoder' and 'vision'")

    # --- norms and folds -------------------------------------------------------------------
    def norm(self, layer: nn.Module, path: str) -> nn.Module:
        return layer.get_submodule(path)

    def replace_norm_(self, layer: nn.Module, path: str, new: nn.Module) -> None:
        """Put ``new`` in place of a norm (rotations turn norms into weightless RMSNorm)."""
        _set_submodule(layer, path, new)

    def fold_pairs(self, layer: nn.Module) -> list[FoldPair]:
        """The producer→consumer pairs of a layer where a smoothing vector folds exactly.

        v→o only where v's output is o's input (no grouped-query attention); up→down always (the MLP's
        gate activation multiplies up's output elementwise, so scaling up's rows scales down's input).
        """
        lin = self.linears(layer)
        pairs = [FoldPair("attn_in", self.attn_norm_path, ("q", "k", "v"), "qkv", "attn", True)]
        if lin["v"].out_features == lin["o"].in_features:
            pairs.append(FoldPair("v_o", "v", ("o",), "o", "attn", False))
        pairs.append(FoldPair("mlp_in", self.mlp_norm_path, ("gate", "up"), "gate_up", "mlp", True))
        pairs.append(FoldPair("up_down", "up", ("down",), "down", "mlp", False))
        return pairs

    def norm_fold_pairs(self, layer: nn.Module) -> list[FoldPair]:
        return [p for p in self.fold_pairs(layer) if p.producer_is_norm]

    def fold_scales_(self, layer: nn.Module, pair: FoldPair, s: torch.Tensor) -> None:
        """Producer output ÷ s, consumers' input columns × s: the FP function of the layer is unchanged."""
        if pair.producer_is_norm:
            norms.fold_scales_into_norm_(self.norm(layer, pair.producer), self.norm_kind, s)
        else:
            norms.fold_scales_into_linear_output_(self.linears(layer)[pair.producer], s)
        lin = self.linears(layer)
        for role in pair.consumers:
            norms.scale_linear_inputs_(lin[role], s)

    # --- one decoder layer's call (MQuant's AIFS, KV-cache quantization) ------------------------
    def reorder_layer_call(self, args: tuple, kwargs: dict, perm: torch.Tensor) -> tuple[tuple, dict]:
        """The decoder layer's call with its tokens in the order ``perm`` [T] (one order for the whole batch).

        Hidden states, position embeddings and position ids follow their tokens (every token keeps its own
        position, M-RoPE included), and the attention mask is the model's mask with rows and columns permuted
        (the causal mask when the model passes none), so token i still attends to exactly the tokens j it
        attended to before: orig(j) <= orig(i) for a causal mask. The layer's output, un-permuted, is unchanged.
        """
        impl = self.text_config()._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise NotImplementedError(f"reordering a layer's tokens needs an explicit attention mask; "
                                      f"attn_implementation={impl!r} takes none (use sdpa or eager)")
        args, kwargs = list(args), dict(kwargs)
        if args:
            args[0] = args[0][:, perm]
        else:
            kwargs["hidden_states"] = kwargs["hidden_states"][:, perm]
        T = perm.numel()
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            kwargs["position_embeddings"] = tuple(t[..., perm, :] for t in pe)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][..., perm]
        mask = kwargs.get("attention_mask")
        if mask is None:  # the kernel's implicit causal mask: token a may see b iff orig(b) <= orig(a)
            allowed = (perm[None, :] <= perm[:, None])[None, None]
            if impl == "eager":  # eager kernels add the mask
                dtype = (args[0] if args else kwargs["hidden_states"]).dtype
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=perm.device).masked_fill(
                    ~allowed, torch.finfo(dtype).min)
            kwargs["attention_mask"] = allowed
        elif torch.is_tensor(mask) and mask.dim() == 4 and mask.shape[-1] == mask.shape[-2] == T:
            kwargs["attention_mask"] = mask[:, :, perm][:, :, :, perm]
        else:
            raise NotImplementedError(f"cannot reorder an attention mask of type {type(mask).__name__} "
                                      f"{tuple(getattr(mask, 'shape', ()))} for {T} tokens")
        return tuple(args), kwargs

    def wrap_attention_kernel_(self, layer: nn.Module, fn) -> None:
        """Run this layer's attention kernel through ``fn(module, query, key, value, attention_mask, kernel, **kw)``.

        query/key/value [B, heads, T, head_dim] are what the model hands its kernel: after the projections and
        RoPE, keys and values with the cache's past; ``kernel`` is the model's own attention function (same
        signature without ``kernel``). Only this layer's attention is affected (it gets its own view of the
        config naming the wrapper as its implementation); the model's masks are built as before.
        """
        import copy
        import sys

        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attn = self.attention(layer)
        base = getattr(attn, "_masquant_base_attn", None) or attn.config._attn_implementation
        eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
        kernel = ALL_ATTENTION_FUNCTIONS.get_interface(base, eager)
        if _WRAPPED_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS.register(_WRAPPED_ATTENTION, _wrapped_attention)
        if getattr(attn, "_masquant_base_attn", None) is None:
            attn.config = copy.copy(attn.config)
            attn.config._attn_implementation_internal = _WRAPPED_ATTENTION
            attn._masquant_base_attn = base
        attn._masquant_attention = lambda module, q, k, v, mask, **kw: fn(module, q, k, v, mask, kernel, **kw)

    # --- what the model adds between decoder layers ----------------------------------------
    def between_layers_state(self, language_model_kwargs: dict) -> dict | None:
        """What :meth:`after_layer` needs, taken from the keyword arguments of the language model's call."""
        return None

    def after_layer(self, layer_idx: int, hidden: torch.Tensor, state: dict | None) -> torch.Tensor:
        """The model's own step between decoder layer ``layer_idx`` and the next (identity for most models)."""
        return hidden

    # --- modalities ------------------------------------------------------------------------
    def _token_id(self, attrs: tuple[str, ...]) -> int | None:
        for attr in attrs:
            for cfg in (self.config, getattr(self.config, "thinker_config", None)):
                value = getattr(cfg, attr, None) if cfg is not None else None
                if value is not None:
                    return int(value)
        return None

    def modality_token_ids(self, video_as: str = "vision") -> dict[str, list[int]]:
        """Placeholder token ids per non-text modality, e.g. {'vision': [image_id, video_id]}."""
        if video_as not in VIDEO_AS_CHOICES:
            raise ValueError(f"video_as={video_as!r}: valid choices are {VIDEO_AS_CHOICES}")
        ids: dict[str, list[int]] = {}
        for key, attrs in self.token_id_attrs.items():
            token = self._token_id(attrs)
            if token is None:
                continue
            modality = key
            if key == "video":
                if video_as == "text":
                    continue
                modality = "vision"
            ids.setdefault(modality, []).append(token)
        return ids

    def supported_modalities(self) -> tuple[str, ...]:
        return ("text",) + tuple(m for m in ("vision", "audio") if m in self.modality_token_ids())

    def modality_masks(self, input_ids: torch.Tensor, video_as: str = "vision") -> dict[str, torch.Tensor]:
        """Boolean [B, T] masks per modality from input_ids; text = every token of no other modality."""
        masks: dict[str, torch.Tensor] = {}
        other = torch.zeros_like(input_ids, dtype=torch.bool)
        for modality, ids in self.modality_token_ids(video_as).items():
            mask = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
            masks[modality] = mask
            other |= mask
        masks["text"] = ~other
        return masks

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def model_cls(cls) -> type:
        import transformers

        return getattr(transformers, cls.model_class)

    @classmethod
    def load_pretrained(cls, path: str | Path, dtype: torch.dtype) -> nn.Module:
        """The checkpoint's model; a compressed-tensors folder (``masquant.export``) loads as its quantized model."""
        from masquant.adapters.checkpoint import load_checkpoint

        return load_checkpoint(cls.model_cls(), path, dtype)

    @classmethod
    def load_processor(cls, path: str | Path):
        """The checkpoint's processor; parts that need absent libraries (the video processor) are left out."""
        import transformers

        from masquant.adapters.processors import load_processor

        return load_processor(getattr(transformers, cls.processor_class), path)

    # --- the tiny model of this family (tests, model=tiny_*) -------------------------------
    @classmethod
    def tiny_processor(cls):
        """The real processor class with a tiny in-process tokenizer and small images."""
        raise NotImplementedError(f"{cls.__name__} has no tiny model")

    @classmethod
    def tiny_config(cls, tokenizer) -> Any:
        """A small random config of the real class, with the token ids of ``tokenizer``."""
        raise NotImplementedError(f"{cls.__name__} has no tiny model")

    @classmethod
    def tiny(cls, seed: int = 0) -> tuple[nn.Module, Any]:
        """(random model of the real class, its processor), deterministic in ``seed``."""
        processor = cls.tiny_processor()
        config = cls.tiny_config(processor.tokenizer)
        torch.manual_seed(seed)
        model = cls.model_cls()(config).eval()
        return model, processor

    @classmethod
    def tiny_modalities(cls) -> tuple[str, ...]:
        """Non-text inputs the tiny processor takes (its calibration rows carry them)."""
        return ("vision",)


_WRAPPED_ATTENTION = "masquant_wrapped"


def _wrapped_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention implementation of layers passed to :meth:`ModelAdapter.wrap_attention_kernel_`."""
    return module._masquant_attention(module, query, key, value, attention_mask, **kwargs)


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, new)
