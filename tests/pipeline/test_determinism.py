"""What the thread count changes. Results record their threads (provenance/numerics/threads); the docs
(docs/reliability.md, "Reproducing a number") say which numbers reproduce bit for bit and which within a tolerance.

- RTN's grids come from maxima (per row / per token), and a maximum does not depend on the order it is taken in:
  the deployed integer weights and scales are equal bit for bit with 1 and 2 threads.
- Everything summed over a whole tensor (the perplexity's mean loss, SQNR's signal and noise) may be summed in
  another order by another number of threads: equal only within a tolerance, asserted here on the tiny model.
"""

from __future__ import annotations

import pytest
import torch

from masquant.app import pipeline
from masquant.methods.registry import get_config_class
from masquant.quant import QuantScheme
from support.tiny import run_method, tiny

TINY = ["model=tiny_qwen25vl", "calib=tiny", "eval=fidelity", "calib.n_samples=2", "calib.held_out=1",
        "eval.ppl_sequences=4", "logger=none", "reference=false"]
SQNR_TOL_DB = 1e-3
PPL_RTOL = 1e-5


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def deployed_state(threads: int) -> dict[str, torch.Tensor]:
    torch.set_num_threads(threads)
    model, processor, cls = tiny("qwen2_5_vl")
    run_method(model, cls, processor, get_config_class("rtn")(), QuantScheme("w4a8", 4, 8))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_rtn_weights_are_bit_equal_with_1_and_2_threads():
    one, two = deployed_state(1), deployed_state(2)
    assert one.keys() == two.keys()
    assert [k for k in one if not torch.equal(one[k], two[k])] == []


@pytest.mark.parametrize("method", [["method=rtn"], ["method=rtn", "quant.w_quantizer=gptq"]])
def test_fidelity_with_1_and_2_threads_is_equal_within_1e_3_db_and_1e_5_relative_perplexity(compose_cfg, tmp_path,
                                                                                            method):
    runs = [pipeline.run(compose_cfg(*TINY, *method, "quant=w4a8", f"threads={t}",
                                     f"paths.output_root={tmp_path / str(t)}")) for t in (1, 2)]
    assert [r["provenance/numerics/threads"] for r in runs] == [1, 2]
    assert runs[0]["run/config_hash"] == runs[1]["run/config_hash"]  # threads are not a configuration
    sqnr = [k for k in runs[0] if k.startswith("fidelity/sqnr/")]
    assert sqnr and all(abs(runs[0][k] - runs[1][k]) <= SQNR_TOL_DB for k in sqnr)
    assert runs[1]["fidelity/ppl"] == pytest.approx(runs[0]["fidelity/ppl"], rel=PPL_RTOL)
