"""Test-wide settings, applied before any test module imports transformers or datasets.

No hub is reachable here: huggingface_hub and datasets read the offline flags once, at import, so
they are set now rather than per test (a per-test setenv would leave each hub call waiting on a
network timeout). Activation caches go to a per-session temporary folder, never the user's cache.
"""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WORKBENCH_CACHE"] = tempfile.mkdtemp(prefix="workbench-test-cache-")
