"""Plots beside the tables: the data behind them, and PNG files written with the Agg backend."""

import pytest
import torch

from masquant.methods.masquant.analysis import cumulative_energy, delta_w_energy
from masquant.quant.scheme import QuantScheme
from masquant.reporting.paper import TABLE1, paper_table
from masquant.reporting.plots import (layer_sqnr_frames, plot_channel_absmax, plot_layer_sqnr, plot_rank_energy,
                                      plot_table_bars)

PNG = b"\x89PNG\r\n\x1a\n"


def _result(method, bits, mmmu, layers):
    return {"run/model": "Qwen2.5-VL-3B-Instruct", "run/method": method, "run/method_label": method, "run/bits": bits,
            "run/calib_samples": 128, "run/eval_limit": 0.1, "eval/mmmu_val/mmmu_acc": mmmu,
            **{f"fidelity/sqnr/vision/layer_{i}": v for i, v in enumerate(layers)}, "fidelity/sqnr/vision/e2e": 9.0}


RESULTS = [_result("rtn", "W4A8", 0.30, [20.0, 15.0, 10.0]), _result("masquant", "W4A8", 0.45, [22.0, 19.0, 16.0]),
           {**_result("dense", "FP16", 0.42, []), "fidelity/sqnr/vision/e2e": float("inf")}]


def test_layer_sqnr_frames_have_one_column_per_run_and_one_row_per_layer():
    frames = layer_sqnr_frames(RESULTS)
    assert list(frames) == ["vision"]
    frame = frames["vision"]
    assert list(frame.columns) == ["rtn W4A8", "masquant W4A8"] and list(frame.index) == [0, 1, 2]
    assert frame.loc[2, "masquant W4A8"] == 16.0


def test_every_plot_writes_a_png(tmp_path):
    table = paper_table(RESULTS, TABLE1)
    paths = [plot_table_bars(table, "MMMU", tmp_path / "bars.png"),
             plot_layer_sqnr(layer_sqnr_frames(RESULTS)["vision"], tmp_path / "layers.png"),
             plot_channel_absmax({"text": torch.rand(64) + 1, "vision": torch.rand(64)}, tmp_path / "absmax.png"),
             plot_rank_energy({"plain": [0.5, 0.8, 1.0]}, tmp_path / "energy.png", rank=2)]
    for path in paths:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    assert plot_table_bars(table, "OCRBench", tmp_path / "none.png") is None  # no value: no figure
    assert not (tmp_path / "none.png").exists()


def test_cumulative_energy_of_a_known_matrix():
    energy = cumulative_energy(torch.diag(torch.tensor([4.0, 3.0])))
    assert energy.tolist() == pytest.approx([16 / 25, 1.0])


def test_whitening_concentrates_the_energy_where_the_activations_are():
    """ΔW seen through activations confined to 4 channels has (almost) all its energy in rank 4 once whitened."""
    torch.manual_seed(0)
    W = torch.randn(32, 16)
    X = torch.zeros(200, 16)
    X[:, :4] = torch.randn(200, 4)
    scheme = QuantScheme(name="w4a8", w_bits=4, a_bits=8)
    curves = delta_w_energy(W, torch.ones(16), torch.ones(16) * 0.5, X, scheme, damping=1e-8)
    plain, whitened = curves["ΔW (plain SVD)"], curves["T ΔW (whitened)"]
    assert whitened[3] > 0.999 and plain[3] < 0.9
