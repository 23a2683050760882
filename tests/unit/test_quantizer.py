import pytest
import torch

from masquant.quant import QuantScheme, fake_quant_asym, fake_quant_sym, quantize_activation, quantize_weight
from masquant.quant.quantizer import round_ste, sqnr_db


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_symmetric_grid_size_and_error_bound(bits):
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    q = fake_quant_sym(x, bits, dim=-1)
    scale = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    levels = torch.round(q / scale)
    # integer grid [-(2^(b-1)-1), 2^(b-1)-1], at most 2^b - 1 distinct levels per row
    assert levels.abs().max() <= 2 ** (bits - 1) - 1
    assert torch.allclose(levels * scale, q, atol=1e-6)
    for row in levels:
        assert row.unique().numel() <= 2**bits - 1
    # round-to-nearest error is at most half a step
    assert ((q - x).abs() <= scale / 2 + 1e-6).all()
    # the row's abs-max is exactly representable
    idx = x.abs().argmax(-1)
    assert torch.allclose(q.gather(1, idx[:, None]), x.gather(1, idx[:, None]), atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_asymmetric_grid_and_error_bound(bits):
    torch.manual_seed(1)
    x = torch.rand(8, 32) * 3 + 0.5  # all positive: asymmetric uses the full grid
    q = fake_quant_asym(x, bits, dim=-1)
    xmin = x.amin(-1, keepdim=True).clamp(max=0)
    xmax = x.amax(-1, keepdim=True)
    scale = (xmax - xmin) / (2**bits - 1)
    assert ((q - x).abs() <= scale / 2 + 1e-5).all()
    for row in q:
        assert row.unique().numel() <= 2**bits


def test_asymmetric_beats_symmetric_on_one_sided_data():
    torch.manual_seed(2)
    x = torch.rand(32, 128)
    e_sym = (fake_quant_sym(x, 4) - x).pow(2).mean()
    e_asym = (fake_quant_asym(x, 4) - x).pow(2).mean()
    assert e_asym < 0.5 * e_sym


def test_per_group_weight_quantization_is_local_to_each_group():
    torch.manual_seed(3)
    W = torch.randn(4, 256)
    W[:, 0] = 100.0  # an outlier in group 0 only
    scheme = QuantScheme("g", w_bits=4, w_granularity="group", w_group_size=128, w_symmetric=False)
    Wq = quantize_weight(W, scheme)
    err_g1 = (Wq[:, 128:] - W[:, 128:]).abs().max()
    per_channel = quantize_weight(W, QuantScheme("c", w_bits=4))
    assert err_g1 < 0.2 * (per_channel[:, 128:] - W[:, 128:]).abs().max()
    # quantizing one group alone gives the same result
    alone = fake_quant_asym(W[:, 128:], 4, dim=-1)
    assert torch.allclose(Wq[:, 128:], alone)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("in_features,group", [(576, 128), (100, 64), (48, 128)])
def test_partial_last_group_is_its_own_group(in_features, group, symmetric):
    """A width that is not a multiple of the group size (the testbed's 576 at g128): the last group is
    smaller, with its own scale; every element lies on its group's grid and the error is at most half a step."""
    torch.manual_seed(5)
    W = torch.randn(6, in_features) * torch.linspace(0.2, 3, in_features)
    bits = 4
    scheme = QuantScheme("g", w_bits=bits, w_granularity="group", w_group_size=group, w_symmetric=symmetric)
    Wq = quantize_weight(W, scheme)
    for start in range(0, in_features, group):
        cols = slice(start, min(start + group, in_features))
        w, q = W[:, cols], Wq[:, cols]
        if symmetric:
            step = w.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
            codes, bound = q / step, step / 2  # integers in [-7, 7]
            assert codes.abs().max() <= 2 ** (bits - 1) - 1 + 1e-4
        else:
            lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
            step = (hi - lo) / (2**bits - 1)
            zero = (-lo / step).round()
            codes, bound = q / step, step  # (codes + zero) are integers in [0, 15]; zero rounding costs up to a step
            assert (codes + zero).min() >= -1e-3 and (codes + zero).max() <= 2**bits - 1 + 1e-3
        assert torch.allclose(codes, codes.round(), atol=1e-3)
        assert ((q - w).abs() <= bound + 1e-5).all()
    torch.testing.assert_close(Wq[:, -(in_features % group or group):],
                               quantize_weight(W[:, -(in_features % group or group):],
                                               QuantScheme("t", w_bits=bits, w_symmetric=symmetric)))


def test_per_token_activation_and_static_scale():
    torch.manual_seed(4)
    X = torch.randn(2, 5, 16)
    X[0, 0] *= 50
    s = QuantScheme("a", w_bits=16, a_bits=8)
    Xq = quantize_activation(X, s)
    # per token: the outlier token does not hurt the other tokens
    assert (Xq[1] - X[1]).abs().max() < 0.05
    static = quantize_activation(X, s, static_scale=torch.tensor(0.01))
    assert static.abs().max() <= 127 * 0.01 + 1e-6


def test_dense_scheme_is_identity_and_clip_ratio():
    x = torch.randn(3, 8)
    assert quantize_activation(x, QuantScheme()) is x
    clipped = fake_quant_sym(x, 8, clip_ratio=0.5)
    assert clipped.abs().max() <= 0.5 * x.abs().max() + 1e-6


def test_ste_passes_gradients_to_input_and_range():
    x = torch.randn(4, 8, requires_grad=True)
    y = fake_quant_sym(x * 1.0, 4, ste=True)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    z = torch.tensor([0.3, 1.7], requires_grad=True)
    round_ste(z).sum().backward()
    assert torch.equal(z.grad, torch.ones(2))


@pytest.mark.parametrize("bad", [dict(w_bits=1), dict(a_bits=17), dict(w_granularity="row"), dict(a_clip_ratio=0.0)])
def test_scheme_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        QuantScheme("bad", **bad)


def test_sqnr_falls_as_bits_fall():
    torch.manual_seed(5)
    x = torch.randn(64, 64)
    values = [sqnr_db(x, fake_quant_sym(x, b)) for b in (8, 6, 4, 3)]
    assert values == sorted(values, reverse=True)
    assert abs(values[0] - values[1] - 12.0) < 2.0  # ~6 dB per bit


@pytest.mark.parametrize("bits", [4, 8])
def test_full_integer_range_uses_the_extra_level(bits):
    """int_range=full: codes in [-2^(b-1), 2^(b-1)-1] with scale absmax/((2^b-1)/2) (compressed-tensors' grid);
    narrow (default): [-(2^(b-1)-1), 2^(b-1)-1] with scale absmax/(2^(b-1)-1)."""
    torch.manual_seed(7)
    W = torch.randn(16, 64)
    full = QuantScheme("f", w_bits=bits, int_range="full")
    narrow = QuantScheme("n", w_bits=bits)
    assert narrow.int_range == "narrow" and full.int_range == "full"
    for scheme, lo, hi, div in ((full, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, (2**bits - 1) / 2),
                                (narrow, -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1, 2 ** (bits - 1) - 1)):
        Wq = quantize_weight(W, scheme)
        step = W.abs().amax(1, keepdim=True) / div
        codes = Wq / step
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.min() >= lo - 1e-4 and codes.max() <= hi + 1e-4
    # at 4 bits the full grid's 7% finer step outweighs clamping the positive maximum (at 8 bits it does not)
    err = {s.int_range: (quantize_weight(W, s) - W).pow(2).mean() for s in (full, narrow)}
    assert (err["full"] < err["narrow"]) == (bits == 4), err
    with pytest.raises(ValueError, match="int_range"):
        QuantScheme("bad", w_bits=4, int_range="wide")
