import os
import signal
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


@pytest.fixture(autouse=True)
def _isolated_temp_dir(tmp_path_factory, monkeypatch):
    """Temporary files of the programs a test starts go under pytest's basetemp: torchrun's agent makes a
    /tmp/torchelastic_* log folder per launch and never removes it (hundreds of them accumulated in /tmp). This
    process keeps its own temporary folder (tempfile caches it when pytest makes the basetemp)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))


# The process-wide settings that code run in this process may leave changed: the backend flags (the training loop
# puts back EDM's cudnn.benchmark and TF32 off when it ends, a test may set them), the stop handlers for SIGINT/SIGTERM
# (train.main gives them back; a test calling dist.stop_on_signals or a loop's handler itself may not: after them,
# Ctrl-C no longer interrupts pytest but asks every later training loop of this worker to stop) and the launchers'
# sys.excepthook (installed once per process).
_BACKEND_FLAGS = [(torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"),
                  (torch.backends.cudnn, "deterministic"), (torch.backends.cuda.matmul, "allow_tf32"),
                  (torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction"),
                  (torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction")]
_INITIAL_STATE = ([(module, name, getattr(module, name)) for module, name in _BACKEND_FLAGS],
                  {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}, sys.excepthook)


@pytest.fixture(autouse=True)
def _restore_process_state():
    """After each test the process is put back as pytest started it (also after a module-scoped fixture that runs a
    CLI), so that no test depends on the order: the CUDA tests' results on which training loop ran before them in this
    worker, say, or a subprocess's SIGINT on whether train.py replaced the ignored SIGINT of a background job."""
    yield
    flags, handlers, excepthook = _INITIAL_STATE
    for module, name, value in flags:
        setattr(module, name, value)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    sys.excepthook = excepthook
