"""Adding a method is one folder: ``config.py``, ``core.py``, ``method.py`` and its test file, and no other file
edited. The toy method below lives in a temporary package named by MASQUANT_METHOD_PACKAGES (a method kept outside
this repository; a folder in ``baselines/`` is found the same way). The CLI then composes ``method=toy`` with
its typed options, runs it through the engine, writes its report, and the report table places it by its
registered order; its own test file passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from textwrap import dedent

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=tiny_qwen25vl", "calib=tiny", "eval=fidelity", "calib.n_samples=2", "calib.held_out=1",
        "eval.ppl=false", "logger=none", "hydra.verbose=false"]

TOY = {
    "__init__.py": "",
    "config.py": '''
        from dataclasses import dataclass


        @dataclass
        class ToyConfig:
            id: str = "toy"
            shrink: float = 0.9  # every weight row clipped to shrink x its abs-max before rounding

            def __post_init__(self):
                if not 0.0 < self.shrink <= 1.0:
                    raise ValueError(f"method.shrink={self.shrink}: must be in (0, 1]")
        ''',
    "core.py": '''
        import torch


        def clipped(W: torch.Tensor, shrink: float) -> torch.Tensor:
            """W [out, in] clamped to ±shrink·max|W_row| per output row."""
            m = W.abs().amax(dim=1, keepdim=True) * shrink
            return torch.maximum(torch.minimum(W, m), -m)
        ''',
    "method.py": '''
        from masquant.engine.deploy import DeployWeight
        from masquant.methods.base import BlockPlan, Method
        from masquant.methods.registry import register_method

        from toymethods.toy.config import ToyConfig
        from toymethods.toy.core import clipped


        @register_method("toy", config=ToyConfig, order=15)
        class Toy(Method):
            needs_calibration = False

            def walk(self, ctx, stack):
                return None  # no calibration data: the blocks are visited in order

            def plan_block(self, ctx, step) -> BlockPlan:
                shrink = self.cfg.shrink
                return BlockPlan(weight_for=lambda role, lin: DeployWeight(clipped(lin.weight.data, shrink)),
                                 report={"shrink": shrink})
        ''',
    "test_toy.py": '''
        import torch

        from toymethods.toy.core import clipped


        def test_clipped_keeps_rows_within_their_shrunk_absmax():
            W = torch.randn(8, 16)
            C = clipped(W, 0.5)
            assert (C.abs() <= 0.5 * W.abs().amax(dim=1, keepdim=True) + 1e-7).all()
            assert torch.equal(clipped(W, 1.0), W)
        ''',
}


def _write_toy(root: Path) -> dict:
    package = root / "toymethods"
    (package / "toy").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, text in TOY.items():
        (package / "toy" / name).write_text(dedent(text).lstrip())
    return {**os.environ, "MASQUANT_METHOD_PACKAGES": "toymethods", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join([str(root), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_a_method_is_one_folder(tmp_path):
    env = _write_toy(tmp_path / "plugins")
    out = tmp_path / "out"
    # one sweep: the toy method beside two registered ones (and their shared dense reference)
    run = subprocess.run([sys.executable, "-m", "masquant", "-m", *TINY, "method=toy,smoothquant,rtn", "quant=w4a8",
                          f"paths.output_root={out}", f"paths.cache_dir={tmp_path}/cache",
                          f"hydra.sweep.dir={tmp_path}/sweep"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = (out / "runs").glob("*/toy/w4a8-*/metrics.json")
    metrics = json.loads(result.read_text())
    assert metrics["run/method"] == "toy" and metrics["quant/linears"] == 14  # 7 linears in each of 2 layers
    assert metrics["toy/shrink/layer_0"] == 0.9 and metrics["run/method_label"] == "toy"

    # the typed config rejects a bad value before any work, naming the key
    bad = subprocess.run([sys.executable, "-m", "masquant", *TINY, "method=toy", "method.shrink=2",
                          f"paths.output_root={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "method.shrink=2.0: must be in (0, 1]" in bad.stdout + bad.stderr

    # the report table places the toy row by its registered order (15: after rtn's 10, before smoothquant's 20)
    table = subprocess.run([sys.executable, "-m", "masquant.reporting", str(out / "runs")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr[-2000:]
    rows = [line.split(" | ")[1] for line in table.stdout.splitlines() if line.startswith("| tiny")]
    assert rows == ["dense", "rtn", "toy", "smoothquant"], rows

    # and its own test file passes
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(tmp_path / "plugins" / "toymethods" / "toy" / "test_toy.py")],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert tests.returncode == 0 and "1 passed" in tests.stdout, tests.stdout[-2000:]
