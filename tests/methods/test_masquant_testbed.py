"""MASQuant on the real testbed (slow): end-to-end SQNR per modality against RTN and uniform smoothing.

Same configurations as ``experiments/testbed_table.py`` (default testbed calibration: 16 samples,
2 epochs). Measured there, e2e SQNR in dB (text / vision):

    W4A8: RTN 3.18 / 6.51, uniform 2.41 / 4.88, MAS 4.89 / 10.29, MAS+CMC (rank 0.2) 4.89 / 6.55
    W4A6: RTN 2.03 / 5.55, uniform 2.04 / 4.39, MAS 3.36 / 7.26, MAS+CMC (rank 0.2) -0.16 / 0.12
    W8A8: RTN 15.82 / 21.28, uniform 18.14 / 22.26, MAS 19.18 / 24.65, MAS+CMC (rank 0.2) 18.87 / 19.60

MAS+CMC at the official rank ratio 0.2 keeps MAS's text gain but loses most of its vision gain: on
this testbed image activations are 0.13-0.5x text per channel, so diag(s_v - s_t) W is far from low
rank. With a shortened calibration (8 samples, 1 epoch) its vision SQNR fell below RTN's
(4.5 vs 6.6 dB) while full-rank CMC still beat both baselines. Even at full rank, CMC's vision
tokens see Qa(X/s_v) W_q with W_q = Q(diag(s_t) W): their activation-quantization noise is amplified by
s_t/s_v per channel, which the low-rank branch (fed the unquantized input) cannot undo; at A6 this
collapses the testbed. MAS+CMC at W4A6 is therefore an expected failure until that is resolved.
"""

import pytest

from masquant import pipeline

BASE = ["eval=fidelity", "eval.ppl=false"]
UNIFORM = ["method=masquant", "method.uniform=true", "method.learn=false", "method.deploy=per_modality_weights"]
MAS = ["method=masquant", "method.deploy=per_modality_weights"]
MAS_CMC = ["method=masquant"]
CASES = [
    pytest.param("w4a8", MAS, id="mas-w4a8"),
    pytest.param("w4a6", MAS, id="mas-w4a6"),
    pytest.param("w4a8", MAS_CMC, id="mas_cmc-w4a8"),
    pytest.param("w4a6", MAS_CMC, id="mas_cmc-w4a6", marks=pytest.mark.xfail(
        strict=True, reason="CMC amplifies vision activation noise by s_t/s_v (module docstring)")),
]


@pytest.mark.slow
@pytest.mark.parametrize("quant,ours", CASES)
def test_masquant_beats_rtn_and_uniform_smoothing_on_testbed(compose_cfg, quant, ours):
    sqnr = {name: pipeline.run(compose_cfg(*BASE, f"quant={quant}", *extra))
            for name, extra in (("rtn", ["method=rtn"]), ("uniform", UNIFORM), ("ours", ours))}
    for modality in ("text", "vision"):
        key = f"fidelity/sqnr/{modality}/e2e"
        seen = {n: round(m[key], 2) for n, m in sqnr.items()}
        assert sqnr["ours"][key] > sqnr["rtn"][key], (modality, seen)
        assert sqnr["ours"][key] > sqnr["uniform"][key], (modality, seen)
