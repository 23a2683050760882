"""The results store: run folders keyed by the config hash, atomic writes, the finished check, labels.

``<output_root>/runs/<model>/<method>/<quant>-<hash>/`` holds ``metrics.json``, ``config.yaml``,
``run.log`` and lmms-eval's sample logs. A run is written under a temporary sibling name and renamed
when complete, so a folder named like a run with a ``metrics.json`` is always a finished run.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields, is_dataclass
from pathlib import Path

RESULT_FILE = "metrics.json"


def run_dir_for(output_root: str | Path, model: str, method: str, quant: str, config_hash: str) -> Path:
    return Path(output_root) / "runs" / str(model).replace("/", "_") / str(method) / f"{quant}-{config_hash}"


def is_finished(run_dir: Path) -> bool:
    return (run_dir / RESULT_FILE).exists()


def load_result(run_dir: Path) -> dict:
    return json.loads((run_dir / RESULT_FILE).read_text())


def write_json_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def method_label(method_cfg) -> str:
    """Method id plus the options that differ from the method's defaults, e.g. 'masquant(learn=False)'."""
    if not is_dataclass(method_cfg):
        return str(method_cfg.id)
    default = type(method_cfg)()
    diffs = []
    for f in fields(method_cfg):
        value, ref = getattr(method_cfg, f.name), getattr(default, f.name)
        if is_dataclass(value):
            diffs += [f"{f.name}.{g.name}={getattr(value, g.name)}" for g in fields(value)
                      if getattr(value, g.name) != getattr(ref, g.name)]
        elif value != ref:
            diffs.append(f"{f.name}={getattr(value, 'value', value)}")
    return f"{method_cfg.id}({','.join(diffs)})" if diffs else str(method_cfg.id)
