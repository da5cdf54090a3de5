"""Optuna mechanics, free of MLflow: the storage and the study lock (``optuna_storage``), samplers
and pruners (``sampling``), the budget, workers, dead trials and heartbeats (``trials``), the
heads kept for the front (``kept_heads``), and Optuna's private parts in one place
(``optuna_internals``)."""
