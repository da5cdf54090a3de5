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

2. Large buffers stay on the kernel's 4 KiB pages: PyTorch's ``THP_MEM_ALLOC_ENABLE`` (2 MiB
   pages for every allocation of 2 MiB and more) is not set. It made a head step faster (fc6's
   100 MB weight gradient, allocated afresh at every step, faulted 25,000 times on 4 KiB pages),
   but every other large allocation slower where the machine is a virtual machine that reports
   free memory to its host (virtio-balloon free page reporting: a fresh huge page is one the
   host faults in again). Measured on this project's AMD EPYC Zen 3 VM, 2 cores
   (``benchmarks/huge_pages.py``): VGG16 built with random weights in 9.5 s instead of 1.5 s, and
   with fc6/fc7 16384 wide in 29 s instead of 6.3 s. The head's first layer now keeps its weight
   gradient in one buffer (``compute/mlp_layers.py``): 51 ms a step on 4 KiB pages, as fast as
   huge pages made it. A value the user sets (``THP_MEM_ALLOC_ENABLE=1``) is PyTorch's to read.

Imported for its effect by every compute module that runs torch. This module imports neither
MLflow, Optuna nor click.
"""
from __future__ import annotations

import os

import torch

# False where the CPU cannot (then nothing changes).
FLUSHES_DENORMALS = torch.set_flush_denormal(True)
# Whether PyTorch maps large buffers on huge pages (only where the user asked for it).
HUGE_PAGE_ALLOCATIONS = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
