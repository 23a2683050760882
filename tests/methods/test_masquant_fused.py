"""The fused paths of MASQuant's learning (docs/methods/masquant.md, "Speed") against the composed autograd forms.

The fused straight-through fake quantization (``grid.SymFakeQuantSTE``), the fused Qw(diag(s) W) with its gradient
w.r.t. s (``core.SmoothedWeightQuantSTE``) and down_proj's weight rounded once (``MASLearnLinear``) must give the
values and gradients of the forms they replace, up to float rounding, also with ties in a row's abs-max, zero rows,
negative scales, the full grid and clip ratios.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from masquant.methods.masquant import core
from masquant.methods.masquant.method import MASLearnLinear
from masquant.quant import grid as grid_mod
from masquant.quant.grid import IntGrid, SymFakeQuantSTE, fake_quantize_range, fake_quantize_range_autograd
from masquant.quant.linear import ModalityRouter
from masquant.quant.quantizer import quantize_activation
from masquant.quant.scheme import QuantScheme

W4A8 = QuantScheme("w4a8", 4, 8)


def _composed_weight(W, s, scheme):
    """Qw(diag(s) W) with ste, per output channel, from autograd operations only (the reference)."""
    grid = IntGrid(scheme.w_bits, True, scheme.int_range)
    return fake_quantize_range_autograd(core.smooth_weight(W, s), grid, scheme.w_clip_ratio, 1, ste=True)


def _weight_with_ties(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(40, 24, generator=g, dtype=dtype)
    s = torch.rand(24, generator=g, dtype=dtype) + 0.5
    s[5] = -s[5]  # a negative scale
    s[7] = s[9] = s.abs().max()
    W[3, 7] = W[3].abs().max() * 2  # row 3: |x| ties between columns 7 and 9
    W[3, 9] = -W[3, 7]
    W[4] = 0.0  # a zero row (its scale is floored at EPS)
    return W, s


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_smoothed_weight_quant_matches_composed_form(dtype):
    W, s0 = _weight_with_ties(dtype)
    x = core.smooth_weight(W, s0).abs()
    assert int((x[3] == x[3].max()).sum()) == 2  # the tie is there
    g = torch.randn(W.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    results = []
    for fn in (lambda s: core.smooth_quantize_weight(W, s, W4A8), lambda s: _composed_weight(W, s, W4A8)):
        s = s0.clone().requires_grad_()
        y = fn(s)
        (y * g).sum().backward()
        results.append((y.detach(), s.grad))
    assert core.fused_weight_quant_applies(W4A8, s0.clone().requires_grad_(), W)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(results[0][0], results[1][0], rtol=tol, atol=tol)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=tol, atol=tol * 10)
    assert results[1][1].abs().max() > 1  # a gradient that matters


def test_fused_smoothed_weight_quant_without_ties_and_falls_back_outside_its_grid():
    W, s0 = _weight_with_ties()
    W[3, 9] = 0.0  # no tie left
    W[4] = torch.arange(24, dtype=W.dtype) * 0.01 + 0.05  # no zero row: the sparse abs-max path
    g = torch.randn(W.shape, dtype=torch.float64)
    for scheme in (W4A8, QuantScheme("w4a8f", 4, 8, int_range="full"), QuantScheme("w8a8c", 8, 8, w_clip_ratio=0.9)):
        grads = []
        for fn in (core.smooth_quantize_weight, _composed_weight):
            s = s0.clone().requires_grad_()
            (fn(W, s, scheme) * g).sum().backward()
            grads.append(s.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
    assert not core.fused_weight_quant_applies(QuantScheme("f", 4, 8, int_range="full"), s0.requires_grad_(), W)


def test_fused_smoothed_weight_quant_with_a_zero_scale_and_float32_mask_of_large_weights():
    """A column with s_j = 0 (scale_floor=0 allows it) gets the composed form's gradient (no 0/0 from the abs-max
    term, whose |W_rj| is taken as a_r / |s_j|); and a wide float32 weight with many rows, as in the learning."""
    W, s0 = _weight_with_ties()
    s0[2] = 0.0
    g = torch.randn(W.shape, generator=torch.Generator().manual_seed(5), dtype=W.dtype)
    gen = torch.Generator().manual_seed(6)
    W32 = torch.randn(300, 200, generator=gen) * 0.02
    s32 = torch.rand(200, generator=gen) + 0.1
    g32 = torch.randn(W32.shape, generator=gen)
    for W_, s_, g_, tol in ((W, s0, g, 1e-12), (W32, s32, g32, 1e-5)):
        results = []
        for fn in (core.smooth_quantize_weight, _composed_weight):
            s = s_.clone().requires_grad_()
            y = fn(W_, s, W4A8)
            (y * g_).sum().backward()
            results.append((y.detach(), s.grad))
        assert torch.isfinite(results[0][1]).all()
        torch.testing.assert_close(results[0][0], results[1][0], rtol=tol, atol=tol)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("qrange", ["narrow", "full"])
@pytest.mark.parametrize("dim", [-1, None, (1, 2)])
@pytest.mark.parametrize("ratio", [1.0, 0.8])
def test_fused_sym_fake_quant_matches_composed_form(qrange, dim, ratio):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 4, 16, generator=g, dtype=torch.float64)
    base[0, 0] = 0.0
    base[1, 1, 3] = base[1, 1, 5] = base[1, 1].abs().max() + 1  # a tie
    up = torch.randn(6, 4, 16, generator=g, dtype=torch.float64)
    grid = IntGrid(4, True, qrange)
    results = []
    for fn in (fake_quantize_range, fake_quantize_range_autograd):
        x = base.clone().requires_grad_()
        y = fn(x * 1.5, grid, ratio, dim, True)
        (y * up).sum().backward()
        results.append((y.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-12)


def _learning_step(monkeypatch, fused: bool):
    """Loss and gradients of one learning step of two MASLearnLinears (a smoothed one, then an unsmoothed
    'down_proj'), text and vision rows, with the fused paths or with the composed ones."""
    if not fused:
        monkeypatch.setattr(core, "fused_weight_quant_applies", lambda *a: False)
        monkeypatch.setattr(SymFakeQuantSTE, "apply",
                            staticmethod(lambda x, grid, ratio, dim: fake_quantize_range_autograd(x, grid, ratio, dim,
                                                                                                 True)))
    g = torch.Generator().manual_seed(3)
    X = torch.randn(1, 30, 24, generator=g)
    X[..., 4] *= 20
    vision = torch.zeros(1, 30, dtype=torch.bool)
    vision[0, 5:20] = True
    masks = {"text": ~vision, "vision": vision}
    W1, b1 = torch.randn(32, 24, generator=g) * 0.1, torch.randn(32, generator=g)
    W2 = torch.randn(24, 32, generator=g) * 0.1
    scales = {m: torch.nn.Parameter(torch.rand(24, generator=g) + 0.5) for m in ("text", "vision")}
    router = ModalityRouter()
    router.set_masks(masks)
    first = MASLearnLinear(W1, b1, W4A8, router, scales, ("text", "vision"), eps=1e-5)
    down = MASLearnLinear(W2, None, W4A8, router, None, ("text", "vision"))
    x = X.clone().requires_grad_()
    y = down(torch.nn.functional.silu(first(x)))
    target = torch.randn(y.shape, generator=g)
    loss = core.weighted_mae(y, target, masks, {"text": 1.0, "vision": 0.5})
    loss.backward()
    return loss.detach(), {m: p.grad for m, p in scales.items()}, x.grad


def test_learning_step_with_fused_paths_equals_composed_forms(monkeypatch):
    loss_f, grads_f, gx_f = _learning_step(monkeypatch, fused=True)
    with monkeypatch.context() as m:
        loss_r, grads_r, gx_r = _learning_step(m, fused=False)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-6, atol=1e-7)
    for mod in grads_f:
        assert grads_f[mod].abs().max() > 0
        torch.testing.assert_close(grads_f[mod], grads_r[mod], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gx_f, gx_r, rtol=1e-4, atol=1e-6)


def test_unsmoothed_learn_linear_rounds_its_weight_once_and_equals_routed_form():
    g = torch.Generator().manual_seed(4)
    W, b = torch.randn(16, 24, generator=g), torch.randn(16, generator=g)
    X = torch.randn(2, 10, 24, generator=g)
    vision = torch.zeros(2, 10, dtype=torch.bool)
    vision[:, 2:6] = True
    router = ModalityRouter()
    router.set_masks({"text": ~vision, "vision": vision})
    lin = MASLearnLinear(W, b, W4A8, router, None, ("text", "vision"))
    assert lin.W_q is not None
    index = router.partition(("text", "vision"), 20, X.device)
    expected = core.mas_linear(X, index, {"text": None, "vision": None}, W, b, W4A8, ste=False)
    torch.testing.assert_close(lin(X), expected, rtol=1e-6, atol=1e-6)
    assert grid_mod.EPS > 0 and quantize_activation is not None


def _eq13_rows(fused: bool, int_matmul: bool, scheme, X0, s0, W, b, buffers=None, monkeypatch=None):
    """Y, dL/dX and dL/ds of Eq. 13 on one modality's rows (with ε = 1e-5): fused (MASLinearSTE, integer or float32
    matmul) or composed (activation STE of autograd ops, composed weight quantization, F.linear)."""
    X = X0.clone().requires_grad_()
    s = s0.clone().requires_grad_()
    if fused:
        monkeypatch.setattr(core, "int_matmul_applies", lambda *a: int_matmul)
        Y = core.mas_linear_rows(X, s, W, b, scheme, ste=True, eps=1e-5, buffers=buffers, key="m")
    else:
        Xs = X / (s + 1e-5)
        grid = IntGrid(scheme.a_bits, True, scheme.int_range)
        Xq = fake_quantize_range_autograd(Xs, grid, scheme.a_clip_ratio, -1, ste=True)
        Y = torch.nn.functional.linear(Xq, _composed_weight(W, s, scheme), b)
    up = torch.randn(Y.shape, generator=torch.Generator().manual_seed(11))
    (Y * up).sum().backward()
    return Y.detach(), X.grad, s.grad


@pytest.mark.parametrize("a_clip", [1.0, 0.9])
@pytest.mark.parametrize("shape", [(30,), (2, 7)])
def test_fused_linear_integer_and_float_matmul_match_composed_form(monkeypatch, a_clip, shape):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(48, 40, generator=g) * 0.1
    W[3, 7], W[3, 9] = 1.0, -1.0  # a tie in row 3's abs-max (equal scales below)
    b = torch.randn(48, generator=g)
    s0 = torch.rand(40, generator=g) + 0.5
    s0[7] = s0[9] = 1.0
    s0[5] = -s0[5]
    X0 = torch.randn(*shape, 40, generator=g)
    X0[..., 2] *= 30  # an outlier channel
    scheme = QuantScheme("w4a8c", 4, 8, a_clip_ratio=a_clip)
    assert core.int_matmul_applies(scheme, X0)
    ref = _eq13_rows(False, False, scheme, X0, s0, W, b)
    for int_matmul in (True, False):
        got = _eq13_rows(True, int_matmul, scheme, X0, s0, W, b, monkeypatch=monkeypatch)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[2], ref[2], rtol=1e-4, atol=1e-5)
    assert ref[2].abs().max() > 0.1


def test_fused_linear_reuses_its_buffers_from_step_to_step_and_never_while_a_graph_needs_them(monkeypatch):
    g = torch.Generator().manual_seed(8)
    W = torch.randn(24, 16, generator=g)
    X0, X1 = torch.randn(10, 16, generator=g), torch.randn(10, 16, generator=g)
    s0, s1 = torch.rand(16, generator=g) + 0.5, torch.rand(16, generator=g) + 0.5
    buffers = core.FusedBuffers()
    for int_matmul in (True, False):
        for X, s in ((X0, s0), (X1, s1), (X0, s0)):  # the same key three times: its buffers are reused
            fresh = _eq13_rows(True, int_matmul, W4A8, X, s, W, None, monkeypatch=monkeypatch)
            reused = _eq13_rows(True, int_matmul, W4A8, X, s, W, None, buffers, monkeypatch)
            for a, c in zip(fresh, reused):
                torch.testing.assert_close(a, c, rtol=0, atol=0)
        assert not buffers.busy
    # two forwards of one key before one backward: the second gets fresh tensors, both gradients are right
    monkeypatch.setattr(core, "int_matmul_applies", lambda *a: True)
    s = s0.clone().requires_grad_()
    kept = buffers.saved["m"]
    Y = sum(core.mas_linear_rows(X, s, W, None, W4A8, buffers=buffers, key="m").sum() for X in (X0, X1))
    assert buffers.saved["m"] is kept
    Y.backward()
    s_ref = s0.clone().requires_grad_()
    sum(core.mas_linear_rows(X, s_ref, W, None, W4A8).sum() for X in (X0, X1)).backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", [W4A8, QuantScheme("w8a8c", 8, 8, a_clip_ratio=0.9)])
def test_unsmoothed_learn_linear_on_integer_codes_equals_float_matmul(monkeypatch, scheme):
    g = torch.Generator().manual_seed(9)
    W, b = torch.randn(16, 24, generator=g), torch.randn(16, generator=g)
    X0 = torch.randn(2, 10, 24, generator=g)
    X0[..., 3] *= 25
    up = torch.randn(2, 10, 16, generator=g)
    router = ModalityRouter()
    lin = MASLearnLinear(W, b, scheme, router, None, ("text",))
    c_w, s_w = lin.W_codes
    assert torch.equal(c_w.float() * s_w, lin.W_q)
    results = []
    for int_matmul in (True, False):
        monkeypatch.setattr(core, "int_matmul_applies", lambda *a, _v=int_matmul: _v)
        X = X0.clone().requires_grad_()
        Y = lin(X)
        (Y * up).sum().backward()
        results.append((Y.detach(), X.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)

