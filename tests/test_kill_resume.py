"""kill -9 at random moments (also while snapshots and states are written), then `--resume=auto`: the run ends
bit-identical to an uninterrupted one, and no temporary file is left (issue 16)."""

import glob
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_worker import ROOT, assert_tree_equal, random_images, write_zip_dataset

ARGS = ['--cbase', '8', '--cres', '1', '--blocks', '1', '--attn', '4', '--workers', '0', '--device', 'cpu',
        '--batch', '8', '--tick', '1', '--snap', '1', '--dump', '1', '--seed', '0', '--lr-rampup', '0',
        '--duration', '0.004']
FINAL_TICK = 4  # --duration in kimg with one kimg per tick


def _train(outdir, data, *extra):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), '--outdir', str(outdir), '--data', data,
                             *ARGS, *extra], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _final_state(outdir):
    paths = glob.glob(os.path.join(outdir, '*', f'training-state-{FINAL_TICK:06d}.pt'))
    assert paths, f'no final state under {outdir}'
    return torch.load(sorted(paths)[-1], weights_only=True)


def _states(outdir):
    return set(glob.glob(os.path.join(outdir, '*', 'training-state-*')))


def _wait_for_new_state(process, outdir, known, timeout=300.0):
    """Block until the run starts writing a training state it did not have at launch (`.tmp-` files count), or ends."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and not (_states(outdir) - known):
        assert time.monotonic() < deadline, f'no new training state under {outdir} in {timeout:g} s'
        time.sleep(0.005)


def _assert_final_names_are_complete(outdir):
    """Every file under its final name loads: a write killed midway leaves only a temporary file (the resume
    skipping unreadable states would hide a torn state from the bit-identity check)."""
    import training.snapshots  # noqa: F401 -- registers the network classes
    from torch_utils import persistence
    for path in glob.glob(os.path.join(outdir, '*', 'training-state-*.pt')):
        torch.load(path, weights_only=True)
    for path in glob.glob(os.path.join(outdir, '*', 'network-snapshot-*.pkl')):
        persistence.load_network_pickle(path)


@pytest.mark.slow
def test_kill_9_loop_then_resume_auto_is_bit_identical(tmp_path):
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(32))
    straight = _train(tmp_path / 'straight', data)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    snapshots = sorted(glob.glob(str(tmp_path / 'straight' / '*' / 'network-snapshot-*.pkl')))
    tick_seconds = (os.path.getmtime(snapshots[-1]) - os.path.getmtime(snapshots[0])) / FINAL_TICK

    # The kills follow the run's progress, not the wall clock (CI machines differ several-fold in speed): each killed
    # run is stopped soon after it starts writing a new training state, either inside that write (the window of the
    # temporary files and renames) or later in the next tick's training steps. A run thus advances at most one tick
    # before it dies, so four ticks guarantee at least three kills, some while a state is half written.
    rng = random.Random(0)
    kills = 0
    killed_dir = tmp_path / 'killed'
    while True:
        known = _states(killed_dir)
        process = _train(killed_dir, data, '--resume', 'auto')
        if kills < 6:
            _wait_for_new_state(process, killed_dir, known)
            in_write = kills % 2 == 0
            # In the write: within a few ms of the temporary file's appearance (a state takes about that long).
            time.sleep(rng.uniform(0.0, 0.01) if in_write else rng.uniform(0.2, 0.5) * tick_seconds)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                _assert_final_names_are_complete(killed_dir)
                continue
        assert process.wait(timeout=300) == 0, process.stderr.read()
        break
    assert kills >= 3

    a, b = _final_state(tmp_path / 'straight'), _final_state(tmp_path / 'killed')
    for key in ('networks', 'ema', 'optimizers'):
        assert_tree_equal(b[key], a[key], key)
    assert a['cur_nimg'] == b['cur_nimg'] and a['data_position'] == b['data_position']
    leftovers = [p for p in glob.glob(str(tmp_path / 'killed' / '**' / '*'), recursive=True) + glob.glob(
        str(tmp_path / 'killed' / '**' / '.*'), recursive=True) if '.tmp-' in os.path.basename(p)]
    assert leftovers == []


def test_train_py_removes_stale_temp_files_of_killed_runs(tmp_path):
    from click.testing import CliRunner

    import dnnlib
    import train

    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(8))
    run_dir = tmp_path / 'runs' / '00000-old-run'
    run_dir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    host = os.path.basename(dnnlib.util.temp_path('x')).split('-')[1]
    stale = run_dir / f'network-snapshot-000004.pkl.tmp-{host}-{int(dead.stdout)}-0123abcd'
    live = run_dir / f'training-state-000004.pt.tmp-{host}-{os.getpid()}-0123abcd'  # this process: alive
    stale.write_bytes(b'half a snapshot')
    live.write_bytes(b'being written')
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--data', data, '--device', 'cpu',
                                             '--dry-run'])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and live.exists()
    assert f'Removed {stale}' in result.output


def test_stop_request_ends_the_tick_early_and_writes_a_state(tmp_path, monkeypatch):
    # What SIGTERM sets (torch_utils.distributed.stop_on_signals): the loop stops at its next periodic check (every
    # max_nonfinite_steps steps), not at the tick's end, with a state of the unfinished tick; tick 0's snapshot is
    # not replaced by one of another kimg under the same name.
    from train_worker import loop_kwargs

    from torch_utils import distributed as dist
    from training import training_loop as tl
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(16))
    run_dir = str(tmp_path / 'run')
    os.makedirs(run_dir)
    monkeypatch.setattr(dist, '_stop_signal', None)
    monkeypatch.setattr(dist, '_stop_agreed', False)
    step = tl._train_step

    def step_then_signal(run):
        step(run)
        if run.cur_iter == 5:
            dist._stop_signal = signal.SIGTERM

    monkeypatch.setattr(tl, '_train_step', step_then_signal)
    tl.training_loop(**loop_kwargs(run_dir, data, batch_size=8, kimg_per_tick=1, total_kimg=1, snapshot_ticks=1,
                                   state_dump_ticks=1, max_nonfinite_steps=3))
    state = torch.load(os.path.join(run_dir, 'training-state-000000.pt'), weights_only=True)
    assert state['cur_iter'] == 6 and state['cur_nimg'] == 48  # the check after step 6, one tick (1 kimg) early
    assert state['cur_tick'] == 1 and state['tick_start_nimg'] == 8  # tick 1 (from 8 images on) is unfinished
    from torch_utils import persistence
    snapshot = persistence.load_network_pickle(os.path.join(run_dir, 'network-snapshot-000000.pkl'))
    assert not all(torch.equal(snapshot['ema'].state_dict()[k], v) for k, v in state['ema'].items())  # tick 0's EMA
    assert dist.stop_agreed()


def _recording_loop(monkeypatch, stop_at_iter=None):
    """training_loop with its snapshot and state writes recorded as (what, cur_nimg), and a stop request (SIGTERM's
    flag) raised after step `stop_at_iter`."""
    from torch_utils import distributed as dist
    from training import training_loop as tl
    monkeypatch.setattr(dist, '_stop_signal', None)
    monkeypatch.setattr(dist, '_stop_agreed', False)
    writes = []
    step, snapshot, state = (getattr(f, '__wrapped__', f) for f in (tl._train_step, tl._write_snapshot,
                                                                     tl._write_training_state))

    def step_then_signal(run):
        step(run)
        if run.cur_iter == stop_at_iter:
            dist._stop_signal = signal.SIGTERM
    step_then_signal.__wrapped__ = step

    def record(kind, write):
        def wrapper(run, *args, **kwargs):
            writes.append((kind, run.cur_nimg))
            return write(run, *args, **kwargs)
        wrapper.__wrapped__ = write
        return wrapper

    monkeypatch.setattr(tl, '_train_step', step_then_signal)
    monkeypatch.setattr(tl, '_write_snapshot', record('snapshot', snapshot))
    monkeypatch.setattr(tl, '_write_training_state', record('state', state))
    return tl.training_loop, writes


def _stats_ticks(run_dir):
    import json
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        records = [json.loads(line) for line in f]
    return [(r['Progress/tick']['mean'], round(r['Progress/kimg']['mean'] * 1000)) for r in records]


def test_a_run_stopped_mid_tick_resumes_with_the_uninterrupted_cadence(tmp_path, monkeypatch):
    # 5 steps of 8 images a tick (tick 0: one step), 15 steps in all. Stopped at the check after step 4 (inside
    # tick 1: images 8..48), the resumed run completes tick 1 at 48 images as the uninterrupted run does, so
    # snapshots, states and stats lines fall at the same kimg, and the weights end equal.
    import warnings

    from train_worker import loop_kwargs
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(16))
    options = dict(batch_size=8, kimg_per_tick=0.04, total_kimg=0.12, snapshot_ticks=1, state_dump_ticks=1,
                   max_nonfinite_steps=2)
    runs = {name: str(tmp_path / name) for name in ('straight', 'stopped', 'resumed')}
    for run_dir in runs.values():
        os.makedirs(run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # snapshots every 0.04 kimg share a name: recorded, not compared by file
        loop, straight_writes = _recording_loop(monkeypatch)
        loop(**loop_kwargs(runs['straight'], data, **options))
        loop, stopped_writes = _recording_loop(monkeypatch, stop_at_iter=3)
        loop(**loop_kwargs(runs['stopped'], data, **options))
        state_path = os.path.join(runs['stopped'], 'training-state-000000.pt')
        loop, resumed_writes = _recording_loop(monkeypatch)
        loop(**loop_kwargs(runs['resumed'], data, resume_state_dump=state_path, **options))
    assert straight_writes == [('snapshot', 8), ('snapshot', 48), ('state', 48), ('snapshot', 88), ('state', 88),
                               ('snapshot', 120), ('state', 120)]
    assert stopped_writes == [('snapshot', 8), ('state', 32)]  # the stop's state only, at 32 images
    assert resumed_writes == straight_writes[1:]
    assert _stats_ticks(runs['stopped']) + _stats_ticks(runs['resumed']) == _stats_ticks(runs['straight']) == \
        [(0, 8), (1, 48), (2, 88), (3, 120)]
    assert_tree_equal(torch.load(os.path.join(runs['resumed'], 'training-state-000000.pt'), weights_only=True)['ema'],
                      torch.load(os.path.join(runs['straight'], 'training-state-000000.pt'), weights_only=True)['ema'])


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_to_the_job_saves_and_exits_with_the_signals_code(tmp_path, signum):
    # scancel / pre-emption: SIGTERM to every process of the job; Ctrl-C: SIGINT to every process of the terminal's
    # foreground group. Loader workers included (they ignore both, so the training process can still fetch, save
    # and exit); Ctrl-C wrote no state before (KeyboardInterrupt).
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(32))
    outdir = tmp_path / 'out'
    args = [a if a != '0' or prev != '--workers' else '1' for prev, a in zip([''] + ARGS, ARGS)]
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), '--outdir', str(outdir), '--data',
                                data, *args, '--duration', '10', '--tick', '1000'], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not glob.glob(str(outdir / '*' / 'network-snapshot-000000.pkl')):  # tick 0 done: training steps now
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(process.pid, signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, out[-2000:] + err[-2000:]
    assert f'received {signum.name}: stopping at the next check after writing a training state' in out + err
    assert 'Stopped by a signal at' in out and '--resume=auto' in out
    assert 'Traceback' not in out + err  # an exit, not a crash (it printed SystemExit(143)'s traceback)
    states = glob.glob(str(outdir / '*' / 'training-state-*.pt'))
    assert len(states) == 1 and torch.load(states[0], weights_only=True)['cur_iter'] > 1


def test_loader_workers_survive_a_stop_signal_that_comes_while_they_start(tmp_path, monkeypatch):
    # A spawned loader worker imports torch for seconds before its worker_init_fn ignores SIGINT/SIGTERM: a job-wide
    # signal then killed it, and the next batch failed the run ("DataLoader worker ... is killed by signal") before
    # it could save. The stop signals are blocked while workers start; the process's own copy still arrives.
    from training.batch_sources import DataContext
    from training.dataset import ImageFolderDataset
    dataset = ImageFolderDataset(write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(8)))
    data = DataContext(dataset=dataset, rank=0, world_size=1, seed=0, batch_gpu=4, num_rounds=1,
                       device=torch.device('cpu'),
                       loader_kwargs=dict(num_workers=1, multiprocessing_context='spawn'))
    start_workers = torch.utils.data.DataLoader.__iter__
    workers = []

    def start_then_signal_the_job(loader):
        iterator = start_workers(loader)
        workers.extend(worker.pid for worker in iterator._workers)
        for pid in [*workers, os.getpid()]:  # scancel: every process of the job, the workers still importing
            os.kill(pid, signal.SIGTERM)
        return iterator

    monkeypatch.setattr(torch.utils.data.DataLoader, '__iter__', start_then_signal_the_job)
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        images, labels = next(data.stream(seed=0, start_idx=0, batch_size=4))
        assert received == [signal.SIGTERM]  # delivered here at the unblock, not lost
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert images.shape == (4, 1, 8, 8) and len(workers) == 1
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()  # this process's mask restored


def test_a_run_started_after_a_stopped_one_in_the_same_process_is_not_asked_to_stop(monkeypatch):
    # train.main called twice in one process (a notebook): the Ctrl-C that stopped the first run stopped the second at
    # its first check.
    from torch_utils import distributed as dist
    monkeypatch.setattr(dist, '_stop_signal', signal.SIGINT)
    monkeypatch.setattr(dist, '_stop_agreed', True)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        dist.stop_on_signals()
        assert dist.stop_requested() is None and not dist.stop_agreed() and not dist.should_stop()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_ctrl_c_asks_for_a_stop_and_a_second_one_a_second_later_interrupts(monkeypatch, capsys):
    # One keypress can reach a process twice within milliseconds (the terminal's group, then a launcher's
    # forwarding): only a repeat a second or more later is the user's second Ctrl-C. Under torchrun the workers get
    # the agent's copy only (checked by hand: 2 ranks on gloo, Ctrl-C to torchrun: both wrote the state and exited
    # 130; torchrun then raised its SignalException and exited 1, as README says).
    from torch_utils import distributed as dist
    clock = [100.0]
    monkeypatch.setattr(dist.time, 'monotonic', lambda: clock[0])
    monkeypatch.setattr(dist, '_stop_signal', None)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        dist.stop_on_signals()
        handler = signal.getsignal(signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) is handler
        handler(signal.SIGINT, None)
        assert dist.stop_requested() == signal.SIGINT
        assert 'received SIGINT: stopping at the next check after writing a training state (Ctrl-C again to stop ' \
               'at once, without it)' in capsys.readouterr().err
        clock[0] += 0.5
        handler(signal.SIGINT, None)  # torchrun's copy of the same keypress
        handler(signal.SIGTERM, None)  # torchrun's agent stopping its workers: still the graceful stop
        assert dist.stop_requested() == signal.SIGINT and capsys.readouterr().err == ''
        assert signal.getsignal(signal.SIGINT) is handler
        clock[0] += 1.0
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # a third one interrupts whatever runs
    finally:
        for signum, old_handler in previous.items():
            signal.signal(signum, old_handler)
    # A SIGTERM first: a later SIGINT does not interrupt the state write it asked for.
    monkeypatch.setattr(dist, '_stop_signal', None)
    try:
        dist.stop_on_signals()
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        clock[0] += 5.0
        handler(signal.SIGINT, None)
        assert dist.stop_requested() == signal.SIGTERM
        assert 'Ctrl-C again' not in capsys.readouterr().err
    finally:
        for signum, old_handler in previous.items():
            signal.signal(signum, old_handler)


def test_a_stop_request_in_tick_0_still_writes_a_state(tmp_path, monkeypatch):
    # SIGTERM while the dataset loads or tick 0 compiles: EDM writes no state at tick 0, so the run said it wrote
    # one, left none, and --resume=auto started a new run beside the orphaned one.
    from train_worker import loop_kwargs
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(16))
    loop, writes = _recording_loop(monkeypatch, stop_at_iter=1)
    loop(**loop_kwargs(str(tmp_path), data, batch_size=8, kimg_per_tick=0.04, total_kimg=0.12, snapshot_ticks=1,
                       state_dump_ticks=1, max_nonfinite_steps=2))
    assert writes == [('snapshot', 8), ('state', 8)]
    state = torch.load(str(tmp_path / 'training-state-000000.pt'), weights_only=True)
    assert state['cur_tick'] == 1 and 'tick_start_nimg' not in state  # tick 0 finished


def test_every_rank_waits_for_the_last_state_write(tmp_path, monkeypatch):
    # After a stop request, a rank that returned first exits with 143 and torchrun then SIGKILLs rank 0 30 s later,
    # in the middle of writing a large state: the loop ends with a barrier after its last write.
    from train_worker import loop_kwargs

    from torch_utils import distributed as dist
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(16))
    loop, writes = _recording_loop(monkeypatch, stop_at_iter=3)
    monkeypatch.setattr(dist, 'barrier', lambda: writes.append(('barrier', None)))
    loop(**loop_kwargs(str(tmp_path), data, batch_size=8, kimg_per_tick=0.04, total_kimg=0.12, snapshot_ticks=1,
                       state_dump_ticks=1, max_nonfinite_steps=2))
    assert writes[-2:] == [('state', 32), ('barrier', None)]


def test_train_main_gives_ctrl_c_and_sigterm_back_when_it_returns(tmp_path):
    # train.main in a process that goes on (a notebook, a sweep script): the run's stop handlers stayed, so the
    # process's next Ctrl-C only printed "stopping at the next check" and every SIGTERM was ignored until a SIGKILL.
    import click

    import train
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(8))

    def callers_sigint(signum, frame):
        raise KeyboardInterrupt

    def callers_sigterm(signum, frame):
        raise SystemExit(143)

    signal.signal(signal.SIGINT, callers_sigint)
    signal.signal(signal.SIGTERM, callers_sigterm)
    train.main(['--outdir', str(tmp_path / 'runs'), '--data', data, *ARGS, '--dry-run'], standalone_mode=False)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (callers_sigint, callers_sigterm)
    with pytest.raises(click.BadParameter, match='dataset path does not exist'):  # fails after installing them
        train.main(['--outdir', str(tmp_path / 'runs'), '--data', str(tmp_path / 'missing.zip'), *ARGS],
                   standalone_mode=False)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (callers_sigint, callers_sigterm)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)


def test_a_run_that_fails_in_a_process_that_goes_on_leaves_no_loader_worker(tmp_path):
    # A sweep script kept the error of a diverged run (a notebook keeps the last error): its traceback holds the
    # loop's loader iterator, whose worker ignores SIGTERM. Freed later by the cycle collector, the iterator's queue
    # was closed before the worker was told to stop, and at the script's end multiprocessing joined the worker forever.
    import multiprocessing

    import click

    import train
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(32))
    before = set(multiprocessing.active_children())
    with pytest.raises(click.ClickException, match='training diverged') as failure:
        train.main(['--outdir', str(tmp_path / 'runs'), '--data', data, *ARGS, '--workers', '1', '--lr', '1e30',
                    '--max-nonfinite', '1'], standalone_mode=False)
    assert failure.value.__context__ is not None  # the loop's frames are still held
    assert set(multiprocessing.active_children()) == before


def test_train_main_runs_in_a_thread(tmp_path):
    # A notebook training in a background thread to keep the kernel free: Python lets only the main thread set signal
    # handlers, and train.main failed at once ("signal only works in main thread"). Such a run cannot be stopped by a
    # signal (the main thread gets them).
    import threading

    import train
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(8))
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    errors = []

    def run():
        try:
            train.main(['--outdir', str(tmp_path / 'runs'), '--data', data, *ARGS, '--dry-run'], standalone_mode=False)
        except Exception as err:  # noqa: BLE001 -- reported to the test's thread
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == [] and (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_a_stop_signal_while_train_py_exits_after_a_stop_keeps_the_exit_code(tmp_path):
    # Under torchrun, a rank that leaves first after a stop request exits with 143 and the agent then sends SIGTERM to
    # the ranks still exiting (rank 0 shutting down its loader workers and process group): with the stop handlers
    # given back in train.main's `finally` (for a process that goes on, a notebook), that SIGTERM killed rank 0
    # (torchrun: 'exitcode: -15 ... Signal 15 (SIGTERM) received by PID', 1 of 3 two-rank runs with --workers 2).
    # train.py as the process's program ends with the run: the handlers stay to its end, as before.
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(8))
    script = (
        "import atexit, os, runpy, signal, sys, time\n"
        "from torch_utils import distributed as dist\n"
        "install = dist.stop_on_signals\n"
        "def stop_at_once(*args, **kwargs):  # a stop request as soon as the run's handlers are in place\n"
        "    install(*args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "dist.stop_on_signals = stop_at_once\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.5)))\n"  # torchrun's SIGTERM
        f"sys.argv = ['train.py', '--outdir', {str(tmp_path / 'out')!r}, '--data', {data!r}, *{ARGS!r}]\n"
        "runpy.run_path('train.py', run_name='__main__')\n")
    process = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert process.returncode == 143, process.stdout[-2000:] + process.stderr[-2000:]
    assert glob.glob(str(tmp_path / 'out' / '*' / 'training-state-*.pt'))
