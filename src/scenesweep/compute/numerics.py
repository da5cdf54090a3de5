"""CPU numerics of the whole process, set once, before any of torch's threads start.

Denormal floats (below 1.2e-38) are flushed to zero. A head that learns little (near-collinear
features, dead ReLUs) drives gradients and Adam's second moments into that range, where x86
arithmetic is many times slower: measured on the pool5 head (random-weight VGG16, the
15-Scene-shaped folder, batch 8, 2 cores) an epoch went from 12.6 s to 33 s by epoch 6, and
172 ms per step over 40 epochs against the bare loop's 72 ms; flushed, 11 to 12 s every epoch
with the same losses to 4 decimals (values below 1.2e-38 do not move a float32 weight, nor a
feature).

It has to happen here, at import, not around a fit: the flag lives in each thread's MXCSR and
a new thread copies its creator's, so torch's OpenMP threads must be created after it is set.
Setting it only around the fit, in a process that had extracted features first (its thread
pool already running), left a pooling trial at 7.5 s per epoch for 4 epochs, then 25 s.

Imported for its effect by every compute module that runs torch. This module imports neither
MLflow, Optuna nor click.
"""
from __future__ import annotations

import torch

# False where the CPU cannot (then nothing changes).
FLUSHES_DENORMALS = torch.set_flush_denormal(True)
