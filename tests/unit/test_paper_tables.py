"""Tables in the paper's layout: golden Markdown / LaTeX from fixed synthetic results, and the values behind them.

Regenerate the goldens after an intended change, then read every changed line before committing:
    MASQUANT_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/test_paper_tables.py
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pandas as pd
import pytest

from masquant.evaluation.runner import _flat_task_metrics
from masquant.reporting.cli import main as report_main
from masquant.reporting.paper import (ABLATION, TABLE1, TABLE2, ablation_table, better_direction,
                                      format_method_label, format_paper_csv, format_paper_latex, format_paper_markdown,
                                      improves_on_paper, load_reference, option_values, paper_table,
                                      parse_method_label, reference_values, same_option_value, seed_of)
from masquant.reporting.paper import _fixed, _signed

GOLDEN = Path(__file__).parents[1] / "golden"
VL3B = "Qwen2.5-VL-3B-Instruct"
# fixed, so that a change of the real defaults does not move the goldens (test_option_values_... checks the real ones)
DEFAULTS = {"masquant": {"learn": "True", "uniform": "False", "lambda_text": "1.0", "lambda_vision": "1.0",
                         "epochs": "2", "deploy": "cmc", "cmc.rank_ratio": "0.2"}}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MASQUANT_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{path} differs (MASQUANT_UPDATE_GOLDEN=1 rewrites it)"


def vl_result(method: str, bits: str, scores: tuple | None, *, label: str | None = None, seed: int | None = None,
              model: str = VL3B, old_ocrbench: bool = False, **extra) -> dict:
    """A result dict as ``metrics.json`` holds it; ``scores`` = (MMMU, OCRBench, VizWiz, SQA, TextVQA) fractions,
    None for a task that was not evaluated."""
    result = {"run/model": model, "run/method": method, "run/method_label": label or method, "run/bits": bits,
              "run/quant": bits.lower(), "run/calib_samples": 128, "run/eval_limit": 0.1, **extra}
    if seed is not None:
        result["run/seed"] = seed
    mmmu, ocr, vizwiz, sqa, textvqa = scores or (None,) * 5
    for key, value in [("eval/mmmu_val/mmmu_acc", mmmu), ("eval/vizwiz_vqa_val/exact_match", vizwiz),
                       ("eval/scienceqa_img/exact_match", sqa), ("eval/textvqa_val/exact_match", textvqa)]:
        if value is not None:
            result[key] = value
    if ocr is not None and old_ocrbench:  # written before hit_rate: the hit rate under lmms-eval's key
        result["eval/ocrbench/ocrbench_accuracy"] = ocr
    elif ocr is not None:  # lmms-eval's hits / 1000 (40 documents) beside our hit rate
        result.update({"eval/ocrbench/hit_rate": ocr, "eval/ocrbench/ocrbench_accuracy": ocr * 40 / 1000,
                       "eval/ocrbench/hits": ocr * 40, "eval/ocrbench/n": 40})
    return result


TABLE1_RESULTS = [
    vl_result("masquant", "W4A8", (0.47, 0.68, 0.63, 0.78, 0.70), seed=0),  # two seeds of one cell
    vl_result("masquant", "W4A8", (0.45, 0.66, 0.61, 0.79, 0.69), seed=1),
    vl_result("dense", "FP16", (0.43, 0.80, 0.70, 0.82, 0.78)),  # no run/seed: seed 0
    vl_result("rtn", "W4A4", (0.25, 0.02, 0.03, 0.30, 0.01)),  # bits the paper does not have
    vl_result("masquant", "W4A8", (0.40, 0.60, 0.55, 0.75, 0.62), label="masquant(learn=False)"),  # an ablation row
    vl_result("smoothquant", "W8A8", (None, 0.79, 0.68, 0.82, 0.77)),  # MMMU not evaluated: no Avg either
    vl_result("awq", "W4A16-g128", (0.42, 0.78, 0.68, 0.81, 0.77), old_ocrbench=True),
    vl_result("rtn", "W4A8", (0.30, 0.20, 0.25, 0.50, 0.15), model="testbed-vl"),  # a model the paper does not have
]

ABLATION_RESULTS = [
    vl_result("dense", "FP16", (0.43, 0.80, 0.70, 0.82, 0.78)),  # not an ablation run: left out
    *(vl_result("masquant", "W4A8", scores, label=label, seed=seed, **{"fidelity/sqnr/text/e2e": text,
                                                                        "fidelity/sqnr/vision/e2e": vision})
      for label, seed, scores, text, vision in [
          ("masquant(epochs=10)", 0, (0.38, 0.70, 0.64, 0.76, 0.66), 9.5, 14.25),
          ("masquant(epochs=1)", 0, (0.39, 0.65, 0.60, 0.80, 0.50), 8.0, 12.0),
          ("masquant", 0, (0.36, 0.67, 0.62, 0.78, 0.66), 9.0, 13.5),
          ("masquant", 1, (0.40, 0.69, 0.64, 0.77, 0.68), 9.25, 13.75),
          ("masquant(epochs=5,lr=0.005)", 0, (0.30, 0.50, 0.50, 0.70, 0.55), 6.0, 10.0),
          ("masquant(cmc.rank_ratio=0.05)", 0, (0.35, 0.66, 0.61, 0.77, 0.64), 8.75, 12.5),
          ("masquant(cmc.rank_ratio=1.0)", 0, (0.37, 0.68, 0.63, 0.78, 0.67), 9.75, 15.0),
      ]),
]


def row(table, **where) -> dict:
    rows = [r for r in table.frame.to_dict("records") if all(r[k] == v for k, v in where.items())]
    assert len(rows) == 1, (where, rows)
    return rows[0]


# ------------------------------------------------------------------------------------------ goldens

def test_table1_markdown_golden():
    check_golden("paper_table1.md", format_paper_markdown(paper_table(TABLE1_RESULTS, TABLE1)) + "\n")


def test_table1_latex_golden():
    check_golden("paper_table1.tex", format_paper_latex(paper_table(TABLE1_RESULTS, TABLE1)) + "\n")


def test_ablation_epochs_markdown_golden():
    table = ablation_table(ABLATION_RESULTS, ["epochs"], DEFAULTS)
    check_golden("paper_ablation_epochs.md", format_paper_markdown(table) + "\n")


def test_ablation_rank_ratio_latex_golden():
    table = ablation_table(ABLATION_RESULTS, ["cmc.rank_ratio"], DEFAULTS)
    check_golden("paper_ablation_rank_ratio.tex", format_paper_latex(table) + "\n")


# ------------------------------------------------------------------------------------------ values

def test_rows_follow_the_papers_order():
    table = paper_table(TABLE1_RESULTS, TABLE1)
    assert list(zip(table.frame["model"], table.frame["bits"], table.frame["method"])) == [
        (VL3B, "FP16", "dense"), (VL3B, "W4A16-g128", "awq"), (VL3B, "W8A8", "smoothquant"),
        (VL3B, "W4A8", "masquant"), (VL3B, "W4A8", "masquant(learn=False)"), (VL3B, "W4A4", "rtn"),
        ("testbed-vl", "W4A8", "rtn")]
    assert [c.label for c in table.columns] == ["MMMU", "OCRBench", "VizWiz", "SQA", "TextVQA", "Avg"]


def test_two_seeds_give_mean_and_sample_std():
    cell = row(paper_table(TABLE1_RESULTS, TABLE1), method="masquant")
    assert cell["n"] == 2
    assert cell["MMMU"] == pytest.approx(46.0) and cell["MMMU std"] == pytest.approx(statistics.stdev([47.0, 45.0]))
    # Avg is averaged per run, then over the seeds
    per_run = [statistics.fmean([47, 68, 63, 78, 70]), statistics.fmean([45, 66, 61, 79, 69])]
    assert cell["Avg"] == pytest.approx(statistics.fmean(per_run))
    assert cell["Avg std"] == pytest.approx(statistics.stdev(per_run))
    single = row(paper_table(TABLE1_RESULTS, TABLE1), method="dense")
    assert single["n"] == 1 and pd.isna(single["MMMU std"])


def test_delta_is_ours_minus_paper_for_a_known_cell():
    cell = row(paper_table(TABLE1_RESULTS, TABLE1), method="masquant")
    assert cell["MMMU paper"] == 46.7  # Table 1, Qwen2.5-VL-3B, MASQuant, W4A8
    assert cell["MMMU delta"] == pytest.approx(46.0 - 46.7)
    assert not improves_on_paper(TABLE1.columns[0], cell["MMMU delta"])
    assert cell["TextVQA paper"] == 69.2 and cell["TextVQA delta"] == pytest.approx(69.5 - 69.2)
    assert improves_on_paper(TABLE1.columns[4], cell["TextVQA delta"])
    awq = row(paper_table(TABLE1_RESULTS, TABLE1), method="awq")  # W4A16-g128 is the paper's W4A16
    assert awq["VizWiz paper"] == 68.1 and awq["VizWiz delta"] == pytest.approx(68.0 - 68.1)


def test_wer_delta_keeps_its_sign_and_lower_is_better():
    omni = {"run/model": "Qwen2.5-Omni-3B", "run/method": "masquant", "run/method_label": "masquant",
            "run/bits": "W4A8", "eval/librispeech_test_other/wer": 3.0, "eval/omni_bench/accuracy": 40.0}
    cell = row(paper_table([omni], TABLE2), method="masquant")
    wer, omnibench = TABLE2.columns[0], TABLE2.columns[3]
    assert cell["LibriSpeech WER"] == 3.0 and cell["LibriSpeech WER paper"] == 3.6
    assert cell["LibriSpeech WER delta"] == pytest.approx(-0.6)
    assert improves_on_paper(wer, -0.6) and not improves_on_paper(wer, 0.6)
    assert better_direction(wer) == "lower" and better_direction(omnibench) == "higher"
    assert cell["OmniBench delta"] == pytest.approx(40.0 - 41.4) and not improves_on_paper(omnibench, -1.4)
    assert "LibriSpeech WER ↓" in format_paper_markdown(paper_table([omni], TABLE2))


def test_cells_without_a_reference_show_a_dash():
    table = paper_table(TABLE1_RESULTS, TABLE1)
    for where in ({"method": "masquant(learn=False)"}, {"bits": "W4A4"}, {"model": "testbed-vl"}):
        cells = row(table, **where)
        assert all(pd.isna(cells[f"{c.label} paper"]) for c in TABLE1.columns)
    sq = row(table, method="smoothquant")  # the paper has MMMU, we do not
    assert pd.isna(sq["MMMU"]) and sq["MMMU paper"] == 42.6 and pd.isna(sq["MMMU delta"]) and pd.isna(sq["Avg"])
    line = next(line for line in format_paper_markdown(table).splitlines() if "| smoothquant |" in line)
    assert "| - | 42.6 | - |" in line


def test_ocrbench_column_reads_hit_rate_not_lmms_evals_hits_over_1000():
    table = paper_table(TABLE1_RESULTS, TABLE1)
    assert row(table, method="dense")["OCRBench"] == pytest.approx(80.0)  # not 100 * 32 / 1000
    assert row(table, method="awq")["OCRBench"] == pytest.approx(78.0)  # old result: fallback to the old key


def test_runner_keeps_lmms_evals_ocrbench_accuracy_and_adds_hit_rate():
    samples = [{"ocrbench_accuracy": {"score": score}} for score in (1, 0, 1, 0)]
    metrics = _flat_task_metrics("ocrbench", {"ocrbench_accuracy,none": 0.002, "ocrbench_accuracy_stderr,none": "N/A"},
                                 samples)
    assert metrics == {"eval/ocrbench/ocrbench_accuracy": 0.002, "eval/ocrbench/hit_rate": 0.5,
                       "eval/ocrbench/hits": 2.0, "eval/ocrbench/n": 4}


def test_csv_has_one_numeric_column_per_quantity():
    lines = format_paper_csv(paper_table(TABLE1_RESULTS[:3], TABLE1)).splitlines()
    assert lines[0].startswith("model,bits,method,calib,limit,n,MMMU,MMMU std,MMMU ci_low,MMMU ci_high,MMMU p,"
                               "MMMU paper,MMMU delta,OCRBench,")
    assert lines[2].startswith(f"{VL3B},W4A8,masquant,128,0.1,2,46.0,1.4,,,,46.7,-0.7,67.0,1.4,,,,67.2,-0.2,")


def test_numbers_round_half_away_from_zero_and_never_show_minus_zero():
    assert [_fixed(v, 2) for v in (9.125, 13.625, -0.125)] == ["9.13", "13.63", "-0.13"]  # format() gives 9.12
    assert [_signed(v, 1) for v in (0.3, -0.7, -0.04, 0.04)] == ["+0.3", "-0.7", "0.0", "0.0"]


def test_latex_escapes_underscores_and_percent():
    result = vl_result("masquant", "W4A8", (0.4, 0.6, 0.5, 0.7, 0.6), label="masquant(cmc.rank_ratio=0.05)",
                       model="my_model 100%")
    tex = format_paper_latex(paper_table([result], TABLE1))
    assert r"my\_model 100\% & W4A8 & masquant(cmc.rank\_ratio=0.05) &" in tex
    assert r"\toprule" in tex and r"\bottomrule" in tex


# ------------------------------------------------------------------------------------------ labels and ablations

def test_parse_method_label_with_dotted_keys_and_values():
    assert parse_method_label("masquant") == ("masquant", {})
    assert parse_method_label("masquant(learn=False,cmc.rank_ratio=0.05)") == (
        "masquant", {"learn": "False", "cmc.rank_ratio": "0.05"})
    method_id, options = parse_method_label("masquant(cmc.roles=['q', 'k', 'up'],lr=5e-3,deploy=per_modality_weights)")
    assert method_id == "masquant" and options == {"cmc.roles": "['q', 'k', 'up']", "lr": "5e-3",
                                                   "deploy": "per_modality_weights"}
    assert format_method_label(method_id, options) == (
        "masquant(cmc.roles=['q', 'k', 'up'],lr=5e-3,deploy=per_modality_weights)")
    for bad in ("masquant(learn=False", "masquant(learn)", "(a=1)"):
        with pytest.raises(ValueError, match="method label"):
            parse_method_label(bad)


def test_labels_written_by_the_pipeline_parse_back_to_their_options():
    from masquant.methods.masquant.config import CMCConfig, MASQuantConfig
    from masquant.runs.store import method_label

    config = MASQuantConfig(learn=False, lambda_vision=0.5, cmc=CMCConfig(rank_ratio=0.05, roles=["q", "k", "v"]))
    method_id, options = parse_method_label(method_label(config))
    values = option_values(config)
    assert method_id == "masquant" and options == {k: values[k] for k in options}
    assert set(options) == {"learn", "lambda_vision", "cmc.rank_ratio", "cmc.roles"}
    assert same_option_value(options["cmc.rank_ratio"], "0.05") and same_option_value(values["epochs"], "2.0")


def test_ablation_rows_are_the_pivot_values_in_blocks_of_the_rest_of_the_label():
    table = ablation_table(ABLATION_RESULTS, ["epochs"], DEFAULTS)
    assert list(zip(table.frame["method"], table.frame["epochs"], table.frame["n"])) == [
        ("masquant", "1", 1), ("masquant", "2 (default)", 2), ("masquant", "10", 1),
        ("masquant(cmc.rank_ratio=0.05)", "2 (default)", 1), ("masquant(cmc.rank_ratio=1.0)", "2 (default)", 1),
        ("masquant(lr=0.005)", "5", 1)]
    default = row(table, method="masquant", epochs="2 (default)")
    assert default["TextVQA paper"] == 67.5 and default["TextVQA"] == pytest.approx(67.0)  # Table 5, epochs=2
    assert default["SQNR vision (dB)"] == pytest.approx(13.625) and default["SQNR vision (dB) std"] > 0
    assert pd.isna(row(table, method="masquant(lr=0.005)")["TextVQA paper"])  # lr is not the paper's setting
    assert [c.label for c in table.columns] == ["TextVQA", "MMMU", "SQA", "Avg", "SQNR text (dB)", "SQNR vision (dB)"]


def test_ablation_without_a_paper_table_drops_the_paper_columns():
    table = ablation_table(ABLATION_RESULTS, ["cmc.rank_ratio"], DEFAULTS)
    assert list(table.frame["cmc.rank_ratio"][:3]) == ["0.05", "0.2 (default)", "1.0"]
    assert all(c.reference is None for c in table.columns) and "TextVQA paper" not in table.frame
    assert "none: the paper has no ablation over cmc.rank_ratio" in table.source


def test_table3_settings_match_per_modality_weights_runs_and_split_the_mixed_model():
    runs = [vl_result("masquant", "W4A8", (0.3, 0.6, 0.5, 0.7, 0.6), label=label)
            for label in ("masquant(uniform=True,deploy=per_modality_weights)",
                          "masquant(learn=False,deploy=per_modality_weights)", "masquant(uniform=True)")]
    table = ablation_table(runs, ["uniform", "learn"], DEFAULTS)
    assert row(table, uniform="True", method="masquant(deploy=per_modality_weights)")["TextVQA paper"] == 65.0
    assert row(table, uniform="False (default)", learn="False")["MMMU paper"] == 28.9  # "mas", VL-3B column
    assert pd.isna(row(table, method="masquant")["TextVQA paper"])  # deployed with CMC: not Table 3's setting
    references = reference_values(load_reference(ABLATION.reference_file))
    assert references[(("3", "uniform+opt"), "Qwen2.5-Omni-3B", "masquant", "w4a8", "librispeech_wer")] == 6.0


def test_ablation_needs_a_label_that_sets_the_pivot():
    with pytest.raises(ValueError, match=r"no run's method label sets \['alpha'\]"):
        ablation_table(ABLATION_RESULTS, ["alpha"], DEFAULTS)


def test_absent_seed_is_seed_0():
    assert seed_of({}) == 0 and seed_of({"run/seed": 3}) == 3


def test_every_reference_file_is_shipped_with_the_package():
    shipped = {p.name for p in (Path(__file__).parents[2] / "masquant/reporting/reference").glob("*.csv")}
    assert {TABLE1.reference_file, TABLE2.reference_file, ABLATION.reference_file} <= shipped
    assert len(reference_values(load_reference(TABLE1.reference_file))) == 32 * 6


# ------------------------------------------------------------------------------------------ CLI

def write_runs(root: Path, results: list[dict]) -> None:
    for i, result in enumerate(results):
        run_dir = root / str(result["run/model"]) / str(result["run/method"]) / f"{result['run/quant']}-{i:04d}"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text(json.dumps(result))


def test_cli_paper_table_ignores_half_written_runs_and_writes_atomically(tmp_path, capsys):
    root = tmp_path / "runs"
    write_runs(root, TABLE1_RESULTS)
    partial = root / VL3B / "masquant" / ".w4a8-0099.partial-1"  # died after metrics.json, before the rename
    partial.mkdir(parents=True)
    (partial / "metrics.json").write_text(json.dumps(vl_result("masquant", "W4A8", (0.0,) * 5, seed=2)))

    assert report_main([str(root), "--paper", "table1"]) == 0
    assert capsys.readouterr().out == format_paper_markdown(paper_table(TABLE1_RESULTS, TABLE1)) + "\n"

    out = tmp_path / "tables" / "table1.tex"
    assert report_main([str(root), "--paper", "table1", "--format", "latex", "--model", VL3B, "--out", str(out)]) == 0
    assert "testbed-vl" not in out.read_text() and r"$46.0 \pm 1.4$" in out.read_text()
    assert [p.name for p in out.parent.iterdir()] == ["table1.tex"]  # no temporary file left


def test_cli_ablation_pivot(tmp_path, capsys):
    root = tmp_path / "runs"
    write_runs(root, ABLATION_RESULTS)
    assert report_main([str(root), "--pivot", "cmc.rank_ratio", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("model,bits,method,cmc.rank_ratio,calib,limit,n,TextVQA,TextVQA std,TextVQA ci_low,"
                               "TextVQA ci_high,TextVQA p,MMMU,")
    # the registry's MASQuantConfig gives the default that the label leaves out
    assert [line.split(",")[3] for line in lines[1:4]] == ["0.05", "0.2 (default)", "1.0"]
    assert report_main([str(root), "--pivot", "alpha"]) == 1
    with pytest.raises(SystemExit):
        report_main([str(root), "--paper", "table1", "--pivot", "epochs"])
    with pytest.raises(SystemExit):
        report_main([str(root), "--paper", "ablation"])


# ------------------------------------------------------------------------------------------ stand-in (testbed)

TESTBED_RESULTS = [
    vl_result("dense", "FP16", (0.40, 0.35, 0.75, 0.50, 0.45), model="testbed-vl"),
    vl_result("rtn", "W8A8", (0.35, 0.30, 0.70, 0.50, 0.40), model="testbed-vl"),
    vl_result("masquant", "W8A8", (0.40, 0.35, 0.75, 0.45, 0.45), label="masquant(lr=0.005)", model="testbed-vl"),
    vl_result("masquant", "W4A8", (0.30, 0.10, 0.40, 0.50, 0.20), label="masquant(lr=0.005,epochs=1)",
              model="testbed-vl"),
]


def test_stand_in_table_markdown_and_latex_golden(tmp_path, capsys):
    """The testbed's rows beside Qwen2.5-VL-3B's numbers: ``lr`` ignored for the match, ``epochs`` not (no paper row)."""
    root = tmp_path / "runs"
    write_runs(root, TESTBED_RESULTS)
    args = [str(root), "--paper", "table1", "--reference-model", "Qwen2.5-VL-3B", "--reference-ignore", "lr"]
    assert report_main(args) == 0
    check_golden("paper_table1_stand_in.md", capsys.readouterr().out)
    assert report_main([*args, "--format", "latex"]) == 0
    check_golden("paper_table1_stand_in.tex", capsys.readouterr().out)


def test_stand_in_values():
    from masquant.reporting.paper import StandIn

    table = paper_table(TESTBED_RESULTS, TABLE1, stand_in=StandIn({"testbed-vl": "Qwen2.5-VL-3B"}, ("lr",)))
    rows = {(r["bits"], r["method"]): r for r in table.frame.to_dict("records")}
    assert rows[("W8A8", "masquant(lr=0.005)")]["MMMU paper"] == 46.6  # Table 1, 3B, MASQuant W8A8
    assert rows[("W8A8", "masquant(lr=0.005)")]["MMMU delta"] == pytest.approx(40.0 - 46.6)
    assert pd.isna(rows[("W4A8", "masquant(lr=0.005,epochs=1)")]["MMMU paper"])  # epochs is a setting: no match
    assert "stand-in: testbed-vl beside Qwen2.5-VL-3B" in table.source
    plain = paper_table(TESTBED_RESULTS, TABLE1)  # without a stand-in the testbed has no published numbers
    assert plain.frame["MMMU paper"].isna().all()


# ------------------------------------------------------------------------------------------ uncertainty

def _with_documents(result: dict, task: str, values: list[float]) -> dict:
    """A result carrying what the runner writes per task: per-document scores and the interval over them."""
    from masquant.evaluation.intervals import interval

    lo, hi, method = interval(values)
    return {**result, f"eval/{task}/doc_ids": list(range(len(values))), f"eval/{task}/doc_values": values,
            f"eval/{task}/ci95": [lo, hi], f"eval/{task}/ci_method": method}


def test_cells_carry_the_interval_and_a_star_where_the_paired_test_separates_a_row_from_rtn():
    from masquant.evaluation.intervals import wilson

    rtn_docs = [1.0] * 30 + [0.0] * 70
    better = [1.0] * 60 + [0.0] * 40  # every RTN hit and 30 more: McNemar 30 vs 0 discordant
    same = [0.0] * 30 + [1.0] * 30 + [0.0] * 40  # as many hits as RTN, on other documents: 30 vs 30
    rows = [_with_documents(vl_result(m, "W4A8", (None, None, None, None, sum(d) / 100)), "textvqa_val", d)
            for m, d in (("rtn", rtn_docs), ("masquant", better), ("smoothquant", same))]
    table = paper_table(rows, TABLE1)
    frame = table.frame.set_index("method")
    lo, hi = wilson(60, 100)
    assert frame.loc["masquant", "TextVQA ci_low"] == pytest.approx(100 * lo)
    assert frame.loc["masquant", "TextVQA ci_high"] == pytest.approx(100 * hi)
    assert frame.loc["masquant", "TextVQA p"] < 1e-8 and frame.loc["smoothquant", "TextVQA p"] == pytest.approx(1.0)
    assert pd.isna(frame.loc["rtn", "TextVQA p"])  # the reference row itself
    md = format_paper_markdown(table)
    half = _fixed(100 * (hi - lo) / 2, 1)
    assert f"| 60.0 ± {half}* |" in md and "| 30.0 ± " in md and "*" not in md.split("smoothquant")[1].split("\n")[0]
    assert f"60.0 \\pm {half}^{{*}}" in format_paper_latex(table)
    # another reference row: against MASQuant, RTN is the one that differs and MASQuant has no test
    against = paper_table(rows, TABLE1, compared_with="masquant")
    frame = against.frame.set_index("method")
    assert frame.loc["rtn", "TextVQA p"] < 1e-8 and pd.isna(frame.loc["masquant", "TextVQA p"])
    assert "the masquant row of the same bits" in format_paper_markdown(against)


def test_the_average_interval_adds_the_tasks_half_widths_in_quadrature():
    docs = {"textvqa_val": [1.0] * 40 + [0.0] * 60, "scienceqa_img": [1.0] * 70 + [0.0] * 30}
    result = vl_result("rtn", "W4A8", (0.3, 0.2, 0.5, 0.7, 0.4))
    for task, values in docs.items():
        result = _with_documents(result, task, values)
    table = paper_table([result], TABLE1)
    row = table.frame.iloc[0]
    assert pd.isna(row["Avg ci_low"])  # MMMU, OCRBench and VizWiz carry no interval: no Avg interval either
    for task in ("mmmu_val", "ocrbench", "vizwiz_vqa_val"):
        result = _with_documents(result, task, [1.0] * 50 + [0.0] * 50)
    row = paper_table([result], TABLE1).frame.iloc[0]
    halves = [(row[f"{c} ci_high"] - row[f"{c} ci_low"]) / 2 for c in ("MMMU", "OCRBench", "VizWiz", "SQA", "TextVQA")]
    assert (row["Avg ci_high"] - row["Avg ci_low"]) / 2 == pytest.approx(sum(h * h for h in halves) ** 0.5 / 5)


def test_ablation_rows_are_tested_against_the_row_before():
    base = vl_result("masquant", "W4A8", None, label="masquant(epochs=1)")
    runs = [_with_documents({**base, "run/method_label": f"masquant(epochs={e})"}, "textvqa_val", d)
            for e, d in ((1, [1.0] * 20 + [0.0] * 80), (2, [1.0] * 50 + [0.0] * 50), (5, [1.0] * 51 + [0.0] * 49))]
    for r, d in zip(runs, (0.2, 0.5, 0.51)):
        r["eval/textvqa_val/exact_match"] = d
    frame = ablation_table(runs, ["epochs"], DEFAULTS).frame
    assert pd.isna(frame["TextVQA p"].iloc[0])
    assert frame["TextVQA p"].iloc[1] < 1e-6 and frame["TextVQA p"].iloc[2] == pytest.approx(1.0)


def test_the_legend_says_which_integer_grid_each_bit_width_uses():
    """One grid per bit width is stated once; two grids at one width (AWQ symmetric beside asymmetric) name their rows."""
    from masquant.reporting.paper import format_paper_markdown, grids_text, paper_table

    def run(method, bits, grid):
        return {"run/model": "m", "run/method": method.split("(")[0], "run/method_label": method, "run/bits": bits,
                "run/grid": grid, "run/calib_samples": 16, "run/eval_limit": None, "fidelity/sqnr/text/e2e": 10.0}

    runs = [run("rtn", "W4A8", "W sym narrow / A sym narrow token dyn"), run("awq", "W4A16-g128", "W asym g128 / A16"),
            run("awq(recipe=official)", "W4A16-g128", "W sym narrow g128 / A16")]
    assert grids_text(runs) == ("W4A16-g128: W asym g128 / A16 (awq), W sym narrow g128 / A16 (awq(recipe=official)); "
                                "W4A8: W sym narrow / A sym narrow token dyn")
    assert "Integer grids: W4A16-g128: W asym g128 / A16 (awq)" in format_paper_markdown(paper_table(runs, references={}))
