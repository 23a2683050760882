"""Calibration data, layer-wise capture, running statistics and their cache."""
