"""model.placement: the walker holds one layer at a time on the compute device, whole-model passes stream the
layers, the results do not depend on where the weights live, and bad combinations fail before loading.

The two primitives (``placement._move``, which moves weights, and ``placement.module_device``, which says where a
module lives) are tested for real, with the meta device as the second device. This machine has no GPU, so the
rules built on them (``resident``, ``stream_layers_``, ``place_model_``) are tested with a stand-in for those two
primitives that reports the devices the test names; the CPU run checks that ``offload`` changes no number.
"""

from __future__ import annotations

import pytest
import torch

from masquant.engine import placement
from masquant.adapters.registry import adapter_class_for, get_adapter
from masquant.engine.walker import StackWalker, capture_stack_inputs
from support.cli import cli, loads  # noqa: F401  (fixtures)
from support.tiny import prompts, tiny

CUDA = torch.device("cuda")


@pytest.fixture
def fake_devices(monkeypatch):
    """Modules report the device the test gives them; _move records (module, device) and updates the report."""
    where: dict[int, torch.device] = {}
    moves: list[tuple[int, torch.device]] = []

    def module_device(module):
        return where.get(id(module), torch.device("cpu"))

    def move(module, device):
        moves.append((id(module), torch.device(device)))
        where[id(module)] = torch.device(device)

    monkeypatch.setattr(placement, "module_device", module_device)
    monkeypatch.setattr(placement, "_move", move)
    return where, moves


def test_move_takes_parameters_and_buffers_and_module_device_reads_them():
    layer = torch.nn.BatchNorm1d(3)  # parameters (weight, bias) and buffers (running statistics)
    assert placement.module_device(layer) == torch.device("cpu")
    placement._move(layer, torch.device("meta"))
    assert all(t.device.type == "meta" for t in [*layer.parameters(), *layer.buffers()])
    assert placement.module_device(layer).type == "meta"
    buffers_only = torch.nn.Module()
    buffers_only.register_buffer("b", torch.zeros(1, device="meta"))
    assert placement.module_device(buffers_only).type == "meta"  # no parameter: its first buffer
    mixed = torch.nn.Module()
    mixed.register_buffer("b", torch.zeros(1, device="meta"))
    mixed.w = torch.nn.Parameter(torch.zeros(1))
    assert placement.module_device(mixed) == torch.device("cpu")  # a parameter wins over a buffer
    assert placement.module_device(torch.nn.ReLU()) == torch.device("cpu")  # nothing to hold: CPU


def test_runs_on_keeps_accelerator_layers_where_they_live_and_brings_cpu_layers_to_the_compute_device():
    meta_layer = torch.nn.Linear(2, 2, device="meta")  # stands for a layer living on an accelerator
    assert placement.runs_on(meta_layer, torch.device("cpu")).type == "meta"
    assert placement.runs_on(torch.nn.Linear(2, 2), torch.device("meta")).type == "meta"
    assert placement.runs_on(torch.nn.Linear(2, 2), torch.device("cpu")) == torch.device("cpu")


def test_a_layer_in_cpu_memory_comes_to_the_compute_device_for_its_step_and_goes_back(fake_devices):
    where, moves = fake_devices
    layer = torch.nn.Linear(2, 2)
    with placement.resident(layer, CUDA) as runs_on:
        assert runs_on == CUDA and where[id(layer)] == CUDA
        with placement.resident(layer, CUDA) as again:  # nested: already there, no second move
            assert again == CUDA
        assert where[id(layer)] == CUDA
    assert moves == [(id(layer), CUDA), (id(layer), torch.device("cpu"))]


def test_a_layer_on_another_gpu_runs_where_it_lives(fake_devices):
    where, moves = fake_devices
    layer = torch.nn.Linear(2, 2)
    where[id(layer)] = torch.device("cuda:3")
    with placement.resident(layer, torch.device("cuda:0")) as runs_on:
        assert runs_on == torch.device("cuda:3")
    assert moves == []


def test_cpu_compute_moves_nothing(fake_devices):
    _, moves = fake_devices
    with placement.resident(torch.nn.Linear(2, 2), torch.device("cpu")) as runs_on:
        assert runs_on.type == "cpu"
    assert moves == []


def test_the_walker_holds_exactly_one_layer_at_a_time_in_order(monkeypatch):
    import masquant.engine.walker as walker_mod

    model, processor, cls = tiny("qwen2_5_vl")
    adapter = get_adapter(model)
    layers = list(adapter.decoder_layers())
    events: list[tuple[str, int]] = []
    real = walker_mod.resident

    from contextlib import contextmanager

    @contextmanager
    def spy(layer, device):
        i = layers.index(layer)
        events.append(("in", i))
        with real(layer, device) as d:
            yield d
        events.append(("out", i))

    monkeypatch.setattr(walker_mod, "resident", spy)
    captured = capture_stack_inputs(model, adapter.decoder_stack(), prompts(processor, cls, 2), torch.device("cpu"))
    for step in StackWalker(adapter.decoder_stack(), captured, "cpu", quantized_stream=True):
        assert events[-1] == ("in", step.index)  # the step runs while its layer is held
        step.quant_outputs()
    expected = [e for i in range(len(layers)) for e in (("in", i), ("out", i))]
    assert events == expected


def test_streamed_layers_move_in_for_their_forward_and_out_after_unless_the_walker_holds_them(fake_devices):
    where, moves = fake_devices
    layers = torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)])
    handles = placement.stream_layers_(layers, CUDA)
    x = torch.randn(1, 3)
    for layer in layers:  # the moves are recorded, the weights stay on the CPU, so the forward runs
        x = layer(x)
    assert moves == [(id(layers[0]), CUDA), (id(layers[0]), torch.device("cpu")),
                     (id(layers[1]), CUDA), (id(layers[1]), torch.device("cpu"))]
    moves.clear()
    with placement.resident(layers[0], CUDA):
        layers[0](x)
        layers[0](x)
    assert moves == [(id(layers[0]), CUDA), (id(layers[0]), torch.device("cpu"))]  # the hold's, none per call
    for h in handles:
        h.remove()


def test_offload_places_every_module_but_the_decoder_layers(fake_devices):
    where, moves = fake_devices
    model, _ = adapter_class_for("qwen2_5_vl").tiny(seed=0)
    adapter = get_adapter(model)
    layer_ids = {id(layer) for layer in adapter.decoder_layers()}
    placement.place_model_(model, adapter, "offload", torch.device("cpu"))
    assert {i for i, d in moves if d.type == "cpu"} >= layer_ids  # every layer sent to CPU memory
    assert len(adapter.decoder_layers()) == len(layer_ids)  # the layers are back in the model
    assert {id(layer) for layer in adapter.decoder_layers()} == layer_ids


def test_no_split_classes_keep_decoder_layers_and_encoder_blocks_whole():
    model, _ = adapter_class_for("qwen2_5_vl").tiny(seed=0)
    names = placement.no_split_classes(model, get_adapter(model))
    assert "Qwen2_5_VLDecoderLayer" in names and "Qwen2_5_VLVisionBlock" in names


TINY = ("model=tiny_qwen25vl", "calib=tiny", "calib.n_samples=2", "calib.held_out=2", "eval=fidelity",
        "logger=none", "reference=false")


def test_offload_changes_no_number_and_shares_the_config_hash(cli, tmp_path):
    import json

    results = {}
    for where in ("device", "offload"):
        root = tmp_path / where
        code, out = cli(*TINY, "method=smoothquant", "quant=w8a8", f"model.placement={where}",
                        f"paths.output_root={root}")
        assert code == 0, out[-3000:]
        (metrics,) = root.rglob("metrics.json")
        results[where] = (metrics.parent.name, json.loads(metrics.read_text()))
    (dir_a, a), (dir_b, b) = results["device"], results["offload"]
    assert dir_a == dir_b  # where the weights live is not part of the configuration's identity
    for key in ("fidelity/sqnr/text/e2e", "fidelity/sqnr/vision/e2e", "fidelity/ppl"):
        assert a[key] == b[key], key


@pytest.mark.parametrize("overrides, match", [
    (("model.placement=auto",), "model.placement=auto spreads the model over GPUs"),
    (("model.max_memory_gib=40",), "model.max_memory_gib=40.0 is not read with model.placement=device"),
    (("model.placement=offload", "method=mbq", "quant=w4a8"), "method=mbq back-propagates through the whole model"),
    (("model.placement=gpu",), "placement"),
])
def test_bad_placement_fails_before_the_model_loads(cli, loads, tmp_path, overrides, match):
    code, out = cli(*TINY, "method=rtn", "quant=w8a8", f"paths.output_root={tmp_path}/out", *overrides)
    assert code != 0 and match in out, out[-2000:]
    assert loads == []
