"""Evaluating a model: importance-sampled likelihoods and their statistics, exact enumeration, active units,
gradient SNR diagnostics. Tensors in, tensors out."""
