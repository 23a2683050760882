"""sweep.objective: checked before anything runs, returned by main, with the direction Optuna needs."""

import pytest

from masquant.app.objective import direction, objective_problems, objective_value

TINY = ["model=tiny_qwen25vl", "calib=tiny", "eval=fidelity", "calib.n_samples=2", "calib.held_out=1"]


@pytest.mark.parametrize("objective,match", [
    ("fidelity/sqnr/all/e2e", None),
    ("fidelity/sqnr/vision/layer_1", None),
    ("fidelity/sqnr/audio/e2e", "no 'audio' tokens in this run"),
    ("fidelity/ppl_delta", None),
    ("eval/avg", "runs no benchmark"),
    ("eval/textvqa_val/exact_match", "runs no benchmark"),
    ("sqnr", "is not a metric a run writes; valid forms: fidelity/sqnr/<all|modality>/<e2e|layer_i>"),
])
def test_objective_problems(compose_cfg, objective, match):
    problems = objective_problems(compose_cfg(*TINY, f"sweep.objective={objective}"))
    assert problems == [] if match is None else match in problems[0]


def test_objective_needs_what_it_measures(compose_cfg):
    assert "needs eval.fidelity=true" in objective_problems(
        compose_cfg(*TINY, "sweep.objective=fidelity/sqnr/all/e2e", "eval.fidelity=false"))[0]
    assert "needs eval.ppl=true" in objective_problems(compose_cfg(*TINY, "sweep.objective=fidelity/ppl",
                                                                   "eval.ppl=false"))[0]
    testbed = compose_cfg("sweep.objective=eval/ocrbench/hit_rate", "eval.tasks=[textvqa_val]")
    assert "task 'ocrbench' is not in eval.tasks=['textvqa_val']" in objective_problems(testbed)[0]
    assert objective_problems(compose_cfg(*TINY)) == []  # no objective: nothing to check


def test_direction_and_value():
    assert direction("fidelity/sqnr/all/e2e") == "maximize" and direction(None) == "maximize"
    assert direction("fidelity/ppl_delta") == "minimize" and direction("eval/librispeech_test_other/wer") == "minimize"
    metrics = {"eval/textvqa_val/exact_match": 0.5, "eval/mmmu_val/mmmu_acc": 0.25, "fidelity/ppl": 12.0}
    assert objective_value("eval/avg", metrics) == pytest.approx(37.5)
    assert objective_value("fidelity/ppl", metrics) == 12.0 and objective_value(None, metrics) is None
    with pytest.raises(KeyError, match="fidelity/ppl_delta"):
        objective_value("fidelity/ppl_delta", metrics)
