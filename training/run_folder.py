"""Run folders: EDM's numbered run directories (claimed by creating them), the files a run writes, and the
leftovers of interrupted runs (half-written files removed; an interrupted trajectory's files set aside, never
deleted). train.py's helpers (errors are click's, naming the option); no torch here."""

import itertools
import os
import re
import shutil

import click

import dnnlib


def remove_stale_temp_files(outdir: str) -> None:
    """Half-written snapshots and states of killed runs (their writers are dead) in --outdir and its run folders."""
    if not os.path.isdir(outdir):
        return
    for directory in [outdir, *(os.path.join(outdir, name) for name in sorted(os.listdir(outdir)))]:
        if os.path.isdir(directory):
            for path in dnnlib.util.remove_stale_temp_files(directory):
                print(f'Removed {path}, left by a run that was killed while writing it')


def next_run_dir(outdir: str, desc: str, nosubdir: bool, create: bool = False) -> str:
    """EDM's naming: {id:05d}-{desc}, id = 1 + the largest numeric prefix among the directories in outdir.

    create=True makes the directory, with a number no other run holds: two runs started at once into one --outdir
    both listed it before either created its folder, and shared one (EDM's makedirs(exist_ok=True))."""
    if nosubdir:
        return outdir
    floor = 0
    while True:
        prev_run_ids = []
        if os.path.isdir(outdir):
            for name in os.listdir(outdir):
                match = re.match(r'^\d+', name)
                if match and os.path.isdir(os.path.join(outdir, name)):
                    prev_run_ids.append(int(match.group()))
        run_id = max(max(prev_run_ids, default=-1) + 1, floor)
        path = os.path.join(outdir, f'{run_id:05d}-{desc}')
        if not create:
            return path
        os.makedirs(outdir, exist_ok=True)
        try:
            os.mkdir(path)
            return path
        except FileExistsError:  # taken since the listing (or a file of that name): the next number
            floor = run_id + 1


# What a run writes into its folder; with --nosubdir, a folder holding any of these holds another run (its log.txt
# and report.png too, but such generic names alone do not say so).
RUN_FILES = re.compile(r'stats\.jsonl|training_options\.json|(training-state|network-snapshot)-\d+\.(pt|pkl)|'
                        r'phema-\d+-[0-9.]+\.pkl')


def set_aside(parent: str, prefix: str, names: list[str]) -> str:
    """Move the files `names` of `parent` that exist into a new folder `parent/prefix-K` (the first free K); returns
    that folder."""
    for k in itertools.count(1):
        aside = os.path.join(parent, f'{prefix}-{k}')
        try:
            os.mkdir(aside)
            break
        except FileExistsError:
            continue
    for name in names:
        if os.path.exists(os.path.join(parent, name)):
            os.replace(os.path.join(parent, name), os.path.join(aside, name))
    return aside


_KIMG_FILES = re.compile(r'(?:network-snapshot-|training-state-|phema-)(\d+)(?:-\d+\.\d+)?\.(?:pkl|pt)')


def file_kimg(path: str) -> int | None:
    """The kimg in the name of a run's snapshot, training state or phema EMA (None for another name, such as a copy
    kept as training-state-best.pt). Order a run's files by it, not by name: from 1,000,000 kimg on the names have 7
    digits."""
    match = _KIMG_FILES.fullmatch(os.path.basename(path))
    return int(match.group(1)) if match else None


# And what is made of them under their names: fid.py's results beside a snapshot (network-snapshot-000400-
# fid50k_full.json) and phema.py's reconstructions at a kimg (network-phema-000400-0.070.pkl) with theirs.
_KIMG_FILES_AND_RESULTS = re.compile(r'(?:network-snapshot-|network-phema-|training-state-|phema-)(\d+)'
                                     r'(?:-\d+\.\d+)?(?:\.(?:pkl|pt)|-[^/]+\.json)')


def set_aside_later_files(run_dir: str, kimg: int) -> tuple[str, list[str]] | None:
    """A --nosubdir resume in the run's own folder from a state at `kimg`: the snapshots, phema EMAs and states of
    later kimg are the interrupted trajectory's (another one when the resume changes options), and phema.py would
    mix them with the new ones; their FID results and post-hoc reconstructions would be kept as those of the new
    snapshots of the same names (fid.py --network=RUN_DIR, report.py). Moves them into a new folder of run_dir;
    returns it and the names (None: none)."""
    later = sorted(name for name in os.listdir(run_dir)
                   if (match := _KIMG_FILES_AND_RESULTS.fullmatch(name)) and int(match.group(1)) > kimg)
    if not later:
        return None
    return set_aside(run_dir, f'superseded-after-kimg-{kimg}', later), later


def remove_unstarted_run_dir(run_dir: str) -> None:
    """A state the options cannot continue is found only when the loop loads it (its optimizer's parameters, e.g.
    another GDD freeze level), after the new run's folder was made: remove that folder while it holds only what was
    written before the loop, so that it does not stand beside the real run as an empty one."""
    if set(os.listdir(run_dir)) <= {'log.txt', 'training_options.json'}:
        shutil.rmtree(run_dir, ignore_errors=True)


def check_nosubdir(outdir: str, resume: str | None, restarted: bool) -> list[str]:
    """--nosubdir: a folder holding another run's files (RUN_FILES) would mix two runs, so is refused; a resume from
    a state in that folder continues its run. `restarted`: --resume=auto found no state there (nor another run's), as
    for a job killed before its first training state and started again by its script: nothing to resume, and the
    returned files are set aside (set_aside_before_run) for the fresh start."""
    if (resume is not None and os.path.dirname(resume) == outdir) or not os.path.isdir(outdir):
        return []
    used = sorted(name for name in os.listdir(outdir) if RUN_FILES.fullmatch(name))
    if not used or restarted:
        return used
    shown = ', '.join(used[:3]) + (', ...' if len(used) > 3 else '')
    mix = 'would mix the two' if resume is None else f'would mix it with the run resumed from {resume}'
    raise click.BadParameter(f'{outdir} holds another run ({shown}): --nosubdir {mix}; use another --outdir, or '
                             f'--resume from a state in that folder', param_hint='--outdir')


def set_aside_before_run(outdir: str, resumed_kimg: int | None, leftovers: list[str]) -> None:
    """With --nosubdir, before the run writes (rank 0): a resume in the run's own folder from the state of
    `resumed_kimg` moves the files of later kimg aside (the interrupted continuation), and `leftovers`
    (check_nosubdir's) go aside with the log of the run that wrote them."""
    if resumed_kimg is not None:
        moved = set_aside_later_files(outdir, resumed_kimg)
        if moved is not None:
            aside, names = moved
            print(f'--resume in the run\'s own folder: moved {len(names)} file(s) of later kimg than the state (the '
                  f'interrupted continuation: {", ".join(names[:3])}{", ..." if len(names) > 3 else ""}) to {aside}')
    if leftovers:
        aside = set_aside(outdir, 'interrupted-before-first-state', [*leftovers, 'log.txt', 'report.png'])
        print(f'--resume=auto: {outdir} holds no training state, only the files of a run interrupted before its '
              f'first one; moved them to {aside} and starting over')
