"""Run directories: training, evaluating and drawing a run into its files, stacked runs, and the paper's tables."""
