import os
import sys

import pytest

# One intra-op thread for this process and every CLI subprocess the tests start: the tests share 2 CPU cores with each
# other and with torchrun children, and oversubscribed OpenMP threads spin-wait (tiny convolutions became ~100x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Downloads and caches of a test never touch the user's ~/.cache."""
    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path / "dnnlib-cache"))
