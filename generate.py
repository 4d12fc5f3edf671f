"""Generate images from a network pickle with EDM's sampler or any registered solver and schedule.

With the defaults (Heun, rho = 7, 18 steps, sigma 0.002 ... 80, appended 0) the PNGs equal NVlabs/edm's generate.py
for the same network and seeds. The work lives in samplers/generation.py; the sampler flags in samplers/cli_options.py.
"""

import dataclasses
import os
import sys

import click
import torch

from dnnlib import util
from samplers.cli_options import (
    apply_preset,
    check_class,
    check_cuda_graph,
    check_device,
    preset_option,
    sampler_options,
    seed_list,
    snapshot_sampler,
)
from samplers.generation import (
    NonFiniteSamples,
    OutputFolderMismatch,
    claim_output_folder,
    enclosing_dataset,
    output_record,
    save_image_grid,
    schedule_notes,
    write_images,
)
from torch_utils import distributed as dist
from torch_utils import persistence
from training.dataset import preview_images
from training.presets import SAMPLER_PRESET_SOURCES, SAMPLER_PRESETS
from training.snapshots import load_snapshot


@click.command(context_settings={"show_default": True})
@click.option("--network", "network", help="Network pickle filename", metavar="PATH|URL", type=str, required=True)
@click.option("--outdir", help="Where to save the output images", metavar="DIR", type=str, required=True)
@click.option("--seeds", help="Random seeds (e.g. 1,2,5-10)", metavar="LIST", type=str, default="0-63",
              callback=seed_list)
@click.option("--subdirs", help="Create subdirectory for every 1000 seeds", is_flag=True)
@click.option("--batch", "max_batch_size", help="Maximum batch size (per rank)", metavar="INT",
              type=click.IntRange(min=1), default=64)
@sampler_options()
@preset_option(SAMPLER_PRESETS, SAMPLER_PRESET_SOURCES)
@click.option("--device", help="Torch device  [default: cuda if available, else cpu]", metavar="DEVICE", type=str,
              default=None, show_default=False)
@click.option("--grid", "grid_path", help="Also write all images of --seeds tiled into one PNG", metavar="PNG",
              type=str, default=None)
@click.option("--overwrite", help="Regenerate every image of --seeds; in a folder made by another network or "
              "sampler, first remove its seed PNGs (other files stay)", is_flag=True)
def main(network, outdir, seeds, subdirs, class_idx, max_batch_size, device, grid_path, overwrite, preset,
         **sampler_cli):
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
    # Any solver option by name (--order, --variant, ... are aliases)
    python generate.py --outdir=out --seeds=0-63 --solver=unipc --steps=10 --solver-opt order=2,variant=bh2 ...

    \b
    # A learned (LD3) schedule file brings its solver and grid
    python generate.py --outdir=out --seeds=0-99 --schedule=ipndm-nfe6.json --network=...

    \b
    # A published sampler configuration (--preset=list shows them); explicit options win
    python generate.py --outdir=out --seeds=0-63 --preset=edm-imagenet64 --network=...

    \b
    # EDM's own options work too: --disc=vp|ve|iddpm|edm, --solver=euler|heun, --schedule=linear, --scaling=none
    python generate.py --outdir=out --seeds=0-63 --solver=euler --disc=vp --steps=256 --network=...
    """
    preset_lines = apply_preset(preset, sampler_cli, SAMPLER_PRESETS, SAMPLER_PRESET_SOURCES)
    device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"), dist.get_local_rank())
    check_cuda_graph(sampler_cli.get("cuda_graph"), device)
    # "--outdir=~/x": the shell expands no ~ after "=", and a literal ./~ folder invites an `rm -rf ~`.
    outdir = os.path.expanduser(outdir)
    grid_path = util.expand_user(grid_path)
    dist.init(device=device)
    dist.excepthook_abort_all_ranks()  # after init, which wraps a hook installed before it (see its docstring)

    try:
        snapshot = load_snapshot(network, device)
    except (persistence.NetworkPickleError, OSError, ValueError) as err:  # ValueError: e.g. --network= (empty)
        raise click.ClickException(str(err)) from None
    net, sampling = snapshot.net, snapshot.process.sampling
    config, summary, notes = snapshot_sampler(snapshot, sampler_cli, preset, SAMPLER_PRESETS)
    for line in preset_lines + [f"Note: {note}" for note in notes]:
        dist.print0(line)
    check_class(net, class_idx)

    dist.print0(f"Sampler: {summary}")
    # The folder records what made its images: a re-run with other settings must not pass old images off as new.
    error = None
    if dist.get_rank() == 0:
        try:
            util.check_output_path(outdir, "--outdir", is_dir=True)
            if grid_path is not None:
                util.check_output_path(grid_path, "--grid")
                if not grid_path.lower().endswith(".png"):  # written as PNG: another name would hide what it is
                    raise util.OutputPathError(f"--grid: {grid_path}: expected a file name ending in .png")
                dataset = enclosing_dataset(grid_path)
                if dataset is not None:  # as --outdir: a PNG anywhere below a folder dataset is a training image
                    raise util.OutputPathError(f"--grid: {grid_path} is inside the dataset {dataset} (its "
                                               f"dataset.json), which the grid would join; write it elsewhere")
            record = output_record(network, snapshot.data.get("process"), sampling, net, config, summary, class_idx,
                                   subdirs)
            for note in schedule_notes(config, record["network_sha256"]):
                print(f"Note: {note}")
            claim_output_folder(outdir, record, overwrite)
        except (OutputFolderMismatch, util.OutputPathError) as err:
            error = str(err)
    error = dist.broadcast_object(error) if dist.is_distributed() else error
    if error is not None:
        if dist.get_rank() != 0:  # rank 0 says it, once
            sys.exit(1)
        raise click.ClickException(error)
    dist.print0(f'Generating {len(seeds)} images to "{outdir}" on {dist.get_world_size()} rank(s)...')
    try:
        counts = write_images(net, seeds, outdir, subdirs=subdirs, batch_size=max_batch_size, progress=True,
                              device=device, class_idx=class_idx, sampling=sampling, overwrite=overwrite,
                              **dataclasses.asdict(config))
    except (util.OutputPathError, NonFiniteSamples) as err:  # a full disk, a diverging sampler: one line
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt:  # not click's bare "Aborted!": every PNG is renamed into place once whole
        if dist.get_rank() == 0:
            print(f'Interrupted. The images in "{outdir}" are complete; run the same command again to generate the '
                  f'rest (it skips them).', file=sys.stderr, flush=True)
        sys.exit(130)
    totals = torch.tensor([counts["written"], counts["skipped"]], dtype=torch.int64,
                          device=device if dist.is_distributed() and device.type == "cuda" else "cpu")
    dist.all_reduce_sum_(totals)
    dist.barrier()
    dist.print0(f"Wrote {int(totals[0])} images, skipped {int(totals[1])} that already existed.")
    if grid_path is not None and dist.get_rank() == 0:
        # The training data beside the samples when the snapshot's dataset is at hand.
        dataset_path = (snapshot.data.get("dataset_kwargs") or {}).get("path")
        real = preview_images(dataset_path, len(seeds)) if dataset_path and os.path.exists(dataset_path) else None
        try:
            rows, columns = save_image_grid(outdir, seeds, grid_path, subdirs=subdirs, real_images=real)
        except util.OutputPathError as err:  # it names the file and the reason
            raise click.ClickException(f"--grid: {err}") from None
        except OSError as err:
            raise click.ClickException(f"--grid: cannot write {grid_path} ({err})") from None
        except ValueError as err:
            raise click.ClickException(f"--grid: {err}") from None
        beside = f", training images from {dataset_path} on the right" if real is not None else ""
        print(f'Wrote a {rows}x{columns} image grid to "{grid_path}"{beside}.')
    dist.barrier()
    dist.print0("Done.")


if __name__ == "__main__":
    util.run_cli(main)
