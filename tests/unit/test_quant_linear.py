import torch
import torch.nn.functional as F

from masquant.quant import ModalityPath, ModalityRouter, QuantLinear, QuantScheme, quantize_activation, quantize_weight


def _setup(seed=0):
    torch.manual_seed(seed)
    W = torch.randn(12, 16)
    b = torch.randn(12)
    x = torch.randn(2, 5, 16)
    vision = torch.zeros(2, 5, dtype=torch.bool)
    vision[0, 1:3] = True
    vision[1, 4] = True
    return W, b, x, {"text": ~vision, "vision": vision}


def test_dense_quant_linear_equals_linear():
    W, b, x, _ = _setup()
    ql = QuantLinear(W, b, QuantScheme())
    assert torch.allclose(ql(x), F.linear(x, W, b), atol=1e-6)


def test_routing_matches_per_modality_reference():
    W, b, x, masks = _setup()
    scheme = QuantScheme("w4a8", w_bits=4, a_bits=8)
    s_t, s_v = torch.rand(16) + 0.5, torch.rand(16) + 0.5
    Wq = quantize_weight(W * s_t, scheme)
    Wv = quantize_weight(W * s_v, scheme)
    L1, L2 = torch.randn(16, 3), torch.randn(3, 12)
    router = ModalityRouter()
    router.set_masks(masks)
    ql = QuantLinear(Wq, b, scheme, router, {
        "text": ModalityPath(smooth=s_t),
        "vision": ModalityPath(smooth=s_v, weight=Wv, L1=L1, L2=L2),
    })
    y = ql(x)
    xt = quantize_activation(x / s_t, scheme)
    ref_t = F.linear(xt, Wq, b)
    xv = x / s_v
    ref_v = F.linear(quantize_activation(xv, scheme), Wv, b) + xv @ L1 @ L2
    ref = torch.where(masks["vision"][..., None], ref_v, ref_t)
    assert torch.allclose(y, ref, atol=1e-5)
    assert ql.lowrank_tokens == int(masks["vision"].sum())


def test_no_masks_or_text_only_takes_default_path_without_lowrank():
    W, b, x, masks = _setup()
    scheme = QuantScheme("w8a8", w_bits=8, a_bits=8)
    router = ModalityRouter()
    ql = QuantLinear(W, b, scheme, router, {"vision": ModalityPath(L1=torch.randn(16, 2), L2=torch.randn(2, 12))})
    ql(x)  # no masks set: everything on the text path
    router.set_masks({"text": torch.ones(2, 5, dtype=torch.bool), "vision": torch.zeros(2, 5, dtype=torch.bool)})
    ql(x)
    assert ql.lowrank_tokens == 0


def test_mask_size_mismatch_is_a_clear_error():
    W, b, x, masks = _setup()
    router = ModalityRouter()
    router.set_masks({k: v[:1] for k, v in masks.items()})
    ql = QuantLinear(W, b, QuantScheme(), router, {"vision": ModalityPath(smooth=torch.ones(16))})
    try:
        ql(x)
    except RuntimeError as err:
        assert "inputs_embeds" in str(err)
    else:
        raise AssertionError("expected a RuntimeError")
