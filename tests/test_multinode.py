"""Multi-node proof (issue 17): two torchrun "nodes" on this machine (--nnodes=2, c10d rendezvous on localhost, gloo)
run train.py, generate.py and fid.py, and the results equal a single-node run: training bit for bit against one node
with two ranks (the 1-rank equivalence is tests/test_training_loop.py's), sampling byte for byte and metrics to
rounding against one process."""

import contextlib
import glob
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from launch import torchrun
from train_worker import ROOT, assert_tree_equal, random_images, write_zip_dataset

TINY = ['--cbase', '8', '--cres', '1', '--blocks', '1', '--attn', '4', '--workers', '0', '--device', 'cpu',
        '--batch', '32', '--duration', '0.001', '--tick', '1', '--snap', '1', '--dump', '1', '--seed', '3',
        '--dropout', '0', '--augment', '0', '--lr-rampup', '0']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _two_nodes(script: str, *args, attempts: int = 2, node_envs=({}, {}), expect_success: bool = True,
               timeout: float = 600) -> list[str]:
    """Start the two nodes of a 2 x 1-process job and wait for both (one retry if the rendezvous port was taken).
    node_envs: each node's own environment variables (a node-local HOME). The static rendezvous: node_rank is the
    rank. Returns the nodes' outputs; a node still running after `timeout` seconds is killed and fails the test."""
    for attempt in range(attempts):
        port = _free_port()
        nodes = [subprocess.Popen(
            [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1', f'--node_rank={rank}',
             '--master_addr=127.0.0.1', f'--master_port={port}', os.path.join(ROOT, script), *map(str, args)],
            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT, **node_envs[rank]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True) for rank in range(2)]
        try:
            outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
        except subprocess.TimeoutExpired:
            for node in nodes:  # the agent and its worker (a session of their own)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGKILL)
            outputs = [node.communicate()[0] for node in nodes]
            raise AssertionError(f'still running after {timeout} s:\n' + '\n'.join(out[-3000:] for out in outputs)) \
                from None
        if all(node.returncode == 0 for node in nodes) == expect_success:
            return outputs
        if attempt + 1 == attempts or not any('EADDRINUSE' in out or 'address already in use' in out.lower()
                                               for out in outputs):
            raise AssertionError('\n'.join(out[-3000:] for out in outputs))


def _digest(path) -> str:
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_equal_one_node(tmp_path):
    import fid
    import generate
    from metrics import detectors as detectors_lib

    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(32))

    # Training: 2 nodes x 1 rank == 1 node x 2 ranks, bit for bit (the same world size laid out differently).
    _two_nodes('train.py', '--outdir', tmp_path / 'two', '--data', data, *TINY)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    result = subprocess.run(torchrun(2, os.path.join(ROOT, 'train.py'), '--outdir', tmp_path / 'one', '--data', data,
                                     *TINY), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two, one = (torch.load(glob.glob(str(tmp_path / d / '*' / 'training-state-*.pt'))[0], weights_only=True)
                for d in ('two', 'one'))
    assert two['world_size'] == one['world_size'] == 2 and two['cur_nimg'] == one['cur_nimg'] == 1024
    assert_tree_equal(two['networks'], one['networks'], 'networks')
    assert_tree_equal(two['ema'], one['ema'], 'ema')
    assert_tree_equal(two['optimizers'], one['optimizers'], 'optimizers')
    snapshot = glob.glob(str(tmp_path / 'one' / '*' / 'network-snapshot-*.pkl'))[-1]

    # Sampling: the same PNGs, byte for byte.
    _two_nodes('generate.py', '--network', snapshot, '--outdir', tmp_path / 'gen-two', '--seeds', '0-11', '--batch', 2,
               '--steps', 4, '--device', 'cpu')
    result = CliRunner().invoke(generate.main, ['--network', snapshot, '--outdir', str(tmp_path / 'gen-one'),
                                                '--seeds', '0-11', '--batch', '2', '--steps', '4', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    names = sorted(n for n in os.listdir(tmp_path / 'gen-one') if n.endswith('.png'))
    assert len(names) == 12 and names == sorted(n for n in os.listdir(tmp_path / 'gen-two') if n.endswith('.png'))
    assert all(_digest(tmp_path / 'gen-one' / n) == _digest(tmp_path / 'gen-two' / n) for n in names)

    # Metrics: the same numbers.
    inception = detectors_lib.save_standin(detectors_lib.StandinInception(), str(tmp_path / 'inception.pt'))
    common = ['--detector', f'inception={inception}', '--workers', '0', '--batch', '3', '--metrics', 'fid,is']
    result = CliRunner().invoke(fid.main, ['ref', '--data', data, '--dest', str(tmp_path / 'ref.npz'),
                                           *common[:-2], '--metrics', 'fid'])
    assert result.exit_code == 0, result.output
    calc = ['calc', '--images', tmp_path / 'gen-one', '--ref', tmp_path / 'ref.npz', '--num-images', 12, *common]
    _two_nodes('fid.py', *calc, '--out', tmp_path / 'two.json')
    result = CliRunner().invoke(fid.main, [*map(str, calc), '--out', str(tmp_path / 'one.json')])
    assert result.exit_code == 0, result.output
    two, one = (json.load(open(tmp_path / f'{d}.json')) for d in ('two', 'one'))
    assert two['world_size'] == 2 and one['world_size'] == 1
    assert two['results']['fid'] == pytest.approx(one['results']['fid'], rel=1e-6)
    assert two['results']['is_mean'] == pytest.approx(one['results']['is_mean'], rel=1e-6)


@pytest.mark.distributed
def test_a_node_that_sees_other_files_ends_the_job(tmp_path):
    """Node-local folders differ between nodes (each node its own HOME here). A check that fails on one node only ends
    both nodes promptly: it used to come before the process group, and the other node waited in it for its timeout
    (30 minutes). Ranks that resolve --resume=auto to different states (--outdir not one shared folder) are refused."""
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(32))
    homes = [tmp_path / 'home0', tmp_path / 'home1']
    for home in homes:
        (home / 'runs').mkdir(parents=True)
    (homes[1] / 'blocked').write_text('')  # a file: no --outdir can be made under it on node 1
    (homes[0] / 'blocked').mkdir()
    node_envs = [dict(HOME=str(home)) for home in homes]
    outputs = _two_nodes('train.py', '--outdir', '~/blocked/runs', '--data', data, *TINY, node_envs=node_envs,
                         expect_success=False, timeout=120)
    assert 'home1/blocked is a file, not a folder' in outputs[1] and 'another rank ended' in outputs[0]
    assert not os.path.exists(homes[0] / 'blocked' / 'runs')

    import train
    result = CliRunner().invoke(train.main, ['--outdir', str(homes[0] / 'runs'), '--data', data, *TINY])
    assert result.exit_code == 0, result.output  # a state that --resume=auto finds on node 0; node 1 finds none
    outputs = _two_nodes('train.py', '--outdir', '~/runs', '--data', data, '--resume', 'auto', *TINY,
                         node_envs=node_envs, expect_success=False, timeout=120)
    assert all('the ranks resolve --resume differently' in out for out in outputs), outputs
    assert 'starting a new run' not in outputs[1]  # --resume's notes are rank 0's (they printed once per rank)


@pytest.mark.distributed
def test_fid_ref_ends_both_nodes_when_one_cannot_write_dest(tmp_path):
    """fid.py's --dest (and calc's --out) checks read the file system: they come after the process group is joined,
    so the node whose --dest folder is blocked ends the other too (which waited in the group for 30 minutes)."""
    from metrics import detectors as detectors_lib
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(8))
    inception = detectors_lib.save_standin(detectors_lib.StandinInception(), str(tmp_path / 'inception.pt'))
    homes = [tmp_path / 'home0', tmp_path / 'home1']
    (homes[0] / 'blocked').mkdir(parents=True)
    homes[1].mkdir()
    (homes[1] / 'blocked').write_text('')
    outputs = _two_nodes('fid.py', 'ref', '--data', data, '--dest', '~/blocked/ref.npz', '--detector',
                         f'inception={inception}', '--workers', 0, '--batch', 4, '--metrics', 'fid', '--device', 'cpu',
                         node_envs=[dict(HOME=str(home)) for home in homes], expect_success=False, timeout=120)
    assert 'home1/blocked is a file, not a folder' in outputs[1] and 'another rank ended' in outputs[0], outputs
