"""Test-wide settings, applied before any test module imports transformers or datasets, and
inherited by the kernels nbval starts for the notebooks.

No hub is reachable here: huggingface_hub and datasets read the offline flags once, at import, so
they are set now rather than per test (a per-test setenv would leave each hub call waiting on a
network timeout). Activation caches go to a per-session temporary folder, never the user's cache;
the notebooks share it, so the series harvests the default activations once per test run. The
notebooks run in the quick profile.
"""
import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WORKBENCH_CACHE"] = tempfile.mkdtemp(prefix="workbench-test-cache-")
os.environ["WORKBENCH_PROFILE"] = "quick"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: at these tiny sizes extra OpenMP threads only add
    overhead, and on a shared 2-core machine their spinning can slow a step a hundredfold. The
    checkpoint kill test also needs it: its child process computes with one thread too, so their
    floating-point results match."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
