"""Runs several fid.py commands in one torchrun launch (tests/test_fid_cli.py); argv[1]: JSON list of argv lists.

Optional environment for the tests of what each rank sees:
  METRICS_WORKER_HIDE = JSON {"rank": R, "dir": DIR, "name": NAME}: rank R does not see DIR/NAME when it lists DIR
      (as a node whose copy of the folder lags behind);
  METRICS_WORKER_REPORT_ERRORS = 1: a command's CLI error is printed as "rank R error: MESSAGE" and the next command
      runs, so that the test can tell that every rank refused, not just the first one to fail.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import fid  # noqa: E402


def _hide_file_on_one_rank(spec: dict) -> None:
    import training.dataset

    if os.environ.get("RANK") != str(spec["rank"]):
        return
    real_walk, hidden_dir = os.walk, os.path.realpath(spec["dir"])

    def walk(top, *args, **kwargs):
        for root, dirs, files in real_walk(top, *args, **kwargs):
            if os.path.realpath(root) == hidden_dir:
                files = [f for f in files if f != spec["name"]]
            yield root, dirs, files

    training.dataset.os.walk = walk  # the os module itself: this worker process only


if __name__ == "__main__":
    if os.environ.get("METRICS_WORKER_HIDE"):
        _hide_file_on_one_rank(json.loads(os.environ["METRICS_WORKER_HIDE"]))
    report_errors = os.environ.get("METRICS_WORKER_REPORT_ERRORS") == "1"
    for args in json.loads(sys.argv[1]):
        try:
            fid.main(args, standalone_mode=False)
        except click.ClickException as err:
            if not report_errors:
                raise
            print(f"rank {os.environ.get('RANK')} error: {err.format_message()}", flush=True)
