"""On-disk cache of calibration statistics keyed by a hash of what determines them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def stable_hash(obj, length: int = 12) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module, length: int = 12) -> str:
    """Hash of every parameter's name, shape, dtype, sum and absolute sum: new weights at the same path
    (a re-trained testbed tower, a re-finetuned checkpoint) get new cache entries. One pass over the weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        x = p.detach()
        h.update(f"{name}:{tuple(x.shape)}:{x.dtype}:{float(x.double().sum()):.10e}:{float(x.double().abs().sum()):.10e};".encode())
    return h.hexdigest()[:length]


def atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StatsCache:
    """``get_or_compute(key, fn)``: load ``root/<hash>.pt`` if present, else compute and save atomically."""

    def __init__(self, root: str | Path | None):
        self.root = None if root is None else Path(root)
        self.hits = 0
        self.misses = 0

    def path_for(self, key: dict) -> Path | None:
        if self.root is None:
            return None
        return self.root / f"{key.get('kind', 'stats')}-{stable_hash({**key, '_v': CACHE_VERSION})}.pt"

    def get_or_compute(self, key: dict, compute: Callable[[], object], to_state=lambda x: x, from_state=lambda x: x):
        path = self.path_for(key)
        if path is not None and path.exists():
            self.hits += 1
            log.info("statistics cache hit: %s", path)
            return from_state(torch.load(path, map_location="cpu", weights_only=False))
        self.misses += 1
        value = compute()
        if path is not None:
            atomic_torch_save(to_state(value), path)
            log.info("statistics cached: %s", path)
        return value
