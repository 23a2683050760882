import math

import pandas as pd

from masquant.reporting.table import format_markdown, results_frame
from masquant.reporting.cli import main as report_main
import json


def _metrics(method, text_sqnr, textvqa, ocr):
    """A result as written today: OCRBench's hit rate under ``hit_rate``, lmms-eval's hits / 1000 kept beside it."""
    return {"run/model": "m", "run/method": method, "run/bits": "W4A8", "run/calib_samples": 16, "run/eval_limit": 0.1,
            "eval/textvqa_val/exact_match": textvqa, "eval/ocrbench/hit_rate": ocr, "eval/ocrbench/hits": 3.0,
            "eval/ocrbench/n": 12, "eval/ocrbench/ocrbench_accuracy": 3.0 / 1000, "fidelity/sqnr/text/e2e": text_sqnr}


def test_results_frame_columns_and_average():
    df = results_frame([_metrics("rtn", 20.0, 0.5, 0.25), _metrics("dense", math.inf, 0.75, 0.5)])
    assert list(df["TextVQA"]) == [50.0, 75.0] and list(df["OCRBench"]) == [25.0, 50.0]
    assert list(df["Avg"]) == [37.5, 62.5]
    assert list(df["limit"]) == [0.1, 0.1]
    md = format_markdown(df)
    assert "| m | rtn | W4A8 | 16 | 0.10 | 50.00 | 25.00 | 37.50 | 20.00 |" in md
    assert "inf" in md


def test_results_frame_says_which_grid_each_row_uses():
    """Symmetric or asymmetric weights (AWQ's official grid is asymmetric, llm-compressor's symmetric), per row."""
    from masquant.quant.scheme import QuantScheme

    sym = QuantScheme("s", 4, 16, w_granularity="group", w_group_size=64)
    asym = QuantScheme("a", 4, 16, w_symmetric=False, w_granularity="group", w_group_size=64)
    rows = [{**_metrics("awq", 20.0, 0.5, 0.25), "run/grid": s.grid} for s in (sym, asym)]
    assert list(results_frame(rows)["grid"]) == ["W sym narrow g64 / A16", "W asym g64 / A16"]


def test_ocrbench_falls_back_to_the_old_key_only_without_hit_rate():
    old = {"run/model": "m", "run/method": "rtn", "run/bits": "W4A8", "eval/ocrbench/ocrbench_accuracy": 0.25,
           "eval/ocrbench/ocrbench_hits": 3.0}  # written before hit_rate existed: the hit rate under lmms-eval's key
    df = results_frame([_metrics("rtn", 20.0, 0.5, 0.25), old])
    assert list(df["OCRBench"]) == [25.0, 25.0]


def test_report_cli_reads_only_finished_runs(tmp_path, capsys):
    done = tmp_path / "runs" / "m" / "rtn" / "w4a8-abc"
    done.mkdir(parents=True)
    (done / "metrics.json").write_text(json.dumps(_metrics("rtn", 20.0, 0.5, 0.25)))
    partial = tmp_path / "runs" / "m" / "rtn" / ".w4a8-def.partial-1"
    partial.mkdir(parents=True)  # a run that died after writing its metrics but before the rename
    (partial / "metrics.json").write_text(json.dumps(_metrics("smoothquant", 20.0, 0.5, 0.25)))
    assert report_main([str(tmp_path / "runs"), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2 and "rtn" in out and "smoothquant" not in out
    assert report_main([str(tmp_path / "missing")]) == 2  # no such folder: said so, not "no runs"
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty")]) == 1


def test_method_label_names_non_default_options():
    from masquant.methods.masquant.config import CMCConfig, MASQuantConfig
    from masquant.runs.store import method_label

    assert method_label(MASQuantConfig()) == "masquant"
    label = method_label(MASQuantConfig(learn=False, deploy="per_modality_weights", cmc=CMCConfig(rank_ratio=1.0)))
    assert label == "masquant(learn=False,deploy=per_modality_weights,cmc.rank_ratio=1.0)"


def test_methods_register_themselves_and_unknown_ids_list_the_valid_ones():
    import pytest

    from masquant.methods.registry import get_config_class, get_method_class, method_ids

    assert {"dense", "rtn", "smoothquant", "masquant"} <= set(method_ids())
    assert get_method_class("smoothquant").id == "smoothquant"
    assert get_config_class("masquant").__name__ == "MASQuantConfig"
    with pytest.raises(KeyError, match="valid methods: .*masquant"):
        get_method_class("quarrot")


def test_run_table_shows_each_tasks_interval_in_its_cell_and_keeps_it_apart_in_the_frame():
    m = {**_metrics("rtn", 20.0, 0.5, 0.25), "eval/textvqa_val/ci95": [0.40, 0.60], "eval/ocrbench/ci95": [0.15, 0.35]}
    df = results_frame([m])
    assert math.isclose(df["TextVQA ±"].iloc[0], 10.0) and math.isclose(df["OCRBench ±"].iloc[0], 10.0)
    assert math.isclose(df["Avg ±"].iloc[0], math.sqrt(200) / 2)  # two tasks' half-widths in quadrature, halved
    md = format_markdown(df)
    assert "| 50.00 ± 10.00 | 25.00 ± 10.00 | 37.50 ± 7.07 |" in md and "TextVQA ±" not in md
    assert "TextVQA ±" in df.to_csv()  # CSV keeps the interval in its own column


def test_run_table_marks_a_task_that_differs_from_its_reference_row_by_a_paired_test():
    from masquant.reporting.table import add_paired_tests

    def run(method: str, right: list[int]) -> dict:
        n = len(right)
        return {**_metrics(method, 20.0, sum(right) / n, 0.25), "eval/textvqa_val/doc_ids": list(range(n)),
                "eval/textvqa_val/doc_values": [float(x) for x in right]}

    ref = run("rtn", [0] * 40)
    better = run("awq", [1] * 12 + [0] * 28)  # 12 discordant documents, all one way: McNemar p = 2 / 2^12
    same = run("mbq", [1] * 2 + [0] * 38)  # 2 discordant: p = 0.5
    results = [ref, better, same]
    df = add_paired_tests(results_frame(results), results, [None, 0, 0])
    assert pd.isna(df["TextVQA p"].iloc[0])
    assert math.isclose(df["TextVQA p"].iloc[1], 2 / 2 ** 12) and math.isclose(df["TextVQA p"].iloc[2], 0.5)
    lines = format_markdown(df).splitlines()
    assert "| 30.00* |" in lines[3] and "| 5.00 |" in lines[4] and "*" not in lines[2]
