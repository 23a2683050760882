"""Golden results (tests/golden/method_results.json, written by scripts/golden_results.py): a change that moves a
number or a config hash of any method x scheme case fails here. The hashes of every case are checked in seconds
(results of users and sweeps are found by hash: a changed hash silently re-runs them); two cases (a search; GPTQ on the decoder and the vision encoder) are re-run in
the default suite, every case with ``pytest -m slow``."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from masquant.runs.hashing import config_hash

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("golden_results", ROOT / "scripts" / "golden_results.py")
golden_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden_results)
GOLDEN = json.loads(golden_results.GOLDEN.read_text())
REL = 1e-6  # the same machine gives equal numbers; another CPU may round the last bits differently


def test_every_case_of_the_script_is_stored():
    assert set(GOLDEN) == set(golden_results.CASES)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_config_hash_is_unchanged(compose_cfg, name):
    if "error" in GOLDEN[name]:
        return  # refused before any run: no hash was recorded
    cfg = compose_cfg(*golden_results.BASE, *GOLDEN[name]["overrides"])
    assert config_hash(cfg) == GOLDEN[name]["config_hash"], name


def close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or math.isclose(a, b, rel_tol=REL, abs_tol=1e-12)
    return a == b


def check_case(name: str) -> None:
    new = golden_results.run_case(name, golden_results.CASES[name], golden_results.sys.executable)
    old = GOLDEN[name]
    if "error" in old:
        assert "error" in new, (name, new)
        return
    assert "error" not in new, new["error"]
    assert new["config_hash"] == old["config_hash"]
    moved = {k: (v, new["metrics"].get(k)) for k, v in old["metrics"].items() if not close(v, new["metrics"].get(k))}
    assert not moved, moved


@pytest.mark.parametrize("name", ["awq-w4a16_g128", "mquant-vision-gptq-w4a8"])
def test_a_few_cases_reproduce(name):
    check_case(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(golden_results.CASES))
def test_every_case_reproduces(name):
    check_case(name)
