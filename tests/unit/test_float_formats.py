"""Float formats (FP8 E4M3, MXFP4, NVFP4) bit for bit against compressed-tensors' own functions (the format vLLM
loads), on tensors with ties, zeros, subnormals, saturating values and all-zero blocks; the other references'
rules (``quant.fp4_rounding=away``, ``quant.mx_scale_rule=floor|rceil``) by their defining properties.

The reference values come from the library's functions at run time (``calculate_qparams``, ``generate_gparam``,
``fake_quantize``, ``cast_to_fp4``), never from numbers copied here.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

from masquant.quant.formats import E2M1_MAX, FloatGrid, mx_exponent, round_e2m1, round_e4m3
from masquant.quant.gptq import gptq_quantize
from masquant.quant.quantizer import quantize_activation, quantize_weight, quantize_weight_grid
from masquant.quant.scheme import QuantScheme

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]

FP8_CHANNEL = QuantScheme("fp8", 8, 8, w_format="fp8_e4m3", a_format="fp8_e4m3")
FP8_TENSOR = QuantScheme("fp8t", 8, 8, w_format="fp8_e4m3", a_format="fp8_e4m3", w_granularity="tensor",
                         a_granularity="tensor")
MXFP4 = QuantScheme("mxfp4", 4, 4, w_format="mxfp4", a_format="mxfp4", w_granularity="group", w_group_size=32)
NVFP4 = QuantScheme("nvfp4", 4, 4, w_format="nvfp4", a_format="nvfp4", w_granularity="group", w_group_size=16,
                    a_granularity="tensor")


def hard_tensor(rows: int, cols: int, seed: int, block: int = 16) -> torch.Tensor:
    """Gaussian rows with the cases where implementations part: exact ties of the element grid (after scaling by
    a power of two), zeros, float32 subnormals, huge values, an all-zero block and a block of one tiny value."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows).unsqueeze(1)
    W[0, : len(TIES)] = torch.tensor(TIES) * 2.0 ** -3  # ties of x / s when the block's scale is a power of two
    W[0, len(TIES)] = 6.0 * 2.0 ** -3
    W[1, :block] = 0.0  # an all-zero block
    W[2, :block] = 0.0
    W[2, 3] = 1e-40  # a float32 subnormal alone in its block
    W[3, 5] = 3e4  # saturates FP8 in a per-tensor scale's neighbours
    W[4, ::7] = 0.0
    for k, t in enumerate(TIES):  # ties on the block's own grid: absmax 6 → scale 1 (MX), x = t
        W[5, 32 + k] = t
    W[5, 32 + len(TIES)] = 6.0
    return W


def ct_args(preset: str, which: str = "weights") -> QuantizationArgs:
    return getattr(preset_name_to_scheme(preset, ["Linear"]), which)


def ct_weight_fake_quant(W: torch.Tensor, args: QuantizationArgs, nvfp4: bool = False):
    """compressed-tensors' weight fake quantization: the observer's min/max per group (channel, tensor), its
    qparams (and NVFP4's global scale), its fake_quantize. Returns (W_q, effective scale per group)."""
    gs = None
    if args.strategy in ("group", "tensor_group"):
        G = W.reshape(W.shape[0], -1, args.group_size)
        mn, mx = G.amin(-1), G.amax(-1)
    elif args.strategy == "channel":
        mn, mx = W.amin(1, keepdim=True), W.amax(1, keepdim=True)
    else:
        mn, mx = W.amin().reshape(1), W.amax().reshape(1)
    if nvfp4:
        gs = generate_gparam(W.amin(), W.amax())
    scale, zp = calculate_qparams(mn, mx, args, global_scale=gs)
    Wq = ct_fake_quantize(W, scale, zp, args, global_scale=gs)
    return Wq, (scale if gs is None else scale / gs)


# --- element rounding ---------------------------------------------------------------------------------------------

def test_e2m1_rounding_equals_cast_to_fp4_ties_zeros_saturation():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.tensor(TIES), -torch.tensor(TIES), E2M1_VALUES, -E2M1_VALUES,
                   torch.tensor([1e-40, -1e-40, 0.2499999, 0.2500001, 5.9999, 6.0, 7.5, 1e9]),
                   torch.empty(20000).uniform_(-7, 7, generator=g)])
    v = v.clamp(-E2M1_MAX, E2M1_MAX)
    ours = round_e2m1(v, "even")
    ref = cast_to_fp4(v.clone())
    assert torch.equal(ours, ref)
    assert set(ours.abs().unique().tolist()) <= set(E2M1_VALUES.tolist())


def test_e2m1_ties_away_differs_only_at_ties_and_rounds_them_up_in_magnitude():
    ties = torch.tensor(TIES + [-t for t in TIES])
    away, even = round_e2m1(ties, "away"), round_e2m1(ties, "even")
    assert (away.abs() > ties.abs()).all() and ((even - ties).abs() == (away - ties).abs()).all()
    g = torch.Generator().manual_seed(1)
    v = torch.empty(20000).uniform_(-6, 6, generator=g)
    v = v[~torch.isin(v.abs(), torch.tensor(TIES))]
    assert torch.equal(round_e2m1(v, "away"), round_e2m1(v, "even"))


def test_e4m3_rounding_equals_the_library_on_subnormals_ties_and_saturation():
    from compressed_tensors.quantization.quant_args import round_to_quantized_type_args
    args = ct_args("FP8_DYNAMIC")
    g = torch.Generator().manual_seed(2)
    sub = torch.arange(0, 16, dtype=torch.float32) * 2.0 ** -10  # E4M3 subnormal steps are 2^-9: half of them ties
    v = torch.cat([sub, -sub, torch.tensor([448.0, 464.0, 480.0, 1e6, -1e6, 2.0 ** -6, 1.0625, 1.1875]),
                   torch.randn(20000, generator=g) * 100])
    lo, hi = torch.tensor(-448.0), torch.tensor(448.0)
    ref = round_to_quantized_type_args(v.clone(), args, lo, hi)
    assert torch.equal(round_e4m3(v.clamp(-448, 448)), ref)


# --- weights: scales and values equal to the library's ------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("preset,scheme,nvfp4", [
    ("FP8_DYNAMIC", FP8_CHANNEL, False),
    ("FP8", FP8_TENSOR, False),
    ("MXFP4", MXFP4, False),
    ("NVFP4", NVFP4, True),
])
def test_weight_fake_quant_and_scales_equal_compressed_tensors(preset, scheme, nvfp4, seed):
    W = hard_tensor(24, 128, seed)
    ref, ref_scale = ct_weight_fake_quant(W, ct_args(preset), nvfp4)
    assert torch.equal(quantize_weight(W, scheme), ref)
    W_q, scale, zero = quantize_weight_grid(W, scheme)
    assert zero is None and torch.equal(W_q, ref)
    assert torch.equal(scale, ref_scale.reshape(scale.shape).float())


@pytest.mark.parametrize("preset,scheme", [("MXFP4", MXFP4), ("NVFP4", NVFP4)])
def test_activation_blocks_equal_compressed_tensors(preset, scheme):
    """Dynamic MXFP4 / NVFP4 activations: blocks along each token's channels; NVFP4's global scale from the
    tensor's abs-max (the library's static input_global_scale observed on this very tensor)."""
    args = ct_args(preset, "input_activations")
    X = hard_tensor(40, 96, 7).reshape(2, 20, 96)
    X2 = X.reshape(-1, 96)
    G = X2.reshape(X2.shape[0], -1, args.group_size)
    gs = generate_gparam(X2.amin(), X2.amax()) if preset == "NVFP4" else None
    scale, zp = calculate_qparams(G.amin(-1), G.amax(-1), args, global_scale=gs)
    ref = ct_fake_quantize(X2, scale, zp, args, global_scale=gs).reshape(X.shape)
    assert torch.equal(quantize_activation(X, scheme), ref)


def test_fp8_activation_per_token_equals_the_library():
    args = ct_args("FP8_DYNAMIC", "input_activations")
    X = hard_tensor(30, 64, 3)
    scale, zp = calculate_qparams(X.amin(1, keepdim=True), X.amax(1, keepdim=True), args)
    assert torch.equal(quantize_activation(X, FP8_CHANNEL), ct_fake_quantize(X, scale, zp, args))


# --- the other references' MX rules, by their definitions -----------------------------------------------------------

def test_mx_scale_rules():
    g = torch.Generator().manual_seed(4)
    amax = torch.cat([torch.rand(5000, generator=g) * 2.0 ** torch.randint(-20, 20, (5000,), generator=g),
                      torch.tensor([1.75, 1.7499, 7.0, 6.0, 8.0, 12.0, 0.0])])
    x_max = {rule: amax / torch.exp2(mx_exponent(amax, rule)) for rule in ("compressed_tensors", "floor", "rceil")}
    live = amax > 0
    # OCP / microxcaling: the block max lands in [4, 8): elements up to 2 above the E2M1 max clip to 6
    assert ((x_max["floor"][live] >= 4) & (x_max["floor"][live] < 8)).all()
    # rceil: no element ever clips, and the scale is the smallest power of two that achieves it
    assert (x_max["rceil"][live] <= 6).all() and (x_max["rceil"][live] > 3).all()
    # compressed-tensors: floor's exponent, one up when the mantissa of the block max is >= 1.75
    m = amax / torch.exp2(torch.floor(torch.log2(amax)))
    up = (mx_exponent(amax, "compressed_tensors") - mx_exponent(amax, "floor"))[live]
    assert torch.equal(up, (m[live] >= 1.75).float())
    assert (mx_exponent(torch.zeros(3), "compressed_tensors") == -127).all()


def test_mx_rule_and_rounding_are_scheme_options():
    W = hard_tensor(16, 64, 5)
    base = quantize_weight(W, MXFP4)
    floor = quantize_weight(W, QuantScheme(**{**MXFP4.to_dict(), "mx_scale_rule": "floor"}))
    away = quantize_weight(W, QuantScheme(**{**MXFP4.to_dict(), "fp4_rounding": "away"}))
    assert not torch.equal(base, floor) and not torch.equal(base, away)


# --- GPTQ, STE, and the scheme's own checks --------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", [FP8_CHANNEL, MXFP4, NVFP4], ids=lambda s: s.name)
def test_gptq_on_a_float_grid_stays_on_the_grid_and_beats_round_to_nearest(scheme):
    """GPTQ's error feedback works for any grid: its output is on the format's grid (each value code·scale of its
    group), and its layer error tr(ΔW H ΔWᵀ) is below round-to-nearest's on that grid, for every seed tried."""
    grid = FloatGrid(scheme.w_format.value)
    g = scheme.w_group_size if scheme.w_granularity == "group" else 0
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(32, 64, generator=gen)
        X = torch.randn(256, 64, generator=gen) @ torch.randn(64, 64, generator=gen)  # correlated inputs
        H = 2 * X.T @ X / X.shape[0]
        Q, info = gptq_quantize(W, H, bits=scheme.w_bits, group_size=g, grid=grid)
        rtn = quantize_weight(W, scheme)
        scale = info["scale"].repeat_interleave(g or 64, dim=1)
        assert torch.equal(grid.round(Q / scale) * scale, Q), seed  # each value is a code times its group's scale

        def err(Wq):
            D = (W - Wq).double()
            return float(torch.einsum("oi,ij,oj->", D, H.double(), D))
        assert err(Q) < err(rtn), seed


@pytest.mark.parametrize("scheme", [FP8_CHANNEL, MXFP4, NVFP4], ids=lambda s: s.name)
def test_ste_reaches_the_weight_and_values_equal_the_plain_forward(scheme):
    W = hard_tensor(8, 64, 6).requires_grad_(True)
    Y = quantize_weight(W, scheme, ste=True)
    assert torch.equal(Y.detach(), quantize_weight(W.detach(), scheme))
    (Y * torch.arange(Y.numel()).reshape(Y.shape)).sum().backward()
    assert torch.isfinite(W.grad).all() and W.grad.abs().sum() > 0


@pytest.mark.parametrize("overrides,key", [
    (dict(w_bits=4, w_format="fp8_e4m3"), "quant.w_bits=8"),
    (dict(w_bits=4, w_format="nvfp4"), "quant.w_group_size=16"),
    (dict(w_bits=4, w_format="mxfp4", w_granularity="group", w_group_size=16), "quant.w_group_size=32"),
    (dict(w_bits=8, w_format="fp8_e4m3", w_symmetric=False), "quant.w_symmetric=true"),
    (dict(a_bits=4, a_format="mxfp4", a_dynamic=False, a_granularity="tensor"), "quant.a_dynamic=true"),
    (dict(a_bits=4, a_format="nvfp4", a_dynamic=False), "quant.a_granularity=tensor"),
    (dict(w_bits=4, w_format="fp4"), "valid choices"),
])
def test_bad_format_settings_are_refused_naming_the_fix(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        QuantScheme("bad", **overrides)
