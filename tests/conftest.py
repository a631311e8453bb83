"""Test-wide settings. Triton kernels run under the interpreter on machines without CUDA:
TRITON_INTERPRET must be set before any kernel module is imported, so it is set here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
