"""Shared fixtures: compose the real Hydra config, shrunk for tests, with outputs in tmp folders."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"  # runs log to wandb by default; tests/pipeline/test_wandb.py turns it on

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/support: fixtures that are not library code

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from masquant.app.config import register_configs  # noqa: E402
from masquant.app.main import CONF_DIR  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(*overrides) -> DictConfig of conf/config.yaml with outputs and caches under tmp_path."""
    register_configs()

    def _compose(*overrides: str, return_hydra_config: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[f"paths.output_root={tmp_path}/outputs", f"paths.cache_dir={tmp_path}/cache", *overrides],
                return_hydra_config=return_hydra_config,
            )

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def one_thread():
    """One torch thread for the test (results that do not depend on the machine's core count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_overrides():
    return ["model=tiny_qwen25vl", "calib=tiny", "eval=fidelity", "calib.n_samples=2", "calib.held_out=1"]
