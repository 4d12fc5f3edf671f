"""Compute FID (as EDM's fid.py), Inception Score, precision/recall and KID; build reference statistics.

A thin CLI over `metrics`: parsing and error reporting only.
"""

import dataclasses
import functools
import json
import math
import os
import pickle
import sys

import click
from click.core import ParameterSource

import metrics
from dnnlib import util
from metrics import detectors as detectors_lib
from metrics import evaluate
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
from torch_utils import distributed
from training.presets import SAMPLER_PRESET_SOURCES, SAMPLER_PRESETS
from training.run_chain import run_chain
from training.snapshots import load_snapshot


def _detector_overrides(values) -> dict[str, str]:
    try:
        return detectors_lib.parse_detector_overrides(values)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--detector") from err


def _init_distributed(device: str | None) -> None:
    """torchrun's process group (gloo on CPU); '--device cuda' means each rank's own GPU, as in generate.py. Joined
    before the checks that read the file system: on several nodes one may see other files (--out's folder missing
    there), and a rank that ended before joining left the other nodes waiting in the group for its 30-minute timeout
    (torchrun ends only its own node's ranks); once joined, it ends them at their next collective."""
    distributed.init(device=check_device(device, distributed.get_local_rank()))
    distributed.excepthook_abort_all_ranks()


def _run(func, *args, **kwargs):
    """Turn the library's input errors into one clear CLI error line."""
    try:
        return func(*args, **kwargs)
    except (metrics.MetricsError, metrics.ReferenceStatsError, metrics.DetectorUnavailableError, OSError,
            pickle.UnpicklingError, ValueError) as err:
        raise click.ClickException(str(err)) from err


def _interruptible(written: str):
    """Ctrl-C: exit 130 (the shell's code for SIGINT) with one line saying what is on disk, not click's "Aborted!".
    written: the option whose file is written, whole, only once the pass is complete."""
    def decorate(command):
        @functools.wraps(command)
        def run_command(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except KeyboardInterrupt:
                if distributed.get_rank() == 0:
                    print(f"Interrupted: nothing was written ({written} is written whole once the pass over the "
                          f"images is complete); run the same command again.", file=sys.stderr, flush=True)
                sys.exit(130)
        return run_command
    return decorate


def network_source_from_cli(network_pkl, seeds, batch_size, class_idx, preset_lines=(), preset=None,
                            network_sha256=None, **sampler_cli):
    """Load the network and build the in-memory image source; the sampler flags are generate.py's
    (samplers/cli_options.py), so `calc --network` samples exactly what generate.py would write. preset_lines: what
    --preset set (apply_preset), printed with the sampler; preset: its name, for errors; network_sha256: the pickle's,
    where the caller has it (rank 0; else computed there). Nothing is written to disk (only --out's JSON)."""
    check_cuda_graph(sampler_cli.get("cuda_graph"), distributed.device())
    snapshot = _run(load_snapshot, network_pkl, distributed.device())
    net, sampling = snapshot.net, snapshot.process.sampling
    check_class(net, class_idx)
    config, summary, notes = snapshot_sampler(snapshot, sampler_cli, preset, SAMPLER_PRESETS)
    for line in [*preset_lines, *(f"Note: {note}" for note in notes)]:
        distributed.print0(line)
    distributed.print0(f"Sampler: {summary}")
    if network_sha256 is None and distributed.get_rank() == 0:  # recorded in the result (what was measured)
        network_sha256 = util.file_sha256(network_pkl)
    return _run(metrics.network_source, net, seeds, batch_size=batch_size, network_description=network_pkl,
                network_sha256=network_sha256, sampler_description=summary,
                process_description=snapshot.data.get("process"), class_idx=class_idx, sampling=sampling,
                **dataclasses.asdict(config))


def _calc_run_folder(run_dir, seeds, batch_size, ref_path, metric_names, detector_paths, preset_lines, preset,
                     sampler_cli, fid_route):
    """`calc --network=RUN_DIR`: every network pickle of a training run in training order, each result written
    beside its pickle (evaluate.result_path_beside: report.py plots them); a result left by an earlier run of the
    same request is kept, so a rerun continues where an interrupted one stopped. Ends with a table."""
    # A resumed run's folder continues the runs before it (train.py writes each resume into a new folder): their
    # snapshots up to the resumed state are the same training's.
    chain = run_chain(run_dir, "snapshots") if distributed.get_rank() == 0 else None
    chain, networks = distributed.broadcast_object(
        (chain, evaluate.run_networks(run_dir, chain)) if distributed.get_rank() == 0 else None)
    if not networks:
        raise click.ClickException(f"{run_dir} holds no network-snapshot-*.pkl or network-phema-*.pkl")
    continued = "".join(f"{', ' if index else ' (and the runs it continued: '}{directory} up to kimg {limit}"
                        for index, (directory, limit) in enumerate(chain[:-1])) + (")" if len(chain) > 1 else "")
    distributed.print0(f"Evaluating {len(networks)} networks of {run_dir}{continued}: {', '.join(metric_names)} "
                       f"for {len(seeds)} images each")
    rows = []
    # What a kept result must have been measured against (the same content under any path; a URL's cached copy).
    ref_sha256 = util.file_sha256(ref_path) if ref_path is not None and distributed.get_rank() == 0 else None
    # And with the same detectors: another --detector file is another measurement.
    detectors = evaluate.planned_detectors(metric_names, detector_paths) if distributed.get_rank() == 0 else None
    # A kept result measured against another reference or with other detectors is refused before anything is
    # measured (in the loop it was met only on reaching its network, maybe hours into the run); whether it measured
    # the same images needs its network loaded, so that waits for the loop.
    refused = None
    # Each pickle's content: a result beside a pickle written again under its name is not that pickle's.
    network_sha256 = {network_pkl: util.file_sha256(network_pkl) for network_pkl in networks} \
        if distributed.get_rank() == 0 else {}
    if distributed.get_rank() == 0:
        for network_pkl in networks:
            _, refused = evaluate.earlier_result(evaluate.result_path_beside(network_pkl, metric_names, len(seeds)),
                                                 None, ref_path, ref_sha256, detectors, network_sha256[network_pkl],
                                                 fid_route)
            if refused is not None:
                refused = f"{refused}: move it away to measure {network_pkl} again with these options"
                break
    refused = distributed.broadcast_object(refused)
    if refused is not None:
        raise click.ClickException(refused)
    for index, network_pkl in enumerate(networks):
        out_path = evaluate.result_path_beside(network_pkl, metric_names, len(seeds))
        source = network_source_from_cli(network_pkl, seeds, batch_size, preset_lines=preset_lines if index == 0
                                         else (), preset=preset, network_sha256=network_sha256.get(network_pkl),
                                         **dict(sampler_cli))
        record, refused = evaluate.earlier_result(out_path, source, ref_path, ref_sha256, detectors,
                                                  network_sha256[network_pkl], fid_route) \
            if distributed.get_rank() == 0 else (None, None)
        record, refused = distributed.broadcast_object((record, refused))
        if refused is not None:
            raise click.ClickException(f"{refused}: move it away to measure {network_pkl} again with these options")
        if record is not None:
            distributed.print0(f'Kept the results in "{out_path}" (the same request)')
        else:
            try:
                record = _run(metrics.calc_metrics, source, ref_path, metric_names, detector_paths=detector_paths,
                              fid_route=fid_route)
            except KeyboardInterrupt:  # the results written before this network's are whole: say so
                if distributed.get_rank() == 0:
                    print(f"Interrupted while measuring {network_pkl}; the {index} result(s) before it are written. "
                          f"Run the same command again to measure the rest.", file=sys.stderr, flush=True)
                sys.exit(130)
            if distributed.get_rank() == 0:
                _run(evaluate.write_json, record, out_path)
                print(f'Results written to "{out_path}"')
        if distributed.get_rank() == 0:
            for line in evaluate.format_results(record):
                print(f"  {line}")
        # A continued run's pickle is named with its folder: it is not in run_dir.
        in_run = os.path.dirname(network_pkl) == os.path.abspath(run_dir)
        rows.append((os.path.basename(network_pkl) if in_run else os.path.join(
            os.path.basename(os.path.dirname(network_pkl)), os.path.basename(network_pkl)), record))
    fids = [record["results"].get("fid", math.inf) for _, record in rows]
    fids = [value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf for value in fids]
    best = min(range(len(rows)), key=fids.__getitem__) if min(fids, default=math.inf) < math.inf else None
    distributed.print0(f"\nResults of {run_dir}:")
    for index, (name, record) in enumerate(rows):
        distributed.print0(f"  {name}  {'; '.join(evaluate.format_results(record))}"
                           f"{'  <- lowest FID' if index == best else ''}")
    distributed.barrier()


@click.group()
def main():
    """Calculate FID, Inception Score and precision/recall; compute reference statistics.

    Examples:

    \b
    # FID of 50,000 PNGs written by generate.py (a folder or a ZIP)
    torchrun --standalone --nproc_per_node=1 fid.py calc --images=fid-tmp \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # FID, IS and precision/recall of a network, sampled in memory (no PNGs); results also as JSON
    torchrun --standalone --nproc_per_node=8 fid.py calc --network=network-snapshot.pkl --seeds=0-49999 \\
        --ref=fid-refs/my-dataset.npz --metrics=fid,is,pr --out=metrics.json

    \b
    # Every network-snapshot-*.pkl of a training run, results beside each (a rerun continues; report.py plots them)
    torchrun --standalone --nproc_per_node=8 fid.py calc --network=training-runs/00003-... --seeds=0-9999 \\
        --ref=fid-refs/my-dataset.npz

    \b
    # Reference statistics of a dataset (all images, no flips); add pr to store VGG16 features too
    torchrun --standalone --nproc_per_node=1 fid.py ref --data=datasets/my-dataset.zip \\
        --dest=fid-refs/my-dataset.npz --metrics=fid,pr,kid

    Detectors are downloaded from their canonical URLs into the cache ($DNNLIB_CACHE_DIR/downloads, default
    ~/.cache/dnnlib/downloads). Offline, pass local copies: --detector inception=PATH --detector vgg16=PATH.
    """


_common_options = [
    click.option("--batch", "batch_size", help="Maximum batch size per rank", metavar="INT",
                 type=click.IntRange(min=1), default=64, show_default=True),
    click.option("--workers", "num_workers", help="Data loader worker processes per rank  [default: 3, at most the "
                 "CPUs - 1]", metavar="INT", type=click.IntRange(min=0), default=None),
    click.option("--detector", "detector_values", help="Detector file or URL instead of the canonical one "
                 "(repeatable): inception=PATH, vgg16=PATH", metavar="NAME=PATH", multiple=True),
    click.option("--device", help="Device (default: cuda:LOCAL_RANK if available, else cpu)", metavar="DEVICE",
                 type=str, default=None),
]


def default_workers(num_workers: int | None) -> int:
    """--workers: 3 as before, but never more than the CPUs left beside the main process (PyTorch warns otherwise)."""
    if num_workers is not None:
        return num_workers
    return min(3, max((os.cpu_count() or 1) - 1, 0))


def common_options(func):
    for option in reversed(_common_options):
        func = option(func)
    return func


@main.command()
@click.option("--images", "image_path", help="Images to evaluate (folder or ZIP)", metavar="PATH|ZIP", type=str)
@click.option("--network", "network_pkl", help="Network pickle to sample in memory instead; a training run folder: "
              "each of its network-*.pkl in turn (a resumed run: also those of the runs it continued), results beside "
              "each (NAME-LABELS.json; a rerun skips those done)",
              metavar="PKL|URL|DIR", type=str)
@click.option("--ref", "ref_path", help="Reference statistics (EDM .npz; needed for fid, pr, kid)",
              metavar="NPZ|URL", type=str)
@click.option("--num-images", "--num", "num_expected", help="Number of images (--images: random subset if more, error "
              "if fewer; --network without --seeds: seeds 0..num-1); --num is an alias, which torchrun's own parser "
              "would take for its --numa-binding  [default: 50000]", metavar="INT", type=click.IntRange(min=2),
              default=None)
@click.option("--seed", help="Random seed for selecting the images", metavar="INT", type=int, default=0,
              show_default=True)
@click.option("--seeds", help="--network: seeds to sample (e.g. 0-49999)", metavar="LIST", type=str,
              default=None, callback=seed_list)
@click.option("--out", "out_path", help="Write the results as JSON to this file", metavar="JSON", type=str)
@click.option("--metrics", "metric_list", help="Metrics to compute: fid, is, pr, kid", metavar="LIST", type=str,
              default="fid", show_default=True)
@click.option("--fid-route", help="How FID takes Tr sqrtm(sigma sigma_ref): sqrtm (EDM's float bit for bit) or eigvals "
              "(torch-fidelity's: about 3x faster on one CPU thread; ~1e-14 relative apart, ~1e-9 for singular "
              "statistics)",
              type=click.Choice(list(metrics.FRECHET_ROUTES)), default=metrics.frechet.DEFAULT_FRECHET_ROUTE,
              show_default=True)
@common_options
@sampler_options(help_prefix="--network: ")
@preset_option(SAMPLER_PRESETS, SAMPLER_PRESET_SOURCES, help_prefix="--network: ")
@_interruptible("--out")
def calc(image_path, network_pkl, ref_path, num_expected, seed, seeds, out_path, metric_list, fid_route, batch_size,
         num_workers, detector_values, device, preset, **sampler_cli):
    """Calculate metrics for a folder/ZIP of images or for a network sampled in memory.

    With --network, the sampler options are generate.py's and mean the same: the images are bit-identical to the
    PNGs `generate.py --seeds ...` would write with those options.
    """
    metric_names = _run(metrics.parse_metrics, metric_list)
    detector_paths = _detector_overrides(detector_values)
    # The shell expands no ~ after "=" (--ref, --network and --detector go through open_url, which does).
    image_path, out_path = util.expand_user(image_path), util.expand_user(out_path)
    if (image_path is None) == (network_pkl is None):
        raise click.UsageError("give exactly one of --images and --network")
    if ref_path is None and metrics.metrics_needing_reference(metric_names):
        raise click.UsageError(f"--ref is required for {', '.join(metrics.metrics_needing_reference(metric_names))}")
    ctx = click.get_current_context()
    given = [param.opts[0] for param in ctx.command.params if param.name in ["seeds", "preset", *sampler_cli]
             and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE]
    if image_path is not None and given:
        raise click.UsageError(f"{', '.join(given)}: sampling options apply to --network only")
    if network_pkl is not None and ctx.get_parameter_source("seed") == ParameterSource.COMMANDLINE:
        raise click.UsageError("--seed picks the subset of --images to evaluate; with --network the images are "
                               "those of --seeds")
    preset_lines = apply_preset(preset, sampler_cli, SAMPLER_PRESETS, SAMPLER_PRESET_SOURCES)
    _init_distributed(device)
    # ~ expanded (the shell leaves --network=~/runs/... alone): the chain of resumed runs is read from its files.
    run_dir = os.path.expanduser(network_pkl) if network_pkl is not None and os.path.isdir(
        os.path.expanduser(network_pkl)) else None
    if run_dir is not None and out_path:
        raise click.UsageError("--out: with a run folder as --network, each network's results are written beside it "
                               "(network-snapshot-KIMG-LABELS.json)")
    if out_path:
        _run(util.check_output_path, out_path, "--out")  # before the image pass, not after it
        # A slip such as --out=ref.npz replaced the reference statistics (or the network) with the JSON.
        inputs = [("--ref", ref_path), ("--images", image_path), ("--network", network_pkl),
                  *(("--detector", path) for path in detector_paths.values())]
        try:
            util.check_output_not_input(out_path, "--out", inputs)
        except util.OutputPathError as err:
            raise click.UsageError(str(err)) from None

    if image_path is not None:
        num = 50000 if num_expected is None else num_expected
        distributed.print0(f'Loading images from "{image_path}"...')
        source = _run(metrics.dataset_source, image_path, num=num, seed=seed, batch_size=batch_size,
                      num_workers=default_workers(num_workers))
    else:
        if seeds is None:
            seeds = list(range(50000 if num_expected is None else num_expected))
        elif num_expected is not None and num_expected != len(seeds):
            raise click.UsageError(f"--num-images={num_expected} disagrees with --seeds ({len(seeds)} seeds)")
        if run_dir is not None:
            return _calc_run_folder(run_dir, seeds, batch_size, ref_path, metric_names, detector_paths, preset_lines,
                                    preset, sampler_cli, fid_route)
        source = network_source_from_cli(network_pkl, seeds, batch_size, preset_lines=preset_lines, preset=preset,
                                         **sampler_cli)

    record = _run(metrics.calc_metrics, source, ref_path, metric_names, detector_paths=detector_paths,
                  fid_route=fid_route)
    if distributed.get_rank() == 0:
        for line in evaluate.format_results(record):
            print(line)
        if out_path:
            _run(evaluate.write_json, record, out_path)
            print(f'Results written to "{out_path}"')
    distributed.barrier()


@main.command()
@click.option("--data", "dataset_path", help="Path to the dataset", metavar="PATH|ZIP", type=str, required=True)
@click.option("--dest", "dest_path", help="Destination .npz file (the name must end in .npz)", metavar="NPZ", type=str,
              required=True)
@click.option("--max-real", "pr_max_real", help="pr, kid: features of at most this many images (pr: the first in file "
              "order, as StyleGAN2-ADA; kid: a seeded uniform subset)",
              metavar="INT", type=click.IntRange(min=1), default=200000, show_default=True)
@click.option("--metrics", "metric_list", help="Metrics whose reference to store: fid, pr, kid (is needs none)",
              metavar="LIST", type=str, default="fid", show_default=True)
@common_options
@_interruptible("--dest")
def ref(dataset_path, dest_path, pr_max_real, metric_list, batch_size, num_workers, detector_values, device):
    """Calculate dataset reference statistics needed by 'calc' (all images, no flips)."""
    # Every refusal compute_reference would make (--metrics is, a --dest not ending in .npz, an unwritable --dest)
    # before the dataset is listed and read, not after the pass over it.
    dataset_path, dest_path = os.path.expanduser(dataset_path), os.path.expanduser(dest_path)  # as calc's
    _init_distributed(device)
    metric_names = _run(evaluate.check_reference_request, dest_path, metric_list, "--dest")
    detector_paths = _detector_overrides(detector_values)
    distributed.print0(f'Loading images from "{dataset_path}"...')
    source = _run(metrics.dataset_source, dataset_path, num=None, batch_size=batch_size,
                  num_workers=default_workers(num_workers))
    summary = _run(metrics.compute_reference, source, dest_path, metric_names, detector_paths=detector_paths,
                   pr_max_real=pr_max_real)
    distributed.print0(json.dumps(dict(dest=summary["dest"], num_images=summary["num_images"])))
    distributed.print0("Done.")


if __name__ == "__main__":
    util.run_cli(main)
