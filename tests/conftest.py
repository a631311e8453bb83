"""Test-wide settings. Triton kernels run under the interpreter on machines without CUDA:
TRITON_INTERPRET must be set before any kernel module is imported, so it is set here."""
import os

import pytest
import torch

from adtuning.name_clash import prefer_installed_kernels

prefer_installed_kernels()  # the checkout's kernels/ must not hide the PyPI package transformers imports

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def embedded_corpus_cache(tmp_path_factory):
    """One ``--corpus-cache`` for the session's CLI tests: an embedded corpus is generated once
    (the KS corpus takes ~20 s on 2 cores) and reused by every module that runs the CLI."""
    return tmp_path_factory.mktemp("embedded-corpora")
