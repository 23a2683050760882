"""The installed environment is the locked one, and a drifted one fails with the fix in the message."""

from __future__ import annotations

import re

import pytest

from masquant.runs import environment as env


def test_installed_packages_match_the_lock():
    problems = env.check_environment()
    assert env.lock_path().exists(), f"no lock file at {env.lock_path()}"
    assert not problems, env.drift_message(problems, env.lock_path())


def test_pip_check_is_clean_apart_from_the_known_no_deps_packages():
    problems = env.pip_check_problems()
    assert not problems, "pip check: " + "\n".join(problems) + f"\n{env.FIX}"


def test_a_package_changed_by_hand_is_reported_with_the_fix():
    lock = {"filelock": "3.32.7", "torch": "2.13.0", "numpy": "2.4.6"}
    installed = {"filelock": "4.3.1", "torch": "2.13.0+cpu", "numpy": "2.4.6"}
    problems = env.drift(lock, installed)
    assert problems == ["filelock: locked 3.32.7, installed 4.3.1"]
    message = env.drift_message(problems, env.lock_path())
    assert "filelock" in message and "scripts/setup.sh" in message


def test_missing_package_and_external_torch():
    lock = {"torch": "2.13.0", "lmms-eval": "0.7.3"}
    assert env.drift(lock, {"torch": "2.14.1+cu128"}) == [
        "lmms-eval: locked 0.7.3, not installed", "torch: locked 2.13.0, installed 2.14.1+cu128"]
    assert env.drift(lock, {"torch": "2.14.1+cu128", "lmms-eval": "0.7.3"}, external_torch=True) == []
    # torch builds of the locked version match whatever their local label
    assert env.drift({"torch": "2.13.0"}, {"torch": "2.13.0+cu128"}) == []


def test_lock_is_exact_and_names_no_index_or_host(tmp_path):
    text = env.lock_path().read_text()
    assert "://" not in text and "--index" not in text and "--find-links" not in text
    pins = env.read_lock(env.lock_path())
    for must in ("torch", "transformers", "lmms-eval", "filelock", "pip", "setuptools", "pytest"):
        assert must in pins, f"{must} is not in the lock"
    bad = tmp_path / "bad.lock"
    bad.write_text("numpy>=2\n")
    with pytest.raises(ValueError, match="numpy>=2"):
        env.read_lock(bad)


def test_names_are_compared_canonically():
    assert env.canonical("lmms_eval") == env.canonical("LMMS-Eval") == "lmms-eval"
    assert re.fullmatch(r"[a-z0-9-]+", env.canonical("typing_extensions"))
