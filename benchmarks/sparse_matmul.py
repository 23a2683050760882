"""CPU speed of the product a sparsified activation feeds: sparse input × dense weight vs the dense product.

    .venv/bin/python benchmarks/sparse_matmul.py                      # testbed MLP widths, 1 thread
    .venv/bin/python benchmarks/sparse_matmul.py --shapes 4096x11008,11008x4096 --tokens 1

LaRoSA and TEAL keep K of the D input channels of every token, so y = x Wᵀ needs only K columns of W (rows of
Wᵀ [D, out], stored contiguous here). Kernels, all with torch's own CPU operators (no custom kernel):

- ``dense``: F.linear(x, W), the reference;
- ``gather``: per token, Wᵀ[kept] copied out (index_select) and multiplied (x_kept @ Wᵀ[kept]);
- ``bag``: F.embedding_bag over Wᵀ with the kept values as per-sample weights: each token's output is the weighted
  sum of its K kept rows, every token of the block in one call, no copy (the GEMV TEAL's kernels compute);
- ``csr``: x as a sparse CSR tensor times the dense Wᵀ (torch.sparse.mm);
- ``union``: the block's tokens share one gather of the union of their kept channels (a batched GEMM reads a row
  of W if any token of the block keeps it; with per-token Top-K that union is close to all of D).

Also timed: the selection itself (Top-K of [N, D]) and LaRoSA's rotation x Q ([N, D] @ [D, D], block inputs only;
shared by q/k/v and by gate/up). Speed-up = dense / best sparse kernel (without the selection). Inputs are
Gaussian, sparsified per token by magnitude.

Times are the CPU time of the calling thread (``time.thread_time``; torch runs its single intra-op thread there),
per call, the minimum over repeats of blocks of calls: on a shared machine wall-clock medians measure the
neighbours (the same dense product read 140 µs to 3.7 ms in one run here), thread CPU time does not count the
time the thread waits to be scheduled. Cache interference from other processes still adds noise; hence the min.
Only meaningful with ``--threads 1`` (other threads' CPU time would not be counted).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from baselines.larosa.core import kept_count, top_k_magnitude  # noqa: E402


def gather_matmul(x: torch.Tensor, Wt: torch.Tensor) -> torch.Tensor:
    """Per token: x[kept] @ Wt[kept] (x [N, D] sparse rows, Wt [D, out])."""
    out = []
    for row in x:
        idx = row.nonzero().squeeze(1)
        out.append(row[idx] @ Wt.index_select(0, idx))
    return torch.stack(out)


def bag_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept indices [nnz], bag offsets [N], kept values [nnz]) of x [N, D] for F.embedding_bag."""
    rows, cols = x.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=x.shape[0])
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    return cols, offsets, x[rows, cols]


def bag_matmul(x: torch.Tensor, Wt: torch.Tensor) -> torch.Tensor:
    """Σ_kept x_i Wt[i] per token with F.embedding_bag (the index extraction included)."""
    idx, offsets, vals = bag_inputs(x)
    return F.embedding_bag(idx, Wt, offsets, mode="sum", per_sample_weights=vals)


def union_matmul(x: torch.Tensor, Wt: torch.Tensor) -> torch.Tensor:
    """x[:, U] @ Wt[U] with U the union of the block's kept channels."""
    idx = (x != 0).any(0).nonzero().squeeze(1)
    return x.index_select(1, idx) @ Wt.index_select(0, idx)


def cpu_us(fn, min_run_time: float, repeats: int = 7) -> float:
    """Per-call thread CPU time of ``fn()`` in µs: the minimum over ``repeats`` blocks of calls (see the docstring)."""
    fn()  # warm-up
    n, t0 = 0, time.thread_time()
    while time.thread_time() - t0 < min_run_time / repeats or n < 1:  # calls per block
        fn()
        n += 1
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        best = min(best, (time.thread_time() - t0) / n)
    return best * 1e6


def measure(d_in: int, d_out: int, tokens: int, sparsity: float, min_run_time: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5  # [out, in]
    Wt = W.T.contiguous()  # [in, out]: a kept input channel is one contiguous row
    x_dense = torch.randn(tokens, d_in, generator=g)
    k = kept_count(d_in, sparsity)
    x = top_k_magnitude(x_dense, k)
    Q = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))[0]
    ref = F.linear(x, W)
    kernels = {"gather": gather_matmul, "bag": bag_matmul, "union": union_matmul,
               "csr": lambda x, Wt: torch.sparse.mm(x.to_sparse_csr(), Wt)}
    for name, fn in kernels.items():  # every kernel computes the same product
        torch.testing.assert_close(fn(x, Wt), ref, rtol=1e-4, atol=1e-4, msg=f"{name} differs from the dense product")
    row = {"shape": f"{d_in}->{d_out}", "tokens": tokens, "sparsity": sparsity, "kept": k,
           "dense": cpu_us(lambda: F.linear(x, W), min_run_time)}
    for name, fn in kernels.items():
        row[name] = cpu_us(lambda fn=fn: fn(x, Wt), min_run_time)
    row["topk"] = cpu_us(lambda: top_k_magnitude(x_dense, k), min_run_time) if k < d_in else 0.0
    row["rotation"] = cpu_us(lambda: x_dense @ Q, min_run_time)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="576x1536,1536x576", help="comma-separated IN x OUT widths")
    parser.add_argument("--sparsities", default="0,0.25,0.4,0.5")
    parser.add_argument("--tokens", default="1,16", help="tokens per call: 1 = one decoding step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds per timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernels = ("gather", "bag", "csr", "union")
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    print(f"sparse input x dense weight on the CPU, float32, {args.threads} thread(s); thread CPU µs per call (min)\n")
    print("| in→out | tokens | sparsity | kept | dense | " + " | ".join(kernels)
          + " | best speed-up | Top-K | rotation xQ |")
    print("|---|---|---|---|---|" + "---|" * len(kernels) + "---|---|---|")
    with torch.no_grad():
        for shape in args.shapes.split(","):
            d_in, d_out = (int(v) for v in shape.lower().split("x"))
            for tokens in (int(t) for t in args.tokens.split(",")):
                for sparsity in (float(s) for s in args.sparsities.split(",")):
                    r = measure(d_in, d_out, tokens, sparsity, args.min_run_time)
                    best = min(kernels, key=lambda n: r[n])
                    print(f"| {r['shape']} | {tokens} | {sparsity:.2f} | {r['kept']} | {r['dense']:.1f} | "
                          + " | ".join(f"{r[n]:.1f}" for n in kernels)
                          + f" | {r['dense'] / r[best]:.2f}× ({best}) | {r['topk']:.1f} | {r['rotation']:.1f} |",
                          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
