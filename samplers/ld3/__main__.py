"""`python -m samplers.ld3 ...`: an alias of the command line `python ld3.py ...` beside generate.py."""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import ld3
    from dnnlib import util
    util.run_cli(ld3.cli)
