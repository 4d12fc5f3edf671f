"""LD3: learn a sampler's time discretisation from teacher samples (Tong et al., ICLR 2025), then sample with it.

A thin CLI over samplers/ld3/: `gen-data` writes teacher data, `train` writes a schedule file for generate.py
--schedule. `python -m samplers.ld3 ...` is the same command.
"""

import os

import click
import torch

from metrics.lpips import LPIPS_LIN_URL, LPIPS_VGG16_URL, LPIPSUnavailableError
from samplers import SCHEDULES, get_solver
from samplers.cli_options import (
    OPTION_FLAGS,
    end_option,
    sampler_config,
    sampler_options,
    seed_list,
    solver_kwargs_from_cli,
    solver_option,
    solver_option_flags,
)
from samplers.generation import describe
from samplers.ld3 import (
    DISTANCES,
    LD3Config,
    generate_teacher,
    load_teacher_data,
    save_teacher_data,
    steps_for_nfe,
    train_ld3,
)
from torch_utils import persistence
from training.snapshots import load_snapshot


def _device(device):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


device_option = click.option("--device", help="Torch device  [default: cuda if available, else cpu]", default=None,
                             show_default=False)


@click.group()
def cli():
    """LD3: learn a sampler's time discretisation from teacher samples (Tong et al., ICLR 2025).

    \b
    # 1. Teacher data: 100 noises and UniPC-3 samples at 20 NFE (LD3's CIFAR-10 recipe)
    python ld3.py gen-data --network=edm-cifar10-32x32-uncond-vp.pkl --seeds=0-99 --out=teacher.pt
    \b
    # 2. Learn iPNDM's grid at 6 NFE (50 train / 50 validation samples, LPIPS loss)
    python ld3.py train --data=teacher.pt --solver=ipndm --order=3 --nfe=6 --out=ipndm-nfe6.json
    \b
    # 3. Sample with it (the file brings its solver, options and grid)
    python generate.py --network=... --outdir=out --seeds=100-49999 --schedule=ipndm-nfe6.json
    """


def load_network(network: str, device):
    """The snapshot's network, when its process is sampled over a sigma grid (what LD3 learns)."""
    try:
        snapshot = load_snapshot(network, device)
    except (persistence.NetworkPickleError, OSError) as err:
        raise click.ClickException(str(err)) from None
    if not getattr(snapshot.process.sampling, "learns_sigma_grids", False):
        raise click.ClickException(f"{network} was trained with the process {snapshot.process.name!r}, which is not "
                                   f"sampled over a sigma grid; LD3 learns sigma grids")
    return snapshot.net


@cli.command("gen-data", context_settings={"show_default": True})
@click.option("--network", "network", help="Network pickle filename", metavar="PATH|URL", required=True)
@click.option("--out", "out", help="Teacher data file to write (.pt)", metavar="PATH", required=True)
@click.option("--seeds", help="Random seeds (e.g. 0-99); noises and labels are drawn per seed as generate.py does",
              metavar="LIST", default="0-99", callback=seed_list)
@click.option("--batch", "batch_size", help="Maximum batch size", metavar="INT", type=click.IntRange(min=1),
              default=64)
@sampler_options(help_prefix="Teacher: ", solver_default="unipc", steps_default=20, guidance=False)
@device_option
def gen_data(network, out, seeds, batch_size, class_idx, device, **sampler_cli):
    """Sample teacher data: noises, teacher samples and labels, for `train`."""
    config = sampler_config(**sampler_cli)
    device = _device(device)
    net = load_network(network, device)
    try:
        summary = describe(net, config)
        data = generate_teacher(net, seeds, solver=config.solver, num_steps=config.num_steps,
                                schedule=config.schedule, solver_kwargs=config.solver_kwargs,
                                schedule_kwargs=config.schedule_kwargs, end=config.end, sigma_min=config.sigma_min,
                                sigma_max=config.sigma_max, denoise_to_zero=config.denoise_to_zero,
                                class_idx=class_idx, batch_size=batch_size, device=device, network=network,
                                progress=True)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    save_teacher_data(out, data)
    print(f"Teacher: {summary}")
    print(f'Wrote {len(data)} teacher samples to "{out}".')


@cli.command("train", context_settings={"show_default": True})
@click.option("--data", "data_path", help="Teacher data from gen-data", metavar="PATH", required=True)
@click.option("--out", "out", help="Schedule file to write (.json)", metavar="PATH", required=True)
@click.option("--network", "network", help="Network pickle  [default: the one the teacher data names]",
              metavar="PATH|URL", default=None, show_default=False)
@solver_option("Student: ", required=True)
@click.option("--nfe", help="Student NFE (denoiser calls per sample)", metavar="INT", type=click.IntRange(min=1),
              required=True)
@click.option("--loss", help="Distance to the teacher", type=click.Choice(list(DISTANCES)), default="lpips")
@click.option("--lpips-vgg", "lpips_vgg", help=f"VGG16 weights  [default: {LPIPS_VGG16_URL}]", metavar="PATH|URL",
              default=None, show_default=False)
@click.option("--lpips-lin", "lpips_lin", help=f"LPIPS linear weights  [default: {LPIPS_LIN_URL}]",
              metavar="PATH|URL", default=None, show_default=False)
@click.option("--lpips-resize", "lpips_resize", help="Resize images to this size for LPIPS  [default: none]",
              metavar="INT", type=click.IntRange(min=16), default=None, show_default=False)
@click.option("--num-train", "num_train", help="Training samples (the first ones)", type=click.IntRange(min=1),
              default=50)
@click.option("--num-valid", "num_valid", help="Validation samples (the next ones)", type=click.IntRange(min=1),
              default=50)
@click.option("--batch", "batch_size", help="Training batch size", type=click.IntRange(min=1), default=2)
@click.option("--valid-batch", "valid_batch_size", help="Validation batch size  [default: all]",
              type=click.IntRange(min=1), default=None, show_default=False)
@click.option("--rounds-v1", "rounds_v1", help="Rounds learning the grid only", type=click.IntRange(min=0), default=2)
@click.option("--rounds-v2", "rounds_v2", help="Rounds learning grid and evaluation grid", type=click.IntRange(min=0),
              default=5)
@click.option("--lr", "lr_logits", help="RMSprop learning rate of the grid logits", type=float, default=5e-3)
@click.option("--lr-offsets", "lr_offsets", help="SGD learning rate of the evaluation offsets (divided by NFE)",
              type=float, default=0.1)
@click.option("--shift-lr", "shift_lr", help="SGD learning rate of the noises  [default: 12 / NFE]", type=float,
              default=None, show_default=False)
@click.option("--prior-bound", "prior_bound", help="Noise ball radius (unit-noise scale; 0: hard loss)  "
              "[default: 0.001 C H W / NFE^2]", type=click.FloatRange(min=0), default=None, show_default=False)
@click.option("--eval-window", "eval_window", help="Evaluation offsets as a fraction of the neighbouring gaps",
              type=click.FloatRange(min=0, max=0.5, max_open=True), default=0.45)
@click.option("--decouple/--no-decouple", "decoupled", help="Learn the decoupled evaluation grid", default=True)
@click.option("--init", help="Starting grid", type=click.Choice(sorted(SCHEDULES)), default="logsnr")
@click.option("--seed", help="Shuffling seed", type=int, default=0)
@click.option("--checkpoint", "checkpoint", help="Activation checkpointing (less memory, ~1.3x time)", is_flag=True)
@click.option("--log", "log_path", help="Log file  [default: OUT with .log.txt]", metavar="PATH", default=None,
              show_default=False)
@end_option("Student: ")
@solver_option_flags("Student: ")
@device_option
def train(data_path, out, network, solver, nfe, end, device, log_path, solver_opt, **options):
    """Learn the grid of SOLVER at NFE from teacher data; write a schedule file for generate.py --schedule."""
    try:
        data = load_teacher_data(data_path)
    except (FileNotFoundError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint="--data") from None
    network = network or data.info.get("network")
    if not network:
        raise click.UsageError(f"{data_path} names no network: pass --network")
    solver_flags = {name: options.pop(name) for name in OPTION_FLAGS}
    solver_kwargs = solver_kwargs_from_cli(solver, solver_opt, **solver_flags)
    config = LD3Config(solver=solver, nfe=nfe, solver_kwargs=solver_kwargs, end=end, **options)
    end = config.end or get_solver(solver).default_end
    try:
        config.validate(len(data))
        steps_for_nfe(solver, nfe, end)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    device = _device(device)
    net = load_network(network, device)
    if tuple(data.latents.shape[1:]) != (net.img_channels, net.img_resolution, net.img_resolution):
        raise click.UsageError(f"{data_path} holds samples of shape {tuple(data.latents.shape[1:])}, but the network "
                               f"makes {(net.img_channels, net.img_resolution, net.img_resolution)}")
    if data.info.get("network") and os.path.abspath(str(data.info["network"])) != os.path.abspath(network):
        print(f"Warning: the teacher data was sampled from {data.info['network']}, training with {network}")
    log_path = log_path or (os.path.splitext(out)[0] + ".log.txt")
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "a") as log_file:
        def log(line):
            print(line)
            log_file.write(line + "\n")
            log_file.flush()

        log(f"LD3: {solver}({', '.join(f'{k}={v}' for k, v in sorted(solver_kwargs.items()))}) at {nfe} NFE, "
            f"end={end}, loss={config.loss}, {config.num_train} train / {config.num_valid} validation samples of "
            f"{data_path}")
        try:
            result = train_ld3(net, data, config, device=device, progress=True, log=log)
        except (LPIPSUnavailableError, ValueError) as err:  # ValueError: e.g. a solver option that draws noise
            raise click.ClickException(str(err)) from None
        result.provenance.update(network=str(network), teacher_data=os.path.abspath(data_path))
        result.save(out)
        log(f"Validation loss {result.init_valid_loss:.6g} ({config.init} grid) -> {result.best_valid_loss:.6g}; "
            f"grid {', '.join(f'{s:.4g}' for s in result.sigmas.tolist())}")
        log(f'Training time: {result.train_time_s:.1f} s. Wrote "{out}".')


if __name__ == "__main__":
    cli()
