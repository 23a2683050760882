"""Calibration data (``data``), running statistics and Gram matrices of the inputs of a block's linears (``stats``),
their on-disk cache (``cache``) and audio samples (``audio``)."""
