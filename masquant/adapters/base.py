"""Model adapters: the only code that knows Hugging Face model classes.

Methods ask an adapter for decoder layers, linears by role, the norms that feed them and
per-token modality masks; they never look at ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
# Linears that share one input: statistics are kept once per input group.
INPUT_GROUPS: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
ROLE_TO_GROUP = {role: group for group, roles in INPUT_GROUPS.items() for role in roles}
VIDEO_AS_CHOICES = ("vision", "text")
MODALITIES = ("text", "vision", "audio")


@dataclass(frozen=True)
class NormGroup:
    """A norm and the linears it feeds (the boundary where smoothing and norm fusion fold)."""

    norm: str  # attribute path inside the decoder layer
    roles: tuple[str, ...]
    input_group: str


class ModelAdapter:
    """Decoder-only MLLM adapter driven by attribute paths; subclasses set the paths and token ids."""

    model_types: tuple[str, ...] = ()
    language_model_path: str = "model.language_model"  # has .layers, .norm, .embed_tokens
    lm_head_path: str = "lm_head"
    encoder_paths: dict[str, str] = {}
    role_paths: dict[str, str] = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    norm_groups: tuple[NormGroup, ...] = (
        NormGroup("input_layernorm", ("q", "k", "v"), "qkv"),
        NormGroup("post_attention_layernorm", ("gate", "up"), "gate_up"),
    )
    # config attribute names holding each modality's placeholder token id
    token_id_attrs: dict[str, tuple[str, ...]] = {}

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
        return self.language_model().norm

    def lm_head(self) -> nn.Module:
        return self.model.get_submodule(self.lm_head_path)

    def encoders(self) -> dict[str, nn.Module]:
        return {name: self.model.get_submodule(path) for name, path in self.encoder_paths.items()}

    def linears(self, layer: nn.Module) -> dict[str, nn.Module]:
        """The seven decoder linears of a layer keyed by role."""
        return {role: layer.get_submodule(path) for role, path in self.role_paths.items()}

    def linear_names(self, layer_idx: int) -> dict[str, str]:
        prefix = f"{self.language_model_path}.layers.{layer_idx}"
        return {role: f"{prefix}.{path}" for role, path in self.role_paths.items()}

    def set_linear(self, layer: nn.Module, role: str, new: nn.Module) -> None:
        parent_path, _, child = self.role_paths[role].rpartition(".")
        setattr(layer.get_submodule(parent_path), child, new)

    def norm(self, layer: nn.Module, group: NormGroup) -> nn.Module:
        return layer.get_submodule(group.norm)

    def head_dim(self) -> int:
        text = self.text_config()
        return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads

    def text_config(self):
        return getattr(self.config, "text_config", self.config)

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
