"""Audio samples: band-limited resampling to a model's rate."""

from __future__ import annotations

import numpy as np


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling by the FFT (clips are a few seconds long)."""
    if rate_in == rate_out:
        return x.astype(np.float32)
    n_out = int(round(len(x) * rate_out / rate_in))
    X = np.fft.rfft(x)
    keep = n_out // 2 + 1
    Y = np.zeros(keep, dtype=complex)
    Y[:min(keep, len(X))] = X[:min(keep, len(X))]
    return (np.fft.irfft(Y, n_out) * (n_out / len(x))).astype(np.float32)
