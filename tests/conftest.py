import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tests share 2 CPU cores with each other and with torchrun children: one intra-op thread keeps timings stable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Downloads and caches of a test never touch the user's ~/.cache."""
    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path / "dnnlib-cache"))
