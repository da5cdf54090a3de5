"""Optuna mechanics, free of MLflow: the storage and the study lock (``storage``), samplers and
pruners (``sampling``), the budget, workers, dead trials and heartbeats (``trials``)."""
