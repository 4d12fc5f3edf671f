"""The command line with which the tests start torchrun on CPU ranks: `--standalone`, never a port the test picked.

A port found free by binding a socket to port 0 and closing it is not reserved. Until torchrun's agent binds it, seconds
later (Python and torch start first), any other bind to port 0 on the machine may be given the same port: gloo's
listening sockets and rendezvous stores of a test run going on beside this one, or any other program. torchrun then
fails with "The server socket has failed to listen on any local network address ... EADDRINUSE", and a re-run passes.
With `--standalone` the agent binds its rendezvous store to port 0 itself and the workers use that same store (their
MASTER_PORT is its port, TORCHELASTIC_USE_AGENT_STORE=True; torch 2.5.1 and 2.14.1 alike), so every port is chosen by
the bind that holds it.
"""

import sys


def torchrun(nproc: int, script: str, *args) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node=N script args...` for subprocess.run."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
            *(str(arg) for arg in args)]
