"""Hyperparameter search with Optuna: the space, the study and its report."""
