"""Hadamard matrices and fast Hadamard transforms for rotation methods (QuaRot, MQuant).

Sizes. A Hadamard matrix H_n (entries ±1, H Hᵀ = n I) is built for n = K·2^m with K in ``HADAMARD_K``
(the Sloane set QuaRot uses) as the Kronecker product H_n = H_K ⊗ H_{2^m}, H_{2^m} the Sylvester matrix
H[i, j] = (-1)^popcount(i & j). ``hadamard_transform`` computes x @ H_n with the same H_n by viewing the
last dim as [K, 2^m]: a fast Walsh–Hadamard transform on the 2^m part, a K×K matmul on the other.

Base matrices H_K, each built here (no stored tables) and put in normal form (first row and column +1, so
output channel 0 of x @ H_n is Σx, the channel MQuant's RMS step watches):
  12 Paley I q=11 · 20 Paley I q=19 · 28 Paley II q=13 · 36 Paley II q=17 · 40 H_2 ⊗ H_20 ·
  52 Paley II q=25 (over GF(5²)) · 60 Paley I q=59 · 108 Paley I q=107 · 140 Paley I q=139 ·
  156 = 4·39 and 172 = 4·43 Goethals–Seidel: four ±1 circulants whose periodic autocorrelations sum to 0,
  found by a deterministic meet-in-the-middle search over unions of orbits of a multiplicative subgroup of
  Z_n^* (well under a second; neither Paley construction applies: 155, 171, 77 and 85 are not prime powers).
K = 40 is never chosen by ``hadamard_factor`` (40·2^m = 20·2^(m+1)); ``base_hadamard_matrix(40)`` exists.

Widths with no K·2^m form (Qwen2.5-VL-7B's MLP width 18944 = 2^9·37) have two options here:
  (a) ``mode="pad"``: zero-pad x to the next valid size p (18944 -> 19968 = 156·128, +5.4 %) and rotate
      there. M = [I_n 0] H_p D / √p is [n, p] with orthonormal rows (M Mᵀ = I_n), so x Wᵀ = (x M)(W M)ᵀ:
      the consuming linear's weight becomes W M [out, p] (padded), a producing linear A [n, in] becomes
      Mᵀ A [p, in]. That linear and its quantized activations grow by p/n (1.054 at 18944).
  (b) ``mode="block"``: block-diagonal H with the largest valid block b dividing n (18944: b = 512, 37
      blocks). Square and orthogonal, no shape change, but it mixes only within a block: one outlier of
      size a is spread to a/√b (a/22.6) instead of a/√p (a/141).
Recommendation: pad. Rotations work by spreading outliers over the whole width (QuaRot's incoherence
argument), block mixing is 6× weaker at 18944 and degenerates for widths such as 148 (b = 4); the 5.4 %
extra in one linear is cheap. MQuant pads too. Use block when weight shapes must not change.
(Outside the Sloane set: ``goethals_seidel_hadamard(37)`` builds an H_148, and 18944 = 148·128, so a
full Hadamard of that width exists; adding 148 to HADAMARD_K would need neither option.)
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from math import gcd

import torch

try:  # the CUDA kernel (Dao-AILab/fast-hadamard-transform); optional, CUDA tensors only
    from fast_hadamard_transform import hadamard_transform as _cuda_fwht
except ImportError:  # pragma: no cover - depends on the environment
    _cuda_fwht = None

log = logging.getLogger(__name__)

HADAMARD_K = (1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)
ROTATION_MODES = ("block", "pad")

# K -> (construction, parameter); Paley I/II take q, Goethals–Seidel takes the circulant order n = K/4
_CONSTRUCTION: dict[int, tuple[str, int]] = {
    1: ("sylvester", 1),
    12: ("paley1", 11),
    20: ("paley1", 19),
    28: ("paley2", 13),
    36: ("paley2", 17),
    40: ("double", 20),
    52: ("paley2", 25),
    60: ("paley1", 59),
    108: ("paley1", 107),
    140: ("paley1", 139),
    156: ("goethals_seidel", 39),
    172: ("goethals_seidel", 43),
}


# --- sizes --------------------------------------------------------------------------------------------
def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _factor_or_none(n: int) -> tuple[int, int] | None:
    """n = K·2^m with the largest power of two, or None."""
    if n < 1:
        return None
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        if n // p in HADAMARD_K:
            return n // p, p
        p //= 2
    return None


def is_hadamard_size(n: int) -> bool:
    """True when n = K·2^m with K in HADAMARD_K."""
    return _factor_or_none(n) is not None


def _valid_sizes_near(n: int) -> tuple[int | None, int]:
    """(largest valid size < n or None, smallest valid size > n)."""
    below, above = None, None
    for K in HADAMARD_K:
        p = 1
        while K * p <= n:
            p *= 2
        if p > 1 and K * p // 2 < n:
            below = max(below or 0, K * p // 2)
        above = min(above or K * p, K * p)
    return below, above


def hadamard_factor(n: int) -> tuple[int, int]:
    """n -> (K, 2^m) with n = K·2^m, K in HADAMARD_K, 2^m as large as possible; ValueError otherwise."""
    f = _factor_or_none(n)
    if f is None:
        below, above = _valid_sizes_near(n)
        raise ValueError(
            f"no Hadamard matrix of size {n}: sizes are K·2^m with K in {HADAMARD_K}; "
            f"nearest valid sizes are {below} below and {above} above "
            f"(see padded_hadamard_size / block_hadamard_size)"
        )
    return f


def padded_hadamard_size(n: int) -> int:
    """Smallest valid Hadamard size >= n (option (a), zero padding)."""
    return n if is_hadamard_size(n) else _valid_sizes_near(n)[1]


def block_hadamard_size(n: int) -> int:
    """Largest valid Hadamard size b dividing n (option (b), block-diagonal); b = n when n is valid."""
    return max(b for b in range(1, n + 1) if n % b == 0 and is_hadamard_size(b))


# --- finite fields GF(p^k) --------------------------------------------------------------------------
def prime_power(q: int) -> tuple[int, int] | None:
    """q = p^k with p prime -> (p, k), else None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mod(a: list[int], m: list[int], p: int) -> list[int]:
    """Remainder of a by the monic m over GF(p); coefficients low degree first."""
    a = a[:]
    for shift in range(len(a) - len(m), -1, -1):
        c = a[shift + len(m) - 1] % p
        if c:
            for i, mi in enumerate(m):
                a[shift + i] = (a[shift + i] - c * mi) % p
    return [x % p for x in a[: len(m) - 1]]


def _monic_polys(p: int, degree: int) -> list[list[int]]:
    return [[(j // p**i) % p for i in range(degree)] + [1] for j in range(p**degree)]


def irreducible_poly(p: int, k: int) -> list[int]:
    """First monic irreducible polynomial of degree k over GF(p) (no monic factor of degree 1..k/2)."""
    for m in _monic_polys(p, k):
        if all(any(_poly_mod(m, f, p)) for d in range(1, k // 2 + 1) for f in _monic_polys(p, d)):
            return m
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


@functools.lru_cache(maxsize=None)
def gf_tables(q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sub, mul) tables of GF(q), q = p^k: elements 0..q-1 are polynomials in base-p digits; [q, q] int64."""
    pk = prime_power(q)
    if pk is None:
        raise ValueError(f"GF({q}) does not exist: {q} is not a prime power")
    p, k = pk
    digits = [[(e // p**i) % p for i in range(k)] for e in range(q)]
    to_int = lambda d: sum(c * p**i for i, c in enumerate(d))  # noqa: E731
    m = irreducible_poly(p, k) if k > 1 else [0, 1]
    sub = [[to_int([(x - y) % p for x, y in zip(a, b)]) for b in digits] for a in digits]
    mul = []
    for a in digits:
        row = []
        for b in digits:
            prod = [0] * (2 * k - 1)
            for i, x in enumerate(a):
                for j, y in enumerate(b):
                    prod[i + j] += x * y
            row.append(to_int(_poly_mod(prod + [0], m, p) if k > 1 else [prod[0] % p]))
        mul.append(row)
    return torch.tensor(sub), torch.tensor(mul)


def quadratic_character(q: int) -> torch.Tensor:
    """χ over GF(q): 0 at 0, +1 on nonzero squares, -1 elsewhere; [q] float64."""
    _, mul = gf_tables(q)
    chi = -torch.ones(q, dtype=torch.float64)
    chi[mul.diagonal()[1:]] = 1.0
    chi[0] = 0.0
    return chi


def jacobsthal_matrix(q: int) -> torch.Tensor:
    """Q[a, b] = χ(a - b) over GF(q); [q, q]. Symmetric for q ≡ 1 (mod 4), skew for q ≡ 3 (mod 4)."""
    sub, _ = gf_tables(q)
    return quadratic_character(q)[sub]


def paley1_hadamard(q: int) -> torch.Tensor:
    """Paley I, q ≡ 3 (mod 4): H = I + S, S = [[0, 1ᵀ], [-1, Q]] skew conference; [q+1, q+1]."""
    if q % 4 != 3:
        raise ValueError(f"Paley I needs q ≡ 3 (mod 4), got q={q}")
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, jacobsthal_matrix(q)
    return torch.eye(q + 1, dtype=torch.float64) + S


def paley2_hadamard(q: int) -> torch.Tensor:
    """Paley II, q ≡ 1 (mod 4): C = [[0, 1ᵀ], [1, Q]], H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]."""
    if q % 4 != 1:
        raise ValueError(f"Paley II needs q ≡ 1 (mod 4), got q={q}")
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, jacobsthal_matrix(q)
    A = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)


# --- Goethals–Seidel ------------------------------------------------------------------------------------
def periodic_autocorrelation(a: torch.Tensor) -> torch.Tensor:
    """PAF(s) = Σ_i a_i a_{i+s mod n}; a [..., n] -> [..., n]."""
    return torch.stack([(a * a.roll(-s, dims=-1)).sum(-1) for s in range(a.shape[-1])], dim=-1)


def _cyclic_subgroups(n: int) -> list[list[int]]:
    """Distinct cyclic subgroups of Z_n^*, largest first (ties: smallest generator)."""
    seen, groups = set(), []
    for g in range(1, n):
        if gcd(g, n) != 1:
            continue
        G, x = [1], g % n
        while x != 1:
            G.append(x)
            x = x * g % n
        key = frozenset(G)
        if key not in seen:
            seen.add(key)
            groups.append(sorted(G))
    return sorted(groups, key=len, reverse=True)


def _orbits(n: int, G: list[int]) -> list[list[int]]:
    """Orbits of x -> g·x (g in G) on Z_n."""
    seen, orbits = set(), []
    for x in range(n):
        if x not in seen:
            orbit = sorted({x * g % n for g in G})
            seen.update(orbit)
            orbits.append(orbit)
    return orbits


def goethals_seidel_sequences(n: int, max_sequences: int = 4096) -> torch.Tensor:
    """Four ±1 sequences of odd length n with Σ_k PAF_k(s) = 0 for s ≠ 0; [4, n] float64.

    Each sequence is -1 on a union of orbits of a cyclic subgroup G of Z_n^* (its PAF is then constant on
    G-orbits of shifts). Pairs are matched by a hash of (PAF at orbit representatives, row sum²): we need
    PAF_a + PAF_b = -(PAF_c + PAF_d) and Σ row sums² = 4n. Deterministic: subgroups largest first.
    """
    M1, M2 = 1_000_000_007, 998_244_353  # two hash moduli < 2^30: products stay inside int64
    for G in _cyclic_subgroups(n):
        orbits = _orbits(n, G)
        if 2 ** len(orbits) > max_sequences:
            continue
        masks = (torch.arange(2 ** len(orbits))[:, None] >> torch.arange(len(orbits))) & 1  # [S, orbits]
        member = torch.zeros(len(orbits), n, dtype=torch.float64)
        for j, orbit in enumerate(orbits):
            member[j, orbit] = 1.0
        seqs = 1.0 - 2.0 * (masks.double() @ member)  # [S, n]
        reps = [orbit[0] for orbit in orbits if orbit[0] != 0]
        paf = periodic_autocorrelation(seqs)[:, reps].round().long()  # [S, r]
        sq = seqs.sum(1).round().long() ** 2
        I, J = torch.triu_indices(len(seqs), len(seqs))  # unordered pairs (i <= j)
        gen = torch.Generator().manual_seed(n)
        pair, target = [], []
        for M in (M1, M2):
            w = torch.randint(1, 2**29, (len(reps) + 1,), generator=gen)
            k = ((paf % M) * w[:-1] % M).sum(1) % M + sq * w[-1] % M  # [S] hash of (PAF, row sum²)
            pair.append((k[I] + k[J]) % M)  # the hash is additive: key(i, j) = k[i] + k[j]
            target.append((4 * n * int(w[-1]) - pair[-1]) % M)  # key(i, j) + key(k, l) = key(0, 4n)
        code, want = pair[0] * M2 + pair[1], target[0] * M2 + target[1]
        order = torch.argsort(code)
        sorted_code = code[order]
        pos = torch.searchsorted(sorted_code, want).clamp(max=len(code) - 1)
        for a in torch.nonzero(sorted_code[pos] == want).flatten().tolist():
            b = int(order[pos[a]])
            quad = seqs[torch.stack([I[a], J[a], I[b], J[b]])]
            total = periodic_autocorrelation(quad).sum(0)
            if torch.equal(total[1:], torch.zeros(n - 1, dtype=total.dtype)):
                log.debug("Goethals–Seidel n=%d: subgroup of order %d, %d orbits", n, len(G), len(orbits))
                return quad
    raise RuntimeError(f"no Goethals–Seidel quadruple of order {n} found from orbit unions")


def circulant(a: torch.Tensor) -> torch.Tensor:
    """C[i, j] = a[(j - i) mod n]; a [n] -> [n, n]."""
    n = a.shape[-1]
    idx = (torch.arange(n)[None, :] - torch.arange(n)[:, None]) % n
    return a[idx]


def goethals_seidel_hadamard(n: int) -> torch.Tensor:
    """Goethals–Seidel array of the four circulants A, B, C, D of order n, R the back identity; [4n, 4n]."""
    A, B, C, D = (circulant(s) for s in goethals_seidel_sequences(n))
    R = torch.eye(n, dtype=torch.float64).flip(1)
    return torch.cat([
        torch.cat([A, B @ R, C @ R, D @ R], 1),
        torch.cat([-B @ R, A, D.T @ R, -C.T @ R], 1),
        torch.cat([-C @ R, -D.T @ R, A, B.T @ R], 1),
        torch.cat([-D @ R, C.T @ R, -B.T @ R, A], 1),
    ], 0)


# --- Hadamard matrices ------------------------------------------------------------------------------
def sylvester_hadamard(n: int) -> torch.Tensor:
    """H[i, j] = (-1)^popcount(i & j), n a power of two; [n, n] float64 (symmetric)."""
    if not _is_pow2(n):
        raise ValueError(f"Sylvester construction needs a power of two, got {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def normalize_hadamard(H: torch.Tensor) -> torch.Tensor:
    """Flip row and column signs so the first row and first column are all +1 (still Hadamard)."""
    H = H * H[:, :1]
    return H * H[:1, :]


@functools.lru_cache(maxsize=None)
def _base_hadamard(K: int) -> torch.Tensor:
    kind, param = _CONSTRUCTION[K]
    if kind == "sylvester":
        H = sylvester_hadamard(param)
    elif kind == "paley1":
        H = paley1_hadamard(param)
    elif kind == "paley2":
        H = paley2_hadamard(param)
    elif kind == "double":
        H = torch.kron(_base_hadamard(param), sylvester_hadamard(2))
    else:
        H = goethals_seidel_hadamard(param)
    return normalize_hadamard(H)


def base_hadamard_matrix(K: int) -> torch.Tensor:
    """H_K for K in HADAMARD_K (normal form); [K, K] float64, a fresh tensor."""
    if K not in _CONSTRUCTION:
        raise ValueError(f"K={K} is not in HADAMARD_K={HADAMARD_K}")
    return _base_hadamard(K).clone()


@functools.lru_cache(maxsize=8)
def _hadamard(n: int) -> torch.Tensor:
    K, p = hadamard_factor(n)
    return torch.kron(_base_hadamard(K), sylvester_hadamard(p))


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """H_n = H_K ⊗ H_{2^m} for n = K·2^m, entries ±1, H Hᵀ = n I; [n, n] (a fresh tensor)."""
    return _hadamard(n).to(dtype=dtype, copy=True)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """Random ±1 vector, deterministic in seed; [n] float64."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1


def random_hadamard_matrix(n: int, seed: int) -> torch.Tensor:
    """QuaRot's random Hadamard Q = diag(s) · H_n / √n, s random ±1; orthogonal, [n, n] float64.

    The signs act before the Hadamard (x Q = (x ⊙ s) H), as in the official code (the Hadamard applied to the rows
    of diag(s)). Signs after it, H · diag(s), would only flip the signs of the rotated channels, which a symmetric
    quantizer of activations (per token) and of weights (per output row) reproduces exactly: every seed would give
    the same quantized model."""
    return random_signs(n, seed)[:, None] * _hadamard(n) / math.sqrt(n)


# --- fast transforms ---------------------------------------------------------------------------------
def fwht_(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """In-place fast Walsh–Hadamard transform on the last dim: x <- scale · x @ H_{2^m}; O(n log n).

    x must be contiguous with a power-of-two last dim; returns x.
    """
    n = x.shape[-1]
    if not _is_pow2(n):
        raise ValueError(f"fwht needs a power-of-two last dim, got {n}")
    if not x.is_contiguous():
        raise ValueError("fwht_ needs a contiguous tensor (use fwht for a copy)")
    y = x.view(-1, n)
    h = 1
    while h < n:
        v = y.view(-1, n // (2 * h), 2, h)
        a = v[:, :, 0, :].clone()
        v[:, :, 0, :].add_(v[:, :, 1, :])  # a + b
        v[:, :, 1, :].sub_(a).neg_()  # a - b
        h *= 2
    if scale != 1.0:
        x.mul_(scale)
    return x


def fwht(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Out-of-place ``fwht_``: scale · x @ H_{2^m} on the last dim, same dtype as x."""
    return fwht_(x.clone(memory_format=torch.contiguous_format), scale)


def _pow2_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ H_{2^m} on the last dim, with the CUDA kernel when present (it has no float64)."""
    if _cuda_fwht is not None and x.is_cuda and x.dtype != torch.float64:
        return _cuda_fwht(x.contiguous(), 1.0)
    return fwht(x)


def hadamard_transform(x: torch.Tensor, n: int | None = None, normalize: bool = True) -> torch.Tensor:
    """x @ H_n (/ √n when normalize) on the last dim, H_n exactly ``hadamard_matrix(n)``; x [..., d].

    n defaults to d; a smaller n dividing d transforms each contiguous block of n (block-diagonal H).
    Half-precision inputs are computed in float32 and returned in their dtype.
    """
    d = x.shape[-1]
    n = d if n is None else n
    if d % n:
        raise ValueError(f"Hadamard size {n} does not divide the last dim {d}")
    K, p = hadamard_factor(n)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    y = _pow2_transform(work.reshape(*x.shape[:-1], d // n, K, p))  # [..., blocks, K, 2^m] @ H_{2^m}
    if K > 1:
        y = _base_hadamard(K).to(y).T @ y  # (H_K ⊗ H_{2^m}): y[k', j] = Σ_k H_K[k, k'] y[k, j]
    if normalize:
        y = y * (1.0 / math.sqrt(n))
    return y.reshape(x.shape).to(x.dtype)


# --- widths without a Hadamard size: (a) pad, (b) block-diagonal -------------------------------------
def pad_last_dim(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dim of x to size; [..., n] -> [..., size]."""
    return torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def padded_hadamard_transform(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Option (a): pad x [..., n] with zeros to p = padded_hadamard_size(n), then x @ H_p; -> [..., p]."""
    return hadamard_transform(pad_last_dim(x, padded_hadamard_size(x.shape[-1])), normalize=normalize)


def block_hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Option (b): blockdiag(H_b, ..., H_b), b = block_hadamard_size(n); ±1 entries, H Hᵀ = b I; [n, n]."""
    b = block_hadamard_size(n)
    return torch.block_diag(*[_hadamard(b)] * (n // b)).to(dtype)


def block_hadamard_transform(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Option (b): x @ block_hadamard_matrix(d) (/ √b when normalize) on the last dim; x [..., d]."""
    return hadamard_transform(x, n=block_hadamard_size(x.shape[-1]), normalize=normalize)


@dataclass(frozen=True)
class RotationPlan:
    """Orthogonal rotation of a width-n channel axis: M = P · diag(s) · blockdiag(H_b) / √b (signs before the
    Hadamard, see :func:`random_hadamard_matrix`).

    width: n, the model's width. size: the rotated width (n for "block", the padded size for "pad").
    block: the Hadamard size b (size itself unless block-diagonal). P = [I_n 0] (identity unless padded).
    M [width, size] has orthonormal rows: fold a consuming linear W [out, n] as W M, a producing one
    A [n, in] as Mᵀ A; ``apply(x)`` = x @ M online.
    """

    width: int
    size: int
    block: int
    mode: str
    seed: int | None = None

    def signs(self) -> torch.Tensor | None:
        """The random ±1 diagonal [size] (QuaRot's random Hadamard), None without a seed."""
        return None if self.seed is None else random_signs(self.size, self.seed)

    def matrix(self) -> torch.Tensor:
        """Dense M [width, size], float64, for offline folding into weights."""
        M = torch.block_diag(*[_hadamard(self.block)] * (self.size // self.block)) / math.sqrt(self.block)
        s = self.signs()
        if s is not None:
            M = s[:, None] * M
        return M[: self.width]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ M with the fast transform; x [..., width] -> [..., size], dtype of x."""
        if x.shape[-1] != self.width:
            raise ValueError(f"expected last dim {self.width}, got {x.shape[-1]}")
        if self.size != self.width:
            x = pad_last_dim(x, self.size)
        s = self.signs()
        if s is not None:
            x = x * s.to(device=x.device, dtype=x.dtype)
        return hadamard_transform(x, n=self.block)


def rotation_for_width(n: int, mode: str = "pad", seed: int | None = None) -> RotationPlan:
    """The rotation of a width-n axis: the full Hadamard when n is a valid size, else pad or block.

    mode: "pad" (zero-pad to the next valid size) or "block" (block-diagonal); seed: random signs, or None.
    """
    if mode not in ROTATION_MODES:
        raise ValueError(f"mode={mode!r}: valid choices are {ROTATION_MODES}")
    if mode == "pad":
        size = padded_hadamard_size(n)
        return RotationPlan(width=n, size=size, block=size, mode=mode, seed=seed)
    return RotationPlan(width=n, size=n, block=block_hadamard_size(n), mode=mode, seed=seed)
