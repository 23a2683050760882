"""Baseline methods, each a plugin of the same shape as masquant.methods.masquant."""
