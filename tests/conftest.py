"""Suite-wide test settings.

Under pytest-xdist (`-n 2`, as scripts/test.sh runs it) each worker gets one torch thread, so two
workers use the machine's two cores without oversubscribing them; run alone, torch keeps its default.
"""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny tensors (faster, and immune to a busy CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
