"""MBQ: modality-balanced quantization (AWQ-style search with a vision/answer-weighted loss)."""
