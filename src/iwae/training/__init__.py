"""Training: the settings, one seed's state, the step, the loop, and the seeds it trains (alone or stacked)."""
