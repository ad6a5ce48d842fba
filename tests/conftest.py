"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread (opt in with ``pytestmark = pytest.mark.usefixtures(...)``).

    Tiny matrices gain nothing from threads, and on a busy 2-core machine several threaded torch processes
    slow each other down about tenfold.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
