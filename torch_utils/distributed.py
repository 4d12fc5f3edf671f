"""torch.distributed under torchrun: NCCL on CUDA, gloo otherwise; a plain single process when not launched by torchrun.

Usage: call `init()` once at the start of a CLI, then `get_rank()`, `get_world_size()`, `print0()`, `barrier()`,
`device()` anywhere. Nothing here is home-made distribution: it is torch.distributed configured from torchrun's
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""

import atexit
import datetime
import io
import os
import signal
import sys
import threading
import time
import traceback
import warnings

import torch
import torch.distributed as dist

_device: torch.device | None = None


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(backend: str | None = None, device: str | torch.device | None = None, timeout_s: float = 1800) -> None:
    """Initialise the process group from torchrun's environment (no-op when single-process or already done).

    backend: None picks 'nccl' when CUDA is available and 'gloo' otherwise.
    device: None picks cuda:LOCAL_RANK when CUDA is available, else cpu.
    """
    global _device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    _device = torch.device(device)
    if _device.type == "cuda":
        if _device.index is None:  # 'cuda' (train.py --device=cuda): this process's GPU; set_device needs an index
            _device = torch.device("cuda", local_rank)
        torch.cuda.set_device(_device)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1 or dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if _device.type == "cuda" else "gloo"
    kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        kwargs["device_id"] = _device
    dist.init_process_group(**kwargs)
    atexit.register(_destroy_at_exit)


def _destroy_at_exit() -> None:
    """Destroy the process group at a normal interpreter exit, while the interpreter is still whole (no-op after
    shutdown()). Left to interpreter finalization, gloo's worker threads and the tensors they hold are torn down in no
    fixed order, and now and then a rank aborts with "terminate called without an active exception" (SIGABRT) after all
    its work is done, which torchrun reports as a failure. A rank that dies of an uncaught exception leaves through
    excepthook_abort_all_ranks()'s os._exit, which runs no atexit handler.

    The sleep first: before torch 2.8 (pytorch/pytorch#154976) the process group's destructor joins gloo's worker
    threads while holding the GIL, and a worker still releasing the last collective's tensor (one Python no longer
    holds) waits for the GIL: both wait forever (2 in 10 two-rank fid.py runs on a loaded CPU hung so under torch
    2.5.1). Sleeping releases the GIL for the microseconds that worker needs; it costs 0.1 s once per run."""
    if is_distributed():
        time.sleep(_EXIT_GRACE_S)
        dist.destroy_process_group()


_EXIT_GRACE_S = 0.1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def check_single_process(program: str) -> None:
    """ValueError when this process is one of several (torchrun with more than one process) and `program` does not
    split its work over ranks: every rank would do all of it and write the same files."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise ValueError(f"{program} runs as one process (it does not split its work over ranks), but torchrun "
                         f"started {world_size}: run it with python, or torchrun --nproc_per_node=1")


def device() -> torch.device:
    """The device chosen by init() (cpu when init() has not run and CUDA is absent)."""
    if _device is not None:
        return _device
    return torch.device("cuda", get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)


def warn0(message: str, category: type[Warning] = UserWarning, stacklevel: int = 1) -> None:
    """warnings.warn() on rank 0 only: for conditions every rank sees alike (options, files, data), which would
    otherwise print once per GPU. `stacklevel` counts as in warnings.warn, from the caller of warn0."""
    if get_rank() == 0:
        warnings.warn(message, category, stacklevel=stacklevel + 1)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (identity when single-process). Gloo needs CPU tensors, NCCL CUDA ones."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Destroy the process group now (as at exit, see _destroy_at_exit)."""
    _destroy_at_exit()


_stop_signal: int | None = None  # the signal that asked this process to stop (see stop_on_signals)
_stop_signal_time = 0.0  # when it came (time.monotonic)
_stop_agreed = False
# A second SIGINT sooner than this after the first is taken for the same Ctrl-C arriving twice: from the terminal (the
# whole foreground process group) and from a launcher that forwards the SIGINT it got (torchrun's agent forwards it,
# though the workers it starts in sessions of their own get only its copy).
REPEATED_INTERRUPT_S = 1.0


def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT)) -> None:
    """On SIGTERM (a scheduler's pre-emption, scancel, a torchrun agent stopping its workers) or Ctrl-C, ask the
    training loop to stop at its next check, writing a snapshot and a training state first, instead of dying with the
    work since the last state (EDM's state comes every 500 ticks: 25 Mimg). A second Ctrl-C stops at once, without
    a state (KeyboardInterrupt). Main thread only (Python's rule for signal handlers)."""
    def handler(signum, frame):
        global _stop_signal, _stop_signal_time
        del frame
        now = time.monotonic()
        if _stop_signal is None:
            again = ' (Ctrl-C again to stop at once, without it)' if signum == signal.SIGINT else ''
            sys.stderr.write(f'rank {get_rank()}: received {signal.Signals(signum).name}: stopping at the next check '
                             f'after writing a training state{again}\n')  # one write: ranks' lines do not interleave
            sys.stderr.flush()
            _stop_signal, _stop_signal_time = signum, now
        elif signum == signal.SIGINT == _stop_signal and now - _stop_signal_time >= REPEATED_INTERRUPT_S:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt

    global _stop_signal, _stop_agreed
    _stop_signal, _stop_agreed = None, False  # a second run in one process (a notebook's) starts unasked
    if threading.current_thread() is not threading.main_thread():
        return  # a run in a thread (a notebook training in the background): only the main thread may set handlers,
        # and it is the one signals interrupt; train.main failed with "signal only works in main thread" instead
    handler._stops_the_run = True
    for signum in signals:
        previous = signal.signal(signum, handler)
        if not getattr(previous, "_stops_the_run", False):  # the caller's (a second call keeps the first's)
            _replaced_handlers[signum] = previous


_replaced_handlers: dict = {}  # signal -> the handler stop_on_signals replaced (restore_signal_handlers)


def restore_signal_handlers() -> None:
    """Give back the handlers stop_on_signals replaced, when the run it served has ended. The process may go on (a
    notebook, a sweep script calling train.main): with the run's handler left in place its first Ctrl-C only printed
    "stopping at the next check" and every SIGTERM was ignored until a SIGKILL."""
    while _replaced_handlers:
        signum, handler = _replaced_handlers.popitem()
        if handler is not None:  # None: installed outside Python, cannot be put back
            signal.signal(signum, handler)


def stop_requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _stop_signal


def stop_agreed() -> bool:
    """Whether should_stop() has answered True (on every rank alike; no communication)."""
    return _stop_agreed


def should_stop() -> bool:
    """Whether any rank was asked to stop (stop_on_signals); the same answer on every rank (one all-reduce: call
    it where all ranks are, e.g. at a tick's end). Once True, stays True."""
    global _stop_agreed
    if not _stop_agreed:
        on = device() if is_distributed() else 'cpu'
        flag = torch.tensor([0 if _stop_signal is None else 1], dtype=torch.int32, device=on)
        all_reduce_sum_(flag)
        _stop_agreed = bool(flag.item())
    return _stop_agreed


def update_progress(cur: int, total: int) -> None:
    """Hook for cluster schedulers (EDM has the same); does nothing here."""
    del cur, total


# What gloo and NCCL raise on a rank whose peer has gone (it failed first, and said why in its own output).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another rank ended (its error is the one to read)."""
    if not isinstance(exc, RuntimeError):  # DistBackendError and gloo's errors are RuntimeErrors
        return False
    return any(text in str(exc) for text in _PEER_GONE)


def excepthook_abort_all_ranks() -> None:
    """Make an uncaught exception on one rank end the job instead of leaving the others hanging in a collective.

    The traceback goes to the process's real stderr: torch's init_process_group wraps a hook installed before it and
    points sys.stderr at a buffer while calling it, which os._exit would then discard (generate.py lost every
    traceback under torchrun). A rank that fails only because another rank has gone says so in one line instead of
    a page of gloo internals; the other rank's error above it is the cause."""
    previous = sys.excepthook
    if getattr(previous, "_aborts_all_ranks", False):  # installed by an earlier CLI call in this process (a sweep):
        return  # wrapped once more per call, a few thousand calls made the hook itself fail with a RecursionError

    def hook(exc_type, exc, tb):
        if is_distributed() and get_world_size() > 1 and is_peer_failure(exc):
            print(f"[rank{get_rank()}]: stopping: another rank ended ({str(exc).splitlines()[0][:200]}); its own "
                  f"error, above, is the cause", file=sys.__stderr__, flush=True)
        elif isinstance(sys.stderr, io.StringIO) and sys.__stderr__ is not None:  # torch's buffer (see above)
            traceback.print_exception(exc_type, exc, tb, file=sys.__stderr__)
        else:
            previous(exc_type, exc, tb)
        sys.stderr.flush()
        if sys.__stderr__ is not None:
            sys.__stderr__.flush()
        if is_distributed() and get_world_size() > 1:
            os._exit(1)

    hook._aborts_all_ranks = True
    sys.excepthook = hook
