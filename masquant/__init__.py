"""masquant: post-training quantization of multimodal LLMs."""

__version__ = "0.1.0"
