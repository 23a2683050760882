"""The config hash: which keys make a configuration, and a stable hash of anything JSON-like.

A run's results live under a folder named by the hash of its composed configuration, minus the keys that do not
change results (:data:`NON_SEMANTIC`); a job that finds a finished result for its hash skips itself.
"""

from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

from masquant.runs.store import RESULTS_FORMAT

# Keys that do not change results and are left out of the config hash.
NON_SEMANTIC = ("logger", "paths", "force", "threads", "device", "reference", "sweep", "export")
NON_SEMANTIC_MODEL = ("placement", "max_memory_gib")  # where the weights live, not what they compute
# Keys added after results existed, each with the default that reproduces the earlier behaviour: left out of
# the hash at that default, so finished results keep their hash (sweeps resume) across the upgrade; any other
# value is a new configuration. Add a key here when you add an option whose default changes nothing.
ADDED_WITH_NEUTRAL_DEFAULT: dict[tuple[str, str], object] = {
    ("eval", "max_new_tokens_cap"): None,
    ("eval", "max_new_tokens_per_task"): {},
    ("calib", "with_answers"): False,
    ("quant", "gptq_true_sequential"): False,
    ("quant", "gptq_static_groups"): False,
    ("quant", "w_format"): "int",  # float formats (masquant.quant.formats)
    ("quant", "a_format"): "int",
    ("quant", "fp4_rounding"): "even",
    ("quant", "mx_scale_rule"): "compressed_tensors",
    ("method", "scales"): "fp_prompts",  # MQuant's
    ("method", "scale_new_tokens"): 20,
    ("method", "vision_rms"): False,
    # AWQ's speed options: their defaults give the earlier results up to float rounding (docs/methods/awq.md)
    ("method", "batch_tokens"): 4096,
    ("method", "clip_gram"): True,
    ("method", "capture_per_pair"): False,
    ("method", "search_precision"): "model",  # AWQ's bf16 scale search (opt-in; "model" is the earlier behaviour)
}



def stable_hash(obj, length: int = 12) -> str:
    """sha256 of the sorted-key JSON of ``obj`` (non-JSON values by ``str``), first ``length`` hex digits."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def to_plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def without_neutral_defaults(group: str, values: dict) -> dict:
    """``values`` of config group ``group`` without the later-added keys that sit at their neutral default."""
    return {k: v for k, v in values.items()
            if not ((group, k) in ADDED_WITH_NEUTRAL_DEFAULT and v == ADDED_WITH_NEUTRAL_DEFAULT[(group, k)])}


def config_hash(cfg: DictConfig) -> str:
    plain = to_plain(cfg)
    for key in NON_SEMANTIC:
        plain.pop(key, None)
    plain.pop("hydra", None)
    plain.pop("recipe", None)  # a recipe is a preset of quant.* and method.* values, which are hashed themselves
    for key in NON_SEMANTIC_MODEL:
        plain.get("model", {}).pop(key, None)
    for group in {g for g, _ in ADDED_WITH_NEUTRAL_DEFAULT}:
        if group in plain:
            plain[group] = without_neutral_defaults(group, plain[group])
    plain["_results_format"] = RESULTS_FORMAT  # a new format is a new configuration: stale results are re-run
    return stable_hash(plain, 10)
