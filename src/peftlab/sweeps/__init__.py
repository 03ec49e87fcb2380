"""Sweeps (grids, sampled searches, seeds) over ordinary runs, shared through an Optuna study; exact
trainable-parameter counts before training (budgets) and LoRA plans that fit a budget."""
