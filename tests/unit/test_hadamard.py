"""Hadamard matrices, fast transforms and rotation plans: the mathematics, checked independently."""

import math

import pytest
import torch

from masquant.transforms import (
    HADAMARD_K,
    base_hadamard_matrix,
    block_hadamard_matrix,
    block_hadamard_size,
    block_hadamard_transform,
    fwht,
    fwht_,
    hadamard_factor,
    hadamard_matrix,
    hadamard_transform,
    is_hadamard_size,
    padded_hadamard_size,
    padded_hadamard_transform,
    random_hadamard_matrix,
    rotation_for_width,
)
from masquant.transforms.hadamard import (
    gf_tables,
    goethals_seidel_sequences,
    paley1_hadamard,
    paley2_hadamard,
    prime_power,
)

F64 = torch.float64


def valid_by_definition(n: int) -> bool:
    return any(n % K == 0 and (n // K) & (n // K - 1) == 0 for K in HADAMARD_K)


def assert_hadamard(H: torch.Tensor) -> None:
    n = H.shape[0]
    assert H.shape == (n, n) and H.dtype == F64
    assert ((H == 1) | (H == -1)).all()
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=F64))


def sylvester_entry(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """(-1)^popcount(i & j), elementwise."""
    b = i & j
    parity = torch.zeros_like(b)
    while bool((b > 0).any()):
        parity ^= b & 1
        b = b >> 1
    return 1.0 - 2.0 * parity.double()


def x64(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --- sizes -----------------------------------------------------------------------------------------------
def test_sizes_follow_the_definition():
    assert HADAMARD_K == (1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)
    for n in range(1, 3000):
        assert is_hadamard_size(n) == valid_by_definition(n), n
        if valid_by_definition(n):
            K, p = hadamard_factor(n)
            largest = max(n // K2 for K2 in HADAMARD_K if n % K2 == 0 and (n // K2) & (n // K2 - 1) == 0)
            assert K * p == n and K in HADAMARD_K and p == largest
    assert hadamard_factor(40) == (20, 2) and hadamard_factor(576) == (36, 16)
    assert hadamard_factor(1536) == (12, 128) and hadamard_factor(4096) == (1, 4096)


@pytest.mark.parametrize("n", [6, 13, 148, 173, 1000, 2900, 18944])
def test_invalid_size_names_the_nearest_valid_sizes(n):
    below = max(m for m in range(1, n) if valid_by_definition(m))
    above = next(m for m in range(n + 1, 2 * n + 200) if valid_by_definition(m))
    with pytest.raises(ValueError, match=rf"\b{n}\b.*\b{below}\b below and {above} above"):
        hadamard_factor(n)
    assert padded_hadamard_size(n) == above
    assert block_hadamard_size(n) == max(b for b in range(1, n + 1) if n % b == 0 and valid_by_definition(b))
    assert padded_hadamard_size(576) == 576 and block_hadamard_size(576) == 576


def test_qwen_mlp_width_options():
    assert not is_hadamard_size(18944)
    assert padded_hadamard_size(18944) == 19968 == 156 * 128
    assert block_hadamard_size(18944) == 512
    assert padded_hadamard_size(148) == 156 and block_hadamard_size(148) == 4


# --- constructions ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", HADAMARD_K)
def test_base_matrix_is_hadamard_in_normal_form(K):
    H = base_hadamard_matrix(K)
    assert_hadamard(H)
    assert (H[0] == 1).all() and (H[:, 0] == 1).all()


@pytest.mark.parametrize("K", HADAMARD_K)
def test_hadamard_matrix_of_every_K_times_power_of_two(K):
    for m in range(4 if K > 1 else 11):
        assert_hadamard(hadamard_matrix(K * 2**m))


def test_hadamard_matrix_is_kronecker_and_a_fresh_tensor():
    H = hadamard_matrix(12 * 8)
    i = torch.arange(96)
    expected = base_hadamard_matrix(12)[i[:, None] // 8, i[None, :] // 8]
    expected = expected * sylvester_entry(i[:, None] % 8, i[None, :] % 8)
    assert torch.equal(H, expected)
    H.zero_()
    assert_hadamard(hadamard_matrix(96))
    assert hadamard_matrix(96, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("q", [3, 7, 11, 19, 27, 43])
def test_paley_i(q):
    assert_hadamard(paley1_hadamard(q))


@pytest.mark.parametrize("q", [5, 9, 13, 25, 29, 49])
def test_paley_ii(q):
    assert_hadamard(paley2_hadamard(q))


def test_paley_rejects_wrong_residue_and_non_prime_powers():
    with pytest.raises(ValueError):
        paley1_hadamard(13)
    with pytest.raises(ValueError):
        paley2_hadamard(11)
    with pytest.raises(ValueError, match="not a prime power"):
        paley1_hadamard(35)


def test_prime_power():
    assert prime_power(25) == (5, 2) and prime_power(27) == (3, 3) and prime_power(139) == (139, 1)
    assert prime_power(77) is None and prime_power(1) is None and prime_power(155) is None


@pytest.mark.parametrize("q", [4, 8, 9, 25, 27])
def test_finite_field_axioms(q):
    sub, mul = gf_tables(q)
    e = torch.arange(q)
    zero = int(sub[0, 0])
    assert zero == 0 and (sub.diagonal() == 0).all()
    assert all(sorted(sub[a].tolist()) == list(range(q)) for a in range(q))  # a - x is a bijection
    one = next(u for u in range(q) if torch.equal(mul[u], e))  # the multiplicative identity
    nonzero = mul[1:, 1:]
    assert all(sorted(r.tolist()) == list(range(1, q)) for r in nonzero)  # no zero divisors, inverses
    assert torch.equal(mul, mul.T) and (mul[0] == 0).all() and one == 1
    a, b, c = torch.meshgrid(e, e, e, indexing="ij")
    assert torch.equal(mul[mul[a, b], c], mul[a, mul[b, c]])  # associative
    assert torch.equal(mul[a, sub[b, c]], sub[mul[a, b], mul[a, c]])  # distributive
    neg = sub[0]
    assert torch.equal(sub[sub[a, b], c], sub[a, neg[sub[neg[b], c]]])  # (a-b)-c = a-(b+c)


@pytest.mark.parametrize("n", [39, 43])
def test_goethals_seidel_sequences_have_zero_periodic_autocorrelation(n):
    S = goethals_seidel_sequences(n)
    assert S.shape == (4, n) and ((S == 1) | (S == -1)).all()
    F = torch.fft.fft(S, dim=1)
    paf = torch.fft.ifft(F.abs() ** 2, dim=1).real.sum(0)  # Σ_k PAF_k(s)
    torch.testing.assert_close(paf, torch.tensor([4.0 * n] + [0.0] * (n - 1), dtype=F64), atol=1e-9, rtol=0)
    assert int((S.sum(1) ** 2).sum()) == 4 * n


# --- random Hadamard -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [64, 576, 1536])
def test_random_hadamard_is_orthogonal_and_seeded(n):
    Q = random_hadamard_matrix(n, seed=3)
    torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=F64), atol=1e-12, rtol=0)
    assert torch.equal(Q, random_hadamard_matrix(n, seed=3))
    assert not torch.equal(Q, random_hadamard_matrix(n, seed=4))
    s = (Q * math.sqrt(n))[:, 0] / hadamard_matrix(n)[:, 0]  # diag(s) · H / √n with s = ±1: signs on the rows
    assert ((s == 1) | (s == -1)).all() and 0 < (s == 1).sum() < n
    torch.testing.assert_close(Q, s[:, None] * hadamard_matrix(n) / math.sqrt(n), atol=1e-15, rtol=0)


# --- fast transforms -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4, 64, 1024])
def test_fwht_is_x_times_sylvester(n):
    x = x64(3, 5, n)
    i = torch.arange(n)
    H = sylvester_entry(i[:, None], i[None, :])
    torch.testing.assert_close(fwht(x), x @ H, atol=1e-10, rtol=0)
    torch.testing.assert_close(fwht(x, scale=1 / math.sqrt(n)), x @ H / math.sqrt(n), atol=1e-10, rtol=0)
    y = x.clone()
    assert fwht_(y) is y
    torch.testing.assert_close(y, x @ H, atol=1e-10, rtol=0)


def test_fwht_argument_checks():
    with pytest.raises(ValueError):
        fwht(torch.ones(2, 12))
    xt = x64(16, 4).T  # non-contiguous [4, 16]
    with pytest.raises(ValueError):
        fwht_(xt)
    torch.testing.assert_close(fwht(xt), xt @ hadamard_matrix(16), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [12, 20 * 2, 28, 36 * 4, 40, 52, 60 * 2, 108, 140, 156 * 2, 172 * 4, 576, 1536, 2048])
def test_hadamard_transform_is_x_times_hadamard_matrix(n):
    x = x64(2, 3, n)
    H = hadamard_matrix(n)
    torch.testing.assert_close(hadamard_transform(x), x @ H / math.sqrt(n), atol=1e-12, rtol=0)
    torch.testing.assert_close(hadamard_transform(x, normalize=False), x @ H, atol=1e-10, rtol=0)
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=0)  # an isometry
    torch.testing.assert_close(y[..., 0], x.sum(-1) / math.sqrt(n), atol=1e-12, rtol=0)  # normal form
    xf = x.float()
    torch.testing.assert_close(hadamard_transform(xf), (x @ H).float() / math.sqrt(n), atol=1e-4, rtol=1e-4)
    xb = x.bfloat16()
    yb = hadamard_transform(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), xb.double() @ H / math.sqrt(n), atol=2e-2, rtol=2e-2)


def test_hadamard_transform_blocks_and_argument_checks():
    x = x64(4, 144)
    blocks = torch.block_diag(*[hadamard_matrix(12)] * 12)
    torch.testing.assert_close(hadamard_transform(x, n=12, normalize=False), x @ blocks, atol=1e-10, rtol=0)
    with pytest.raises(ValueError):
        hadamard_transform(x, n=40)  # does not divide 144
    with pytest.raises(ValueError, match="148"):
        hadamard_transform(x64(2, 148))


# --- widths without a Hadamard size ---------------------------------------------------------------------
def test_block_option_is_block_diagonal_hadamard():
    B = block_hadamard_matrix(148)
    assert torch.equal(B, torch.block_diag(*[hadamard_matrix(4)] * 37))
    assert torch.equal(B @ B.T, 4 * torch.eye(148, dtype=F64))
    x = x64(3, 148)
    torch.testing.assert_close(block_hadamard_transform(x), x @ B / 2, atol=1e-12, rtol=0)


def test_pad_option_is_padded_hadamard():
    x = x64(3, 148)
    y = padded_hadamard_transform(x)
    xp = torch.cat([x, torch.zeros(3, 8, dtype=F64)], dim=1)
    torch.testing.assert_close(y, xp @ hadamard_matrix(156) / math.sqrt(156), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [64, 576, 1536, 148])
@pytest.mark.parametrize("mode", ["block", "pad"])
@pytest.mark.parametrize("seed", [None, 7])
def test_rotation_plan(n, mode, seed):
    plan = rotation_for_width(n, mode=mode, seed=seed)
    size = n if mode == "block" or is_hadamard_size(n) else padded_hadamard_size(n)
    assert plan.width == n and plan.size == size
    M = plan.matrix()
    assert M.shape == (n, size) and M.dtype == F64
    torch.testing.assert_close(M @ M.T, torch.eye(n, dtype=F64), atol=1e-12, rtol=0)  # orthonormal rows
    if size == n:
        torch.testing.assert_close(M.T @ M, torch.eye(n, dtype=F64), atol=1e-12, rtol=0)
    x = x64(5, n)
    torch.testing.assert_close(plan.apply(x), x @ M, atol=1e-12, rtol=0)
    # function preserved: a consuming linear W [out, n] folded as W M
    W = x64(6, n, seed=1)
    torch.testing.assert_close(plan.apply(x) @ (W @ M).T, x @ W.T, atol=1e-10, rtol=0)
    if is_hadamard_size(n):  # the full (random) Hadamard in both modes
        full = hadamard_matrix(n) / math.sqrt(n) if seed is None else random_hadamard_matrix(n, seed)
        torch.testing.assert_close(M, full, atol=1e-15, rtol=0)
    elif mode == "block":  # mixes only within blocks of 4
        assert plan.block == 4 and (M[:4, 4:] == 0).all()
    assert plan.apply(x.float()).dtype == torch.float32


@pytest.mark.parametrize("mode", ["block", "pad"])
def test_rotation_plan_qwen_mlp_width_18944(mode):
    n = 18944
    plan = rotation_for_width(n, mode=mode, seed=11)
    x = x64(2, n)
    y = plan.apply(x)
    s = plan.signs()
    cols = torch.tensor([0, 1, 511, 512, 9000, 18943] + ([18944, 19967] if mode == "pad" else []))
    rows = torch.arange(n)
    if mode == "block":  # M[i, c] = s[i] H_512[i % 512, c % 512] / √512 within block c // 512, else 0
        assert plan.size == n
        same_block = rows[:, None] // 512 == cols[None, :] // 512
        Mc = torch.where(same_block, sylvester_entry(rows[:, None] % 512, cols[None, :] % 512), 0.0) / math.sqrt(512)
    else:  # M[i, c] = s[i] H_156[i // 128, c // 128] (-1)^popcount(i % 128 & c % 128) / √19968
        assert plan.size == 19968
        H156 = base_hadamard_matrix(156)
        Mc = H156[rows[:, None] // 128, cols[None, :] // 128]
        Mc = Mc * sylvester_entry(rows[:, None] % 128, cols[None, :] % 128) / math.sqrt(19968)
    torch.testing.assert_close(y[:, cols], x @ (s[:n, None] * Mc), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-10, rtol=0)
    W = x64(3, n, seed=2)  # consuming linear folded as W M = apply(W): x Wᵀ = (x M)(W M)ᵀ
    torch.testing.assert_close(y @ plan.apply(W).T, x @ W.T, atol=1e-9, rtol=0)


def test_rotation_for_width_rejects_unknown_mode():
    with pytest.raises(ValueError, match="block"):
        rotation_for_width(64, mode="rotate")
    with pytest.raises(ValueError):
        rotation_for_width(148, mode="pad").apply(x64(2, 156))
