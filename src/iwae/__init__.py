"""Importance-weighted autoencoders and multi-sample variational objectives in PyTorch."""

__version__ = "0.1.0"
