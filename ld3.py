"""LD3: learn a sampler's time discretisation from teacher samples (Tong et al., ICLR 2025), then sample with it.

A thin CLI over samplers/ld3/: `gen-data` writes teacher data, `train` writes a schedule file for generate.py
--schedule, `evaluate` compares a schedule file with the hand-made grids on teacher samples it was not learned on.
`python -m samplers.ld3 ...` is the same command. See docs/ld3.md.
"""

import contextlib
import math
import os

import click
import torch

from dnnlib import util
from metrics.lpips import LPIPS_LIN_URL, LPIPS_VGG16_URL, LPIPSUnavailableError
from samplers import SCHEDULES, SOLVERS, count_nfe, get_solver, make_grid
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
    HAND_MADE_GRIDS,
    NOISE_SE,
    TEACHER_STEPS,
    LD3Config,
    check_deterministic,
    evaluate_schedule,
    generate_teacher,
    hand_made_grid_names,
    load_teacher_data,
    make_distance,
    save_teacher_data,
    steps_for_nfe,
    teacher_differences,
    teacher_plan,
    train_ld3,
)
from samplers.schedules import learned_solver_options
from torch_utils import distributed, persistence
from training.snapshots import load_snapshot


def _grid_names(value):
    if value is None:
        return None
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in hand_made_grid_names()]
    if unknown or not names:
        raise click.BadParameter(f"expected grid names from {', '.join(hand_made_grid_names())}, got {value!r}")
    return names


def _device(device):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def lpips_options(fn):
    for option in reversed([
        click.option("--lpips-vgg", "lpips_vgg", help=f"VGG16 weights  [default: {LPIPS_VGG16_URL}]",
                     metavar="PATH|URL", default=None, show_default=False),
        click.option("--lpips-lin", "lpips_lin", help=f"LPIPS linear weights  [default: {LPIPS_LIN_URL}]",
                     metavar="PATH|URL", default=None, show_default=False),
        click.option("--lpips-resize", "lpips_resize", help="Resize images to this size for LPIPS  [default: none]",
                     metavar="INT", type=click.IntRange(min=16), default=None, show_default=False)]):
        fn = option(fn)
    return fn


device_option = click.option("--device", help="Torch device  [default: cuda if available, else cpu]", metavar="DEVICE",
                             default=None,
                             show_default=False)


@click.group()
def cli():
    """LD3: learn a sampler's time discretisation from teacher samples (Tong et al., ICLR 2025).

    \b
    # 1. Teacher data: UniPC-3 samples at 20 NFE (LD3's CIFAR-10 teacher) for 600 noises
    python ld3.py gen-data --network=edm-cifar10-32x32-uncond-vp.pkl --seeds=0-599 --out=teacher.pt
    \b
    # 2. Learn iPNDM's grid at 6 NFE (50 train / 50 validation samples, LPIPS loss, LD3's optimiser), starting from
    #    the best hand-made grid; the other 500 samples decide whether the learned grid really beats it
    python ld3.py train --data=teacher.pt --solver=ipndm --order=3 --nfe=6 --out=ipndm-nfe6.json
    \b
    # 3. Check it on teacher samples it never saw, against the hand-made grids
    python ld3.py gen-data --network=edm-cifar10-32x32-uncond-vp.pkl --seeds=1000-1999 --out=test.pt
    python ld3.py evaluate --schedule=ipndm-nfe6.json --data=test.pt
    \b
    # 4. Sample with it (the file brings its solver, options and grid)
    python generate.py --network=... --outdir=out --seeds=2000-51999 --schedule=ipndm-nfe6.json
    \b
    # LD3 exactly as published: logSNR start, its best grid on validation, no held-out check
    python ld3.py train --data=teacher.pt --solver=ipndm --order=3 --nfe=6 --init=logsnr --no-guard --out=...

    `python -m samplers.ld3` is the same command (from another folder, with the repository on PYTHONPATH).
    """
    try:
        distributed.check_single_process("ld3.py")  # LD3 learns on one device, as the reference
    except ValueError as err:
        raise click.UsageError(str(err)) from None


def load_network(network: str, device):
    """The snapshot's network and its process's sampling object, when its process is sampled over a sigma grid (what
    LD3 learns); any other process (SPD's per-frequency one, a one-step generator) is refused in one line saying
    why (the sampling's `why_no_ld3`)."""
    try:
        snapshot = load_snapshot(network, device)
    except (persistence.NetworkPickleError, OSError, ValueError) as err:  # ValueError: e.g. --network= (empty)
        raise click.ClickException(str(err)) from None
    sampling = snapshot.process.sampling
    if not getattr(sampling, "learns_sigma_grids", False):
        why = getattr(sampling, "why_no_ld3", "not sampled over a sigma grid of x = y + sigma n (it brings its own "
                                              "samplers)")
        raise click.ClickException(f"{network} was trained with the process {snapshot.process.name!r}: {why}; LD3 "
                                   f"learns sigma grids, so it has no teacher data or schedule for this network")
    return snapshot.net, sampling


def _network_record(network: str) -> str:
    """How a network is recorded in teacher data and schedules: a local path made absolute (found from any folder),
    a URL as given."""
    return network if "://" in network else os.path.abspath(network)


def _check_same_network(network: str, recorded: dict, what: str) -> str | None:
    """Refuses a network whose sha256 is not the one `recorded` (teacher data's info, a schedule's provenance) names:
    a path is only a name (another folder may hold another net.pkl). Returns the network's sha256."""
    digest = util.file_sha256(network)
    expected = recorded.get("network_sha256")
    if digest and expected and digest != expected:
        raise click.UsageError(f"{network} (sha256 {digest[:12]}...) is not the network {what} was made with "
                               f"({recorded.get('network', '?')}, sha256 {expected[:12]}...): pass that network "
                               f"with --network")
    return digest


@cli.command("gen-data", context_settings={"show_default": True})
@click.option("--network", "network", help="Network pickle filename", metavar="PATH|URL", required=True)
@click.option("--out", "out", help="Teacher data file to write (.pt)", metavar="PATH", required=True)
@click.option("--seeds", help="Random seeds; noises and labels are drawn per seed as generate.py does. train uses "
              "50 + 50 for training and validation and holds out the rest", metavar="LIST", default="0-599",
              callback=seed_list)
@click.option("--batch", "batch_size", help="Maximum batch size", metavar="INT", type=click.IntRange(min=1),
              default=64)
@click.option("--overwrite", help="Replace --out also when it holds teacher data of other settings (network, "
              "sampler, seeds)", is_flag=True)
@sampler_options(help_prefix="Teacher: ", solver_default="unipc", steps_default=TEACHER_STEPS, guidance=False)
@device_option
def gen_data(network, out, seeds, batch_size, overwrite, class_idx, device, **sampler_cli):
    """Sample teacher data: noises, teacher samples and labels, for `train`.

    The file records the network's sha256, the sampler and the seeds: an existing --out made with other settings is
    refused unless --overwrite; one made with the same settings is left as it is."""
    device = _device(device)
    out = os.path.expanduser(out)  # the shell expands no ~ after "=" (--network goes through open_url, which does)
    # The snapshot first: its process decides which solvers --solver may name (and whether LD3 applies at all).
    net, sampling = load_network(network, device)
    schedule = sampler_cli["schedule"]
    from_file = schedule is not None and schedule not in SCHEDULES and os.path.isfile(schedule)
    if sampler_cli["num_steps"] is None and not from_file:  # a schedule file brings its own count
        sampler_cli["num_steps"] = TEACHER_STEPS
    config = sampler_config(**sampler_cli, sampling=sampling)
    try:
        util.check_output_path(out, "--out")
    except util.OutputPathError as err:
        raise click.ClickException(str(err)) from None
    teacher = dict(solver=config.solver, num_steps=config.num_steps, schedule=config.schedule,
                   solver_kwargs=config.solver_kwargs, schedule_kwargs=config.schedule_kwargs, end=config.end,
                   sigma_min=config.sigma_min, sigma_max=config.sigma_max, denoise_to_zero=config.denoise_to_zero,
                   class_idx=class_idx, device=device, network=_network_record(network),
                   network_sha256=util.file_sha256(network))
    try:
        summary = describe(net, config)
        _, grid_info, info = teacher_plan(net, **teacher)
        check_deterministic(*grid_info)  # a teacher that draws noise has no image per noise for LD3 to fit
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    if os.path.exists(out) and not overwrite:
        try:
            existing = load_teacher_data(out)
        except (FileNotFoundError, ValueError):
            raise click.ClickException(f"--out {out} exists and is not LD3 teacher data: pass --overwrite to replace "
                                       f"it, or choose another --out") from None
        differs = teacher_differences(existing, info, seeds)
        if differs:
            raise click.ClickException(f"--out {out} holds teacher data of other settings ({', '.join(differs)}): "
                                       f"pass --overwrite to replace it, or choose another --out")
        print(f'"{out}" already holds these {len(existing)} teacher samples (same network, sampler and seeds); '
              f"nothing to do (--overwrite samples them again).")
        return
    try:
        data = generate_teacher(net, seeds, batch_size=batch_size, progress=True, **teacher)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    try:
        save_teacher_data(out, data)  # a temporary name, renamed into place: never a half-written file
    except util.OutputPathError as err:  # a full disk
        raise click.ClickException(str(err)) from None
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
@lpips_options
@click.option("--num-train", "num_train", help="Training samples (the first ones)", metavar="INT",
              type=click.IntRange(min=1),
              default=50)
@click.option("--num-valid", "num_valid", help="Validation samples (the next ones)", metavar="INT",
              type=click.IntRange(min=1),
              default=50)
@click.option("--batch", "batch_size", help="Training batch size", metavar="INT", type=click.IntRange(min=1), default=2)
@click.option("--valid-batch", "valid_batch_size", help="Validation batch size  [default: all]",
              metavar="INT", type=click.IntRange(min=1), default=None, show_default=False)
@click.option("--rounds-v1", "rounds_v1", help="Rounds learning the grid only", metavar="INT",
              type=click.IntRange(min=0), default=2)
@click.option("--rounds-v2", "rounds_v2", help="Rounds learning grid and evaluation grid", metavar="INT",
              type=click.IntRange(min=0),
              default=5)
@click.option("--lr", "lr_logits", help="RMSprop learning rate of the grid logits", metavar="FLOAT",
              type=click.FloatRange(min=0, min_open=True), default=5e-3)
@click.option("--lr-offsets", "lr_offsets", help="SGD learning rate of the evaluation offsets (divided by NFE)",
              metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=0.1)
@click.option("--shift-lr", "shift_lr", help="SGD learning rate of the noises  [default: 12 / NFE]", metavar="FLOAT",
              type=click.FloatRange(min=0), default=None, show_default=False)
@click.option("--prior-bound", "prior_bound", help="Noise ball radius (unit-noise scale; 0: hard loss)  "
              "[default: 0.001 C H W / NFE^2]", metavar="FLOAT", type=click.FloatRange(min=0), default=None,
              show_default=False)
@click.option("--eval-window", "eval_window", help="Evaluation offsets as a fraction of the neighbouring gaps",
              metavar="FLOAT", type=click.FloatRange(min=0, max=0.5, max_open=True), default=0.45)
@click.option("--decouple/--no-decouple", "decoupled", help="Learn the decoupled evaluation grid", default=True)
@click.option("--init", help="Starting grid: 'best' (the best hand-made grid on validation and held-out samples) or a "
              "grid (LD3: logsnr)", type=click.Choice(["best", *hand_made_grid_names()]), default="best")
@click.option("--candidates", help=f"Hand-made grids to score first, comma-separated  [default: "
              f"{','.join(HAND_MADE_GRIDS)}]", metavar="LIST", default=None, show_default=False,
              callback=lambda ctx, param, value: _grid_names(value))
@click.option("--guard/--no-guard", "guard", help="Return the learned grid only when it beats the best hand-made "
              "grid on validation and on the held-out samples (--no-guard: LD3 as published)", default=True)
@click.option("--holdout", "num_holdout", help="Held-out samples for the final choice (after the validation ones)  "
              "[default: the rest of the teacher data, at most 1000; or half the validation samples]",
              metavar="INT", type=click.IntRange(min=0), default=None, show_default=False)
@click.option("--min-gain-se", "min_gain_se", help="Held-out gain the learned grid needs, in paired standard errors "
              "(0: any gain beyond rounding; a gain below 2 is warned about)", metavar="FLOAT",
              type=click.FloatRange(min=0),
              default=0.0)
@click.option("--seed", help="Shuffling seed", metavar="INT", type=int, default=0)
@click.option("--checkpoint", "checkpoint", help="Activation checkpointing (less memory, ~1.3x time)", is_flag=True)
@click.option("--log", "log_path", help="Log file, rewritten by each run  [default: OUT with .log.txt]",
              metavar="PATH", default=None, show_default=False)
@click.option("--overwrite", help="Replace an existing --out (and its log)", is_flag=True)
@end_option("Student: ")
@solver_option_flags("Student: ")
@device_option
def train(data_path, out, network, solver, nfe, end, device, log_path, overwrite, solver_opt, **options):
    """Learn the grid of SOLVER at NFE from teacher data; write a schedule file for generate.py --schedule."""
    data_path, out = os.path.expanduser(data_path), os.path.expanduser(out)  # the shell expands no ~ after "="
    log_path = util.expand_user(log_path)
    if not out.lower().endswith(".json"):
        raise click.BadParameter(f"{out}: a schedule file is JSON; name it .json (generate.py --schedule reads a .pt "
                                 f"as LD3's own tensor format)", param_hint="--out")
    log_path = log_path or (os.path.splitext(out)[0] + ".log.txt")
    for path, flag in ((out, "--out"), (log_path, "--log")):
        try:
            util.check_output_path(path, flag)
        except util.OutputPathError as err:
            raise click.ClickException(str(err)) from None
    if os.path.exists(out) and not overwrite:
        raise click.ClickException(f"--out {out} exists: pass --overwrite to replace it, or choose another --out")
    try:
        data = load_teacher_data(data_path)
    except (FileNotFoundError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint="--data") from None
    network = network or data.info.get("network")
    if not network:
        raise click.UsageError(f"{data_path} names no network: pass --network")
    solver_flags = {name: options.pop(name) for name in OPTION_FLAGS}
    solver_kwargs = solver_kwargs_from_cli(solver, solver_opt, **solver_flags)
    # Every option the grid is learned with, the solver's defaults filled in: the file records them all, so that
    # generate.py warns when a later run changes one (a file that recorded only the options typed did not).
    # (Heun's S_max = inf is left out: JSON has no infinity, and generate.py fills unrecorded defaults in anyway.)
    solver_kwargs = {**{name: value for name, value in get_solver(solver).defaults().items()
                        if not (isinstance(value, float) and not math.isfinite(value))}, **solver_kwargs}
    config = LD3Config(solver=solver, nfe=nfe, solver_kwargs=solver_kwargs, end=end, **options)
    end = config.end or get_solver(solver).default_end
    try:
        config.validate(len(data))
        steps_for_nfe(solver, nfe, end)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    device = _device(device)
    network_sha256 = _check_same_network(network, data.info, data_path)
    net = load_network(network, device)[0]
    if tuple(data.latents.shape[1:]) != (net.img_channels, net.img_resolution, net.img_resolution):
        raise click.UsageError(f"{data_path} holds samples of shape {tuple(data.latents.shape[1:])}, but the network "
                               f"makes {(net.img_channels, net.img_resolution, net.img_resolution)}")
    for path in (log_path, out):  # --out's folder too: a run that learned its grid must be able to write it
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(log_path, "w") as log_file:  # one run's log: it ends with the schedule it wrote, or why it failed
        def log(line):
            print(line)
            if log_file.closed:
                return
            try:
                log_file.write(line + "\n")
                log_file.flush()
            except OSError as err:  # a full disk: the run goes on, its log on the terminal only
                print(f"Cannot write {log_path} ({err.strerror or err}); the rest of the log is on the terminal only")
                with contextlib.suppress(OSError):  # what it holds unwritten cannot be written either
                    log_file.close()

        num_train, num_valid, num_holdout, _ = config.split_sizes(len(data))
        log(f"LD3: {solver}({', '.join(f'{k}={v}' for k, v in sorted(solver_kwargs.items()))}) at {nfe} NFE, "
            f"end={end}, loss={config.loss}, {num_train} train / {num_valid} validation / {num_holdout} held-out "
            f"samples of {data_path}")
        try:
            result = train_ld3(net, data, config, device=device, progress=True, log=log)
        except BaseException as err:
            # The log is this run's; a schedule already at --out (--overwrite) is an earlier run's: say which.
            earlier = f"; {out} is an earlier run's" if os.path.exists(out) else ""
            log(f"Failed: {type(err).__name__}: {err}{earlier}")
            if isinstance(err, (LPIPSUnavailableError, ValueError)):  # ValueError: e.g. a solver option that draws
                raise click.ClickException(str(err)) from None       # noise
            raise
        result.provenance.update(network=_network_record(network), network_sha256=network_sha256,
                                 teacher_data=os.path.abspath(data_path))
        try:
            result.save(out)
        except util.OutputPathError as err:  # a full disk: the grid is in the log (below), not lost with the file
            grids = [("the grid", result.sigmas), ("its evaluation grid", result.eval_sigmas)]
            log(f"Failed: {err}; " + "; ".join(f"{name}: {', '.join(repr(s) for s in grid.tolist())}"
                                              for name, grid in grids if grid is not None))
            raise click.ClickException(str(err)) from None
        what = "learned grid" if result.chosen == "learned" else f"hand-made grid {result.chosen}"
        log(f"Validation loss {result.init_valid_loss:.6g} ({result.start}, the start) -> {result.valid_loss:.6g} "
            f"({what}): {', '.join(f'{s:.4g}' for s in result.sigmas.tolist())}")
        log(f'Training time: {result.train_time_s:.1f} s. Wrote "{out}".')


@cli.command("evaluate", context_settings={"show_default": True})
@click.option("--schedule", "schedule_path", help="Schedule file from train (or LD3's .pt vector, with --solver)",
              metavar="PATH", required=True)
@click.option("--solver", help="The solver of an LD3 .pt vector (a schedule file names its own)", metavar="NAME",
              type=click.Choice(sorted(SOLVERS)), default=None, show_default=False)
@click.option("--data", "data_path", help="Teacher data from gen-data (the samples the schedule was learned on are "
              "left out, by seed)", metavar="PATH", required=True)
@click.option("--network", "network", help="Network pickle  [default: the schedule file's, else the teacher data's]",
              metavar="PATH|URL", default=None, show_default=False)
@click.option("--loss", help="Distance to the teacher  [default: the one the schedule was learned with]",
              type=click.Choice(list(DISTANCES)), default=None, show_default=False)
@lpips_options
@click.option("--candidates", help=f"Hand-made grids to compare with, comma-separated  [default: "
              f"{','.join(HAND_MADE_GRIDS)}]", metavar="LIST", default=None, show_default=False,
              callback=lambda ctx, param, value: _grid_names(value))
@click.option("--batch", "batch_size", help="Batch size", metavar="INT", type=click.IntRange(min=1), default=64)
@device_option
def evaluate(schedule_path, solver, data_path, network, loss, lpips_vgg, lpips_lin, lpips_resize, candidates,
             batch_size, device):
    """Compare a schedule file with the hand-made grids on teacher samples it was not learned on."""
    # The shell expands no ~ after "=".
    schedule_path, data_path = os.path.expanduser(schedule_path), os.path.expanduser(data_path)
    try:
        grid = make_grid(schedule_path, None)
    except (FileNotFoundError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint="--schedule") from None
    if grid.solver is None:
        if solver is None:
            raise click.UsageError(f"{schedule_path} does not record the solver it was learned for (LD3 .pt): "
                                   f"pass --solver")
        grid.solver, grid.solver_kwargs = solver, learned_solver_options(grid, solver)
    elif solver is not None and solver != grid.solver:
        raise click.UsageError(f"{schedule_path} was learned for solver {grid.solver!r}, not {solver!r}")
    try:
        data = load_teacher_data(data_path)
    except (FileNotFoundError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint="--data") from None
    provenance = grid.provenance
    network = network or provenance.get("network") or data.info.get("network")
    if not network:
        raise click.UsageError(f"neither {schedule_path} nor {data_path} names a network: pass --network")
    loss = loss or (provenance.get("loss") if provenance.get("loss") in DISTANCES else "l2")
    if lpips_resize is None and loss == "lpips":  # the size the grid was learned at, unless told otherwise
        recorded = (provenance.get("config") or {}).get("lpips_resize")
        lpips_resize = recorded if isinstance(recorded, int) else None
    teacher = provenance.get("teacher") or {}
    differs = [key for key in ("solver", "solver_kwargs", "nfe", "sigmas", "network")
               if key in teacher and key in data.info and teacher[key] != data.info[key]]
    if differs:
        print(f"Warning: {data_path}'s teacher differs from the one {schedule_path} was learned from "
              f"({', '.join(differs)})")
    device = _device(device)
    digest = _check_same_network(network, data.info, data_path)  # the teacher samples are this network's
    if digest and provenance.get("network_sha256") not in (None, digest):
        print(f"Note: {schedule_path} was learned with another network ({provenance.get('network')}); evaluating it "
              f"with {network}")
    net = load_network(network, device)[0]
    if tuple(data.latents.shape[1:]) != (net.img_channels, net.img_resolution, net.img_resolution):
        raise click.UsageError(f"{data_path} holds samples of shape {tuple(data.latents.shape[1:])}, but the network "
                               f"makes {(net.img_channels, net.img_resolution, net.img_resolution)}")
    name = os.path.basename(schedule_path)
    try:
        distance = make_distance(loss, lpips_vgg=lpips_vgg, lpips_lin=lpips_lin, lpips_resize=lpips_resize,
                                 device=device)
        report = evaluate_schedule(net, data, grid, distance_fn=distance, candidates=candidates,
                                   batch_size=batch_size, device=device, name=name, progress=True)
    except (LPIPSUnavailableError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    options = ", ".join(f"{k}={v}" for k, v in sorted(grid.solver_kwargs.items()))
    chosen = (provenance.get("result") or {}).get("chosen")
    origin = "" if chosen is None else " (a learned grid)" if chosen == "learned" else f" (the hand-made {chosen})"
    nfe = count_nfe(grid.solver, grid.num_steps, grid.end)
    print(f"Schedule {schedule_path}{origin}: {grid.solver}({options}), {nfe} NFE, end={grid.end}")
    shown = f"{loss} at {lpips_resize}x{lpips_resize}" if loss == "lpips" and lpips_resize else loss
    print(f"Held-out: {report.note} of {data_path}; loss {shown}")
    width = max(len(row.name) for row in report.rows) + 7
    print(f"{'grid':{width}s} {loss:>10s} {'RMS':>10s}   gain over the best hand-made (± standard error)")
    for row in report.rows:
        label = row.name + (" (best)" if row.name == report.best_hand_made else "")
        gain = "" if row.name == report.best_hand_made else f"{row.gain:+.4g} ± {row.gain_se:.2g}"
        print(f"{label:{width}s} {row.loss:10.5g} {row.rms:10.5g}   {gain}".rstrip())
    learned = report.rows[0]
    if learned.gain > NOISE_SE * learned.gain_se:
        verdict = f"better than the best hand-made grid ({report.best_hand_made}) beyond noise"
    elif learned.gain < -NOISE_SE * learned.gain_se:
        verdict = f"worse than the best hand-made grid ({report.best_hand_made}) beyond noise"
    else:
        verdict = f"within noise ({NOISE_SE:g} standard errors) of the best hand-made grid ({report.best_hand_made})"
    print(f"{name} is {verdict} on these {report.num_samples} samples.")


if __name__ == "__main__":
    util.run_cli(cli)
