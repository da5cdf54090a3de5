"""CPU numerics and memory of the whole process, set once, before torch allocates or starts threads.

1. Denormal floats (below 1.2e-38) are flushed to zero. A head that learns little (near-collinear
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

2. Buffers of 2 MiB and more are allocated on transparent huge pages (PyTorch's own
   ``THP_MEM_ALLOC_ENABLE``, which c10 reads once, at its first large allocation). A head's step
   on CPU is not bound by its arithmetic but by the kernel's page faults: backward allocates
   fc6's weight gradient afresh every step (25088 x 1024 floats, 100 MB, for the study's pool5
   head), glibc maps it from the kernel (it is over malloc's 32 MB mmap ceiling), and every 4 KiB
   page faults on first touch: 25,000 minor faults a step. Measured on an AMD EPYC Zen 3, 2 cores
   (``benchmarks/head_floor.py``): the bare loop at batch 8 took 93-104 ms a step with 4 KiB pages
   and 59-62 ms with huge pages (1,100 faults a step), the same on random and on real max-, avg-
   and lp1-pooled features. Eager VGG16 extraction at 224 px was unchanged (within run-to-run
   noise). A value the user set (``THP_MEM_ALLOC_ENABLE=0``) is kept.

Imported for its effect by every compute module that runs torch. This module imports neither
MLflow, Optuna nor click.
"""
from __future__ import annotations

import os

# Before torch allocates anything large (c10 caches the variable at that first allocation).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402  (after the allocator's setting)

# False where the CPU cannot (then nothing changes).
FLUSHES_DENORMALS = torch.set_flush_denormal(True)
HUGE_PAGE_ALLOCATIONS = os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
