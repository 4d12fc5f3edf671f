"""The runs a training run continues: train.py's resumes write each into a new run directory, whose
training_options.json names the state it resumed from. phema.py and report.py follow that chain so that a resumed
run's EMAs and statistics include those of the runs before it. No torch here (report.py draws without it)."""

import json
import os
import re
import warnings

_STATE_RE = re.compile(r'training-state-(\d+)\.pt$')


def run_chain(run_dir: str, what: str = 'files') -> list[tuple[str, int | None]]:
    """[(directory, last kimg to use or None)], the earliest run first: each run that `run_dir` resumed from (its
    training_options.json names the state), up to the kimg of that state, then `run_dir` itself. A predecessor that
    is not found where the options say ends the chain there, with a warning that its earlier `what` are left out."""
    chain, seen, current, limit = [], set(), run_dir, None
    while os.path.realpath(current) not in seen:
        seen.add(os.path.realpath(current))
        chain.append((current, limit))
        try:
            with open(os.path.join(current, 'training_options.json')) as f:
                options = json.load(f)
            state = options.get('resume_state_dump')
            if isinstance(state, str) and os.path.realpath(os.path.dirname(state)) == os.path.realpath(current):
                # --nosubdir resumed in its own folder: train.py kept the state the folder's run continued.
                state = options.get('continued_state_dump')
        except (OSError, ValueError, AttributeError):
            break
        match = _STATE_RE.search(os.path.basename(state or ''))
        if not match:
            break
        previous = os.path.dirname(state)
        if not os.path.isdir(previous):
            # Recorded relative to the folder train.py ran in (runs before paths were made absolute), or absolute on
            # a machine or disk the runs were since copied or moved from (an --outdir moved whole, runs copied from a
            # cluster to draw reports): the usual place is beside this run, in the same --outdir.
            beside = os.path.join(os.path.dirname(os.path.abspath(current)), os.path.basename(previous))
            previous = beside if os.path.isdir(beside) else previous
        if not os.path.isdir(previous):
            where = (f' (looked for it there and beside {current})' if os.path.isabs(state) else
                     f' (a relative path: looked for it from {os.getcwd()} and beside {current})')
            warnings.warn(f'{current} resumed from {state}, whose run directory is not found{where}: its earlier '
                          f'{what} are left out', stacklevel=2)
            break
        current, limit = previous, int(match.group(1)) if limit is None else min(limit, int(match.group(1)))
    return chain[::-1]
