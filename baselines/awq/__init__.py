"""AWQ: activation-aware weight quantization (scale search + clip search), weight-only."""
