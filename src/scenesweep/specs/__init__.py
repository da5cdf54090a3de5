"""Files users write, read and checked before anything runs: study files (``studies``),
experiment files (``experiments``) and their resolution for one invocation (``plans``).
No MLflow, Optuna or click."""
