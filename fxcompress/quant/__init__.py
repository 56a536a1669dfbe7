"""Quantization: observers, fake-quantization schemes and quantizers."""
