"""Draw a training run's statistics into one PNG: loss, loss by noise level, learning rate, non-finite steps and
the fid.py metrics found in the run directory (training/report.py).

Examples:

\b
  python report.py --run=training-runs/00003-cifar10-32x32-cond-ddpmpp-edm-gpus8-batch512-fp32
  # several runs on shared axes (each series named by its run's number: 00003 loss, 00004 loss, ...)
  python report.py --run=training-runs/00003-... --run=training-runs/00004-... --out=compare.png
"""

import os

import click

import dnnlib.util
from training.report import write_report


@click.command(help=__doc__)
@click.option('--run', 'run_dirs', help='Training run directory (holds stats.jsonl); repeat it to compare runs',
              metavar='DIR', required=True, multiple=True)
@click.option('--out', 'out_path', help='PNG to write  [default: DIR/report.png; required with several runs]',
              metavar='PNG', default=None)
def main(run_dirs, out_path):
    if len(run_dirs) > 1 and out_path is None:
        raise click.UsageError(f'--out: comparing {len(run_dirs)} runs, name the PNG to write')
    if out_path is not None and not out_path.lower().endswith('.png'):  # --out=RUN/stats.jsonl replaced the stats
        raise click.BadParameter(f'{out_path}: expected a file name ending in .png', param_hint='--out')
    try:  # the shell expands no ~ after "="
        path = write_report([os.path.expanduser(run_dir) for run_dir in run_dirs],
                            dnnlib.util.expand_user(out_path))
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    print(f'Wrote {path}')


if __name__ == '__main__':
    dnnlib.util.run_cli(main)
