"""Post-hoc EMA (EDM2): reconstruct the EMA of any relative width from the power-function EMAs a run saved with
`train.py --phema=0.05,0.10` (phema-NNNNNN-S.pkl beside its snapshots), without retraining (training/phema.py).

Example:

\b
  python phema.py --run=training-runs/00003-... --std=0.07 --at=200000 --out=network-phema-0.070.pkl
  python generate.py --network=network-phema-0.070.pkl --outdir=out --seeds=0-49999 --subdirs
"""

import os

import click

import dnnlib.util
from torch_utils import persistence
from training import run_folder
from training.phema import reconstruct


@click.command(help=__doc__)
@click.option('--run', 'run_dir', help='Training run directory with phema-*.pkl files', metavar='DIR', required=True)
@click.option('--std', help='Relative width of the EMA to reconstruct (EDM2: 0.01-0.25)', metavar='FLOAT',
              type=click.FloatRange(min=0, max=12 ** -0.5, min_open=True, max_open=True), required=True)
@click.option('--at', 'at_kimg', help='Training time: the latest saved EMAs at or before this kimg  [default: the '
              'last]', metavar='KIMG', type=click.IntRange(min=0), default=None)
@click.option('--out', 'out_path', help='Network pickle to write  [default: DIR/network-phema-KIMG-STD.pkl]',
              metavar='PKL', default=None)
def main(run_dir, std, at_kimg, out_path):
    run_dir = os.path.expanduser(run_dir)  # the shell expands no ~ after "="
    out_path = dnnlib.util.expand_user(out_path)
    # A name train.py gives its own files, in --run or another run's folder (--out=RUN/network-snapshot-000200.pkl
    # replaced that snapshot with the reconstruction, which fid.py and resumes then took for the run's). Elsewhere it
    # replaces nothing of a run. A run's folder holds its training_options.json, stats.jsonl or states; pickles alone
    # do not make one (a folder of picks, each an --out of this tool, took the first for a run's snapshot).
    if out_path is not None and run_folder.RUN_FILES.fullmatch(os.path.basename(out_path)):
        folder = os.path.dirname(os.path.abspath(out_path))
        if dnnlib.util.same_file(folder, run_dir) or (os.path.isdir(folder) and any(
                run_folder.RUN_FILES.fullmatch(name) and not name.endswith('.pkl') for name in os.listdir(folder))):
            raise click.BadParameter(f'{out_path}: the name of a file train.py writes into its runs, in a run\'s '
                                     f'folder; choose another name', param_hint='--out')
    try:
        data, _ = reconstruct(run_dir, std, at_kimg)
        # Three decimals as the saved EMAs' names, more where they would round (0.0001 and 0.0004 were both 0.000).
        width = f'{std:.3f}' if float(f'{std:.3f}') == std else f'{std:.6g}'
        out_path = out_path or os.path.join(run_dir, f'network-phema-{data["phema"]["kimg"]:06d}-{width}.pkl')
        persistence.save_network_pickle(out_path, data)
    except (OSError, ValueError, persistence.NetworkPickleError) as err:
        raise click.ClickException(str(err)) from None
    print(f'Wrote {out_path}')


if __name__ == '__main__':
    dnnlib.util.run_cli(main)
