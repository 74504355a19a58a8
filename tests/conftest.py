"""Test-suite wide setup.

With no GPU, the Triton kernels run through Triton's CPU interpreter, so CI checks
the real kernels rather than only their references. The flag must be set before
triton is first imported (``triton.jit`` reads it at decoration time).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
