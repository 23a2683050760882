"""Typed configuration of MASQuant (docs/methods/masquant.md).

Registered in Hydra's ConfigStore by ``masquant.app.config.register_configs`` (group ``method``, name
``masquant_schema``), so a misspelt key fails at compose time. ``__post_init__`` checks the values
(it runs for ``MASQuantConfig(...)`` in Python and for ``OmegaConf.to_object`` of a composed config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

SMOOTHED_ROLES = ("q", "k", "v", "o", "gate", "up")  # down_proj is quantized but never smoothed (MAS step 2)
ALL_ROLES = SMOOTHED_ROLES + ("down",)


class Deploy(str, Enum):
    """How the learned scales are deployed (docs/methods/masquant.md, "Deploy")."""

    cmc = "cmc"  # one shared weight Q(diag(s_text) W) + low-rank L1 L2 per non-text modality
    per_modality_weights = "per_modality_weights"  # MAS alone: Q(diag(s_m) W) per modality


def _choice(enum_cls, value, key: str):
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        raise ValueError(f"{key}={value!r}: valid choices are {[e.value for e in enum_cls]}") from None


@dataclass
class CMCConfig:
    """Cross-Modal Compensation (paper Eq. 22-29, Theorem 2).

    The rank is either a ratio of min(D_in, D_out) (``rank_ratio``) or an absolute rank (``rank``);
    exactly one of them is set (setting ``rank`` alone clears the default ratio). The resolved rank is
    ``max(rank_floor, r)`` capped at min(D_in, D_out). ``rank_ratio: 1.0`` is full rank.
    """

    rank_ratio: Optional[float] = 0.2  # the official VL scripts; README 0.05, Omni 1.0
    rank: Optional[int] = None  # absolute rank; overrides rank_ratio
    rank_floor: int = 32
    whiten: bool = True  # False: plain truncated SVD of ΔW (ablation)
    quantized_target: bool = False  # ΔW = Q(diag(s_m) W) - W_q instead of diag(s_m) W - W_q
    # eigenvalue floor of C_m relative to its mean eigenvalue. The paper fixes the form, not ε. A rank-r
    # whitened fit leaves its residual ΔW - L1 L2 where calibration activations have little energy; the
    # quantized stream's own error reaches those directions in late layers. Measured on the testbed (phase-2
    # tower) at W4A6 (e2e vision SQNR): ε = 1e-6 -> 6.0 dB, 1e-2 -> 7.4, 1e-1 -> 7.1, 0.5 -> 6.9; full rank 10.8.
    damping: float = 1e-2
    # linears that get a low-rank branch: every quantized linear (one shared weight per linear,
    # ΔW_m = diag(s_m) W - W_q). down_proj has s = 1, so its ΔW_m = W - Q(W) is the weight-quantization
    # error seen through the modality's activations; leave it out (roles without down) for the ablation.
    roles: list[str] = field(default_factory=lambda: list(ALL_ROLES))

    def __post_init__(self) -> None:
        if self.rank is not None:
            if int(self.rank) != self.rank or self.rank < 1:
                raise ValueError(f"method.cmc.rank={self.rank!r}: must be a positive integer (or null)")
            self.rank = int(self.rank)
            self.rank_ratio = None
        elif self.rank_ratio is None:
            raise ValueError("method.cmc: set one of rank_ratio (0, 1] or rank (int >= 1)")
        elif not 0.0 < float(self.rank_ratio) <= 1.0:
            raise ValueError(f"method.cmc.rank_ratio={self.rank_ratio!r}: must be in (0, 1] (1.0 = full rank)")
        if self.rank_floor < 0:
            raise ValueError(f"method.cmc.rank_floor={self.rank_floor}: must be >= 0")
        if not 0.0 <= self.damping < 1.0:
            raise ValueError(f"method.cmc.damping={self.damping}: must be in [0, 1) (relative to the mean eigenvalue)")
        bad = [r for r in self.roles if r not in ALL_ROLES]
        if bad or not self.roles:
            raise ValueError(f"method.cmc.roles={list(self.roles)!r}: choose a non-empty subset of {list(ALL_ROLES)}")
        self.roles = list(self.roles)


@dataclass
class MASQuantConfig:
    """MAS (modality-aware smoothing) + CMC (cross-modal compensation).

    Defaults follow the paper where paper and official code differ:
    λ_text = λ_vision = 1.0 (official code: λ_vision = 0.5), untied scales (``split_scales``),
    fp32 learned scales (official: bf16).
    """

    id: str = "masquant"
    alpha: float = 0.5  # migration strength of the init, s = R^α / max|W|^(1-α)
    learn: bool = True  # False: the "MAS without Opt." ablation
    uniform: bool = False  # one scale from all tokens for every modality (the "Uniform" rows)
    tie_scales: bool = False  # k, v tied to q and gate to up (official merged_scales)
    lambda_text: float = 1.0
    lambda_vision: float = 1.0
    lambda_audio: float = 1.0
    epochs: int = 2
    lr: float = 5e-2
    n_learn_samples: Optional[int] = None  # calibration samples used for learning; None = all
    scale_floor: float = 1e-2  # |s| < floor -> ±floor before every step
    # the learning forward divides activations by (s + learn_eps), as the official code's forward_mas_train
    # does (weights are multiplied by s); 0 gives Eq. 13 exactly. A learned row moves by ~0.5 dB between the two.
    learn_eps: float = 1e-5
    deploy: Deploy = Deploy.cmc
    cmc: CMCConfig = field(default_factory=CMCConfig)

    def __post_init__(self) -> None:
        if self.id != "masquant":
            raise ValueError(f"method.id={self.id!r}: MASQuantConfig is for method id 'masquant'")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"method.alpha={self.alpha}: must be in [0, 1]")
        for key in ("lambda_text", "lambda_vision", "lambda_audio"):
            if getattr(self, key) < 0:
                raise ValueError(f"method.{key}={getattr(self, key)}: must be >= 0")
        if self.epochs < 0:
            raise ValueError(f"method.epochs={self.epochs}: must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"method.lr={self.lr}: must be > 0")
        if self.n_learn_samples is not None and self.n_learn_samples < 1:
            raise ValueError(f"method.n_learn_samples={self.n_learn_samples}: must be >= 1 or null (= all)")
        if self.learn_eps < 0:
            raise ValueError(f"method.learn_eps={self.learn_eps}: must be >= 0")
        if self.scale_floor < 0:
            raise ValueError(f"method.scale_floor={self.scale_floor}: must be >= 0")
        self.deploy = _choice(Deploy, self.deploy, "method.deploy")
        if isinstance(self.cmc, dict):
            self.cmc = CMCConfig(**self.cmc)

    def lambdas(self) -> dict[str, float]:
        return {"text": self.lambda_text, "vision": self.lambda_vision, "audio": self.lambda_audio}
