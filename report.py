"""Draw a training run's statistics into one PNG: loss, loss by noise level, learning rate, non-finite steps and
the fid.py metrics found in the run directory (training/report.py).

Example:

\b
  python report.py --run=training-runs/00003-cifar10-32x32-cond-ddpmpp-edm-gpus8-batch512-fp32
"""

import os

import click

import dnnlib.util
from training.report import write_report


@click.command(help=__doc__)
@click.option('--run', 'run_dir', help='Training run directory (holds stats.jsonl)', metavar='DIR', required=True)
@click.option('--out', 'out_path', help='PNG to write  [default: DIR/report.png]', metavar='PNG', default=None)
def main(run_dir, out_path):
    try:  # the shell expands no ~ after "="
        path = write_report(os.path.expanduser(run_dir), None if out_path is None else os.path.expanduser(out_path))
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    print(f'Wrote {path}')


if __name__ == '__main__':
    dnnlib.util.concise_warnings()
    main()
