"""The mathematics: bounds, objectives and their gradient estimators, annealed importance sampling. Tensors in,
tensors out; no files."""
