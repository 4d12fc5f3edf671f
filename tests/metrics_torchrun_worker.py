"""Runs several fid.py commands in one torchrun launch (tests/test_fid_cli.py); argv[1]: JSON list of argv lists."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(1)

import fid  # noqa: E402

if __name__ == "__main__":
    for args in json.loads(sys.argv[1]):
        fid.main(args, standalone_mode=False)
