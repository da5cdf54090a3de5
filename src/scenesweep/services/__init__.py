"""Processes the project starts and stops: local web servers for browsing the stores
(``servers``: the MLflow UI, optuna-dashboard) and the shared PostgreSQL + MLflow server for
workers on several machines (``shared_services``, with its ``folder`` and ``postgres``).
No MLflow, Optuna or click imported here."""
