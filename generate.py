"""Generate images from a network pickle with EDM's sampler or any registered solver and schedule.

With the defaults (Heun, rho = 7, 18 steps, sigma 0.002 ... 80, appended 0) the PNGs equal NVlabs/edm's generate.py
for the same network and seeds. The work lives in samplers/generation.py.
"""

import os

import click
import torch

from samplers import SCHEDULES, SOLVERS, make_grid
from samplers.generation import SamplerConfig, describe, parse_int_list, save_image_grid, write_images
from torch_utils import distributed as dist
from torch_utils import persistence

# CLI option -> (solver keyword, solvers that take it). --order means UniPC's order and iPNDM's max_order.
SOLVER_CLI_OPTIONS = {
    "order": {"unipc": "order", "ipndm": "max_order"},
    "variant": {"unipc": "variant", "dpmpp_2m": "variant", "dpmpp_3m": "variant"},
    "lower_order_final": {"unipc": "lower_order_final", "dpmpp_2m": "lower_order_final",
                          "dpmpp_3m": "lower_order_final"},
    "exact_third_order": {"dpmpp_3m": "exact_third_order"},
    "S_churn": {"heun": "S_churn"},
    "S_min": {"heun": "S_min"},
    "S_max": {"heun": "S_max"},
    "S_noise": {"heun": "S_noise"},
}
LOWER_ORDER_FINAL = {"always": True, "never": False, "below10": 10}


def _seed_list(ctx, param, value):
    try:
        seeds = parse_int_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if not seeds:
        raise click.BadParameter("no seeds given")
    return seeds


def build_sampler_config(solver, schedule, num_steps, sigma_min, sigma_max, rho, end, denoise_to_zero,
                         **solver_cli) -> SamplerConfig:
    """Map CLI values to a SamplerConfig. An option given for a solver or schedule that does not take it is an
    error, never silently ignored."""
    solver_kwargs = {}
    for option, value in solver_cli.items():
        if value is None:
            continue
        targets = SOLVER_CLI_OPTIONS[option]
        flag = "--" + (option if option.startswith("S_") else option.replace("_", "-"))
        if solver not in targets:
            raise click.UsageError(f"{flag} does not apply to solver {solver!r} (only to {', '.join(targets)})")
        if option == "lower_order_final":
            value = LOWER_ORDER_FINAL[value]
        if option == "variant":
            allowed = ("bh1", "bh2") if solver == "unipc" else ("dpmsolver", "taylor")
            if value not in allowed:
                raise click.UsageError(f"--variant for solver {solver!r} must be one of {', '.join(allowed)}")
        if option == "order" and solver == "unipc" and value > 3:
            raise click.UsageError("--order for solver 'unipc' must be 1, 2 or 3")
        solver_kwargs[targets[solver]] = value
    schedule_kwargs = {}
    if rho is not None:
        if schedule not in ("edm", "vp_time_uniform"):
            raise click.UsageError(f"--rho applies to schedules edm and vp_time_uniform, not {schedule!r}")
        schedule_kwargs["rho"] = rho
    return SamplerConfig(solver=solver, schedule=schedule, num_steps=num_steps, sigma_min=sigma_min,
                         sigma_max=sigma_max, end=end, denoise_to_zero=denoise_to_zero, solver_kwargs=solver_kwargs,
                         schedule_kwargs=schedule_kwargs)


def resolve_solver(solver: str | None, schedule: str) -> str:
    """--solver, else the solver a schedule file was learned for, else EDM's heun."""
    if solver is not None:
        return solver
    if schedule in SCHEDULES:
        return "heun"
    try:
        file_solver = make_grid(schedule, None).solver
    except (ValueError, FileNotFoundError) as e:
        raise click.BadParameter(str(e), param_hint="--schedule") from None
    if file_solver is None:
        raise click.UsageError(f"{schedule!r} does not record the solver it was learned for (LD3 .pt); pass --solver")
    return file_solver


def load_network(network: str, device) -> torch.nn.Module:
    """Rank 0 reads (and for a URL downloads into the cache) first, then the other ranks, as EDM does."""
    if dist.get_rank() != 0:
        dist.barrier()
    dist.print0(f'Loading network from "{network}"...')
    net = persistence.load_network_pickle(network)["ema"]
    if dist.get_rank() == 0:
        dist.barrier()
    return net.eval().requires_grad_(False).to(device)


@click.command(context_settings={"show_default": True})
@click.option("--network", "network", help="Network pickle filename", metavar="PATH|URL", type=str, required=True)
@click.option("--outdir", help="Where to save the output images", metavar="DIR", type=str, required=True)
@click.option("--seeds", help="Random seeds (e.g. 1,2,5-10)", metavar="LIST", type=str, default="0-63",
              callback=_seed_list)
@click.option("--subdirs", help="Create subdirectory for every 1000 seeds", is_flag=True)
@click.option("--class", "class_idx", help="Class label  [default: random]", metavar="INT",
              type=click.IntRange(min=0), default=None, show_default=False)
@click.option("--batch", "max_batch_size", help="Maximum batch size (per rank)", metavar="INT",
              type=click.IntRange(min=1), default=64)
@click.option("--steps", "num_steps", help="Number of sampling steps  [default: 18, or the schedule file's]",
              metavar="INT", type=click.IntRange(min=1), default=None, show_default=False)
@click.option("--sigma_min", help="Lowest noise level  [default: varies]", metavar="FLOAT",
              type=click.FloatRange(min=0, min_open=True))
@click.option("--sigma_max", help="Highest noise level  [default: varies]", metavar="FLOAT",
              type=click.FloatRange(min=0, min_open=True))
@click.option("--rho", help="Time step exponent (schedules edm, vp_time_uniform)  [default: 7 for edm]",
              metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=None, show_default=False)
@click.option("--S_churn", "S_churn", help="Stochasticity strength (heun)  [default: 0]", metavar="FLOAT",
              type=click.FloatRange(min=0), default=None, show_default=False)
@click.option("--S_min", "S_min", help="Stoch. min noise level (heun)  [default: 0]", metavar="FLOAT",
              type=click.FloatRange(min=0), default=None, show_default=False)
@click.option("--S_max", "S_max", help="Stoch. max noise level (heun)  [default: inf]", metavar="FLOAT",
              type=click.FloatRange(min=0), default=None, show_default=False)
@click.option("--S_noise", "S_noise", help="Stoch. noise inflation (heun)  [default: 1]", metavar="FLOAT",
              type=float, default=None, show_default=False)
@click.option("--solver", help="ODE solver  [default: heun, or the schedule file's]",
              type=click.Choice(sorted(SOLVERS)), default=None, show_default=False)
@click.option("--schedule", help=f"Noise-level grid: {', '.join(SCHEDULES)}, or a schedule file (.json, LD3 .pt)",
              metavar="NAME|PATH", type=str, default="edm")
@click.option("--end", help="Grid end: append sigma=0 and denoise, or stop at sigma_min  [default: the solver's "
              "convention: zero for euler/heun, sigma_min otherwise]", type=click.Choice(["zero", "sigma_min"]),
              default=None, show_default=False)
@click.option("--denoise-to-zero", "denoise_to_zero", help="After a grid ending at sigma_min, output D(x; sigma_min)"
              " (+1 NFE)", is_flag=True)
@click.option("--order", help="UniPC order (1-3) / iPNDM max order (1-4)  [default: 3 / 4]", metavar="INT",
              type=click.IntRange(min=1, max=4), default=None, show_default=False)
@click.option("--variant", help="UniPC: bh1|bh2  [default: bh1]; DPM-Solver++: dpmsolver|taylor  [default: dpmsolver]",
              type=click.Choice(["bh1", "bh2", "dpmsolver", "taylor"]), default=None, show_default=False)
@click.option("--lower-order-final", "lower_order_final", help="Lower-order final steps (DPM-Solver++, UniPC): "
              "always, never, or only below 10 steps (original DPM-Solver)  [default: always]",
              type=click.Choice(["always", "never", "below10"]), default=None, show_default=False)
@click.option("--exact-third-order/--reference-third-order", "exact_third_order", default=None,
              help="DPM-Solver++(3M): truly third-order step instead of the reference codes' update  "
              "[default: reference]")
@click.option("--device", help="Torch device  [default: cuda if available, else cpu]", type=str, default=None,
              show_default=False)
@click.option("--grid", "grid_path", help="Also write all images of --seeds tiled into one PNG", metavar="PNG",
              type=str, default=None)
def main(network, outdir, seeds, subdirs, class_idx, max_batch_size, num_steps, sigma_min, sigma_max, rho, solver,
         schedule, end, denoise_to_zero, device, grid_path, **solver_cli):
    """Generate random images using EDM's sampler or another solver and time discretisation.

    Examples:

    \b
    # 64 images with EDM's deterministic Heun sampler (18 steps, 35 NFE), as NVlabs/edm
    python generate.py --outdir=out --seeds=0-63 --batch=64 \\
        --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl

    \b
    # 50k images for FID on 8 GPUs with iPNDM, 10 steps on the logSNR grid (resumable)
    torchrun --standalone --nproc_per_node=8 generate.py --outdir=out --seeds=0-49999 --subdirs \\
        --solver=ipndm --steps=10 --schedule=logsnr --network=...

    \b
    # A learned (LD3) schedule file brings its solver and grid
    python generate.py --outdir=out --seeds=0-99 --schedule=ipndm-nfe6.json --network=...
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.get_local_rank())
    dist.init(device=device)
    if schedule not in SCHEDULES and not os.path.isfile(schedule):
        raise click.BadParameter(f"{schedule!r} is neither a schedule name ({', '.join(SCHEDULES)}) nor an existing "
                                 f"schedule file", param_hint="--schedule")
    if schedule not in SCHEDULES and any(v is not None for v in (sigma_min, sigma_max, rho)):
        raise click.UsageError("--sigma_min, --sigma_max and --rho do not apply to a schedule file (it holds its grid)")
    solver = resolve_solver(solver, schedule)
    config = build_sampler_config(solver, schedule, num_steps, sigma_min, sigma_max, rho, end, denoise_to_zero,
                                  **solver_cli)

    net = load_network(network, device)
    try:
        summary = describe(net, config)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if class_idx is not None and not getattr(net, "label_dim", 0):
        raise click.BadParameter(f"the network is unconditional (label_dim = 0); --class {class_idx} cannot apply",
                                 param_hint="--class")
    if class_idx is not None and class_idx >= net.label_dim:
        raise click.BadParameter(f"{class_idx} is out of range for label_dim = {net.label_dim}", param_hint="--class")

    dist.print0(f"Sampler: {summary}")
    dist.print0(f'Generating {len(seeds)} images to "{outdir}" on {dist.get_world_size()} rank(s)...')
    counts = write_images(net, seeds, outdir, subdirs=subdirs, batch_size=max_batch_size, progress=True,
                          device=device, class_idx=class_idx, solver=config.solver, schedule=config.schedule,
                          num_steps=config.num_steps, sigma_min=config.sigma_min, sigma_max=config.sigma_max,
                          end=config.end, denoise_to_zero=config.denoise_to_zero,
                          solver_kwargs=config.solver_kwargs, schedule_kwargs=config.schedule_kwargs)
    totals = torch.tensor([counts["written"], counts["skipped"]], dtype=torch.int64,
                          device=device if dist.is_distributed() and device.type == "cuda" else "cpu")
    dist.all_reduce_sum_(totals)
    dist.barrier()
    dist.print0(f"Wrote {int(totals[0])} images, skipped {int(totals[1])} that already existed.")
    if grid_path is not None and dist.get_rank() == 0:
        rows, columns = save_image_grid(outdir, seeds, grid_path, subdirs=subdirs)
        print(f'Wrote a {rows}x{columns} image grid to "{grid_path}".')
    dist.barrier()
    dist.print0("Done.")


if __name__ == "__main__":
    dist.excepthook_abort_all_ranks()
    main()
