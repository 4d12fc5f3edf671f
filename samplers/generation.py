"""Seeds -> images: the library behind generate.py (PNG files) and metrics' in-memory sampling.

Behaviour matches NVlabs/edm's generate.py: one random generator per seed (an image depends only on its seed, not on
batch size or rank count), latents then labels drawn from it, seeds split across ranks as EDM does, output
(x * 127.5 + 128).clip(0, 255).to(uint8), PNGs named {seed:06d}.png (with subdirs {seed - seed % 1000:06d}).
`generate_images` is the single sampling path; `write_images` writes its batches as PNG files and resumes an
interrupted run by skipping seeds whose PNG exists before sampling.
"""

import collections
import concurrent.futures
import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Callable

import numpy as np
import PIL.Image
import torch

from samplers import SCHEDULES, SigmaGrid, count_nfe, get_solver, make_grid, sample
from samplers.accelerated import accelerate
from samplers.guidance import build_guidance, guidance_record
from samplers.schedules import learned_solver_options
from samplers.solver_grid import revised_step_orders
from torch_utils import distributed as dist
from torch_utils.misc import StackedRandomGenerator


def parse_int_list(s, max_value: int = 1 << 32) -> list[int]:
    """'1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10] (EDM's seed syntax); ranges must end below `max_value` (2^32: the
    per-seed generators take seeds mod 2^32)."""
    if isinstance(s, (list, tuple)):
        return [int(v) for v in s]
    values = []
    for part in str(s).split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)-(\d+)", part)
        if match:
            first, last = int(match.group(1)), int(match.group(2))
            if last < first:
                raise ValueError(f"cannot parse {part!r} in {s!r}: a range N-M needs M >= N")
            if last >= max_value:  # before the list is built: a mistyped range would fill the memory first
                raise ValueError(f"{part!r} in {s!r}: values must be below {max_value}, got {last}")
            values.extend(range(first, last + 1))
        elif re.fullmatch(r"\d+", part):
            values.append(int(part))
        else:
            raise ValueError(f"cannot parse {part!r} in {s!r}: expected a comma-separated list of N or N-M")
    return values


class NonFiniteSamples(ValueError):
    """A batch of samples holds NaN or inf."""


def format_seeds(seeds, limit: int = 8) -> str:
    seeds = list(seeds)
    return ", ".join(map(str, seeds[:limit])) + (f", ... ({len(seeds)} in all)" if len(seeds) > limit else "")


def rank_batches(seeds, max_batch_size: int, rank: int | None = None, world_size: int | None = None) -> list[list[int]]:
    """This rank's batches, exactly as EDM's generate.py: ceil(len(seeds) / (batch * world)) * world near-equal
    chunks (tensor_split), rank r takes chunks r, r + world, ...; some may be empty."""
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    seeds = [int(s) for s in seeds]
    if max_batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {max_batch_size}")
    if not seeds:
        return []
    num_batches = ((len(seeds) - 1) // (max_batch_size * world_size) + 1) * world_size
    chunks = torch.as_tensor(seeds, dtype=torch.int64).tensor_split(num_batches)
    return [chunk.tolist() for chunk in chunks[rank::world_size]]


@dataclasses.dataclass
class SamplerConfig:
    """Everything that decides how a seed becomes an image, besides the network."""

    solver: str | None = None  # None: 'heun', or the solver a schedule file was learned for
    schedule: str = "edm"  # a SCHEDULES name or a schedule file (.json, LD3 .pt)
    num_steps: int | None = None  # None: 18, or the schedule file's
    sigma_min: float | None = None  # None: the schedule's default (EDM: 0.002)
    sigma_max: float | None = None  # None: the schedule's default (EDM: 80)
    end: str | None = None  # 'zero' | 'sigma_min'; None: the solver's convention (its default_end) or the file's
    denoise_to_zero: bool = False
    # Speed of the denoiser call (samplers/accelerated.py; opt-in, the defaults are EDM's exact call):
    precision: str = "fp32"  # 'bf16': the network under bf16 autocast
    compile: bool = False  # torch.compile the network
    cuda_graph: bool = False  # replay the fixed-shape call from CUDA graphs
    solver_kwargs: dict = dataclasses.field(default_factory=dict)
    schedule_kwargs: dict = dataclasses.field(default_factory=dict)
    guidance: dict = dataclasses.field(default_factory=dict)  # {name: options} of samplers.guidance.GUIDANCE


# How fast the denoiser is called, not how a seed becomes an image (not sampler options).
SPEED_FIELDS = ("precision", "compile", "cuda_graph")


def schedule_notes(config: SamplerConfig, network_sha256: str | None) -> list[str]:
    """What to say about a schedule file used with this network: one learned with another network (its provenance
    records that network's sha256, as ld3.py train writes) may not fit this one."""
    if config.schedule in SCHEDULES or network_sha256 is None:
        return []
    provenance = getattr(make_grid(config.schedule, config.num_steps), "provenance", None) or {}
    learned_with = provenance.get("network_sha256")
    if learned_with in (None, network_sha256):
        return []
    return [f"schedule file {config.schedule!r} was learned with another network ({provenance.get('network')}); "
            f"a learned grid fits the network it was learned with"]


def build_grid(net, config: SamplerConfig, device=None) -> tuple[SigmaGrid, str, dict]:
    """The solver grid for `net` (EDM's clamp to the net's sigma range and round_sigma), plus the solver name and
    options to use. A schedule file brings its own grid end, and (if it names one) its solver and options."""
    from_file = config.schedule not in SCHEDULES
    solver = config.solver or "heun"
    if from_file:
        grid = make_grid(config.schedule, config.num_steps, device=device, **config.schedule_kwargs)
        if config.end is not None and config.end != grid.end:
            raise ValueError(f"schedule file {config.schedule!r} ends at {grid.end!r}, which conflicts with "
                             f"--end={config.end} (leave --end out with a schedule file)")
        if grid.solver is not None:
            if config.solver is not None and config.solver != grid.solver:
                raise ValueError(f"schedule file {config.schedule!r} was learned for solver {grid.solver!r}, not "
                                 f"{config.solver!r}; learned grids are solver-specific")
            solver = grid.solver
        entry = get_solver(solver)
        defaults = learned_solver_options(grid, solver)
        # What the grid was fitted with: the recorded options, and the solver's defaults for those a file leaves out
        # (an option not given when the grid was learned had its default), when the file names its solver.
        fitted = dict(defaults)
        if grid.solver is not None or defaults:
            fitted = {**entry.defaults(), **defaults}
        overridden = sorted(k for k, v in config.solver_kwargs.items() if k in fitted and fitted[k] != v)
        if overridden:
            # A learned grid fits the options it was learned with; say so instead of silently changing them. Attributed
            # to this line (not the caller's), so that Python's default filter shows it once per run although a run
            # builds its grid more than once (describe, prepare); on rank 0 only (every rank builds the same grid).
            dist.warn0(f"schedule file {config.schedule!r} was learned with "
                          f"{', '.join(f'{k}={fitted[k]!r}' for k in overridden)}; overriding with "
                          f"{', '.join(f'{k}={config.solver_kwargs[k]!r}' for k in overridden)} may not fit the "
                          f"learned grid", stacklevel=1)
        return grid, solver, {**defaults, **config.solver_kwargs}
    entry = get_solver(solver)
    grid = make_grid(config.schedule, config.num_steps, config.sigma_min, config.sigma_max,
                     end=config.end or entry.default_end,
                     sigma_range=(float(net.sigma_min), float(net.sigma_max)), round_sigma=net.round_sigma,
                     device=device, **config.schedule_kwargs)
    if entry.distinct_levels:
        levels = grid.sigmas[grid.sigmas > 0].cpu()  # once per run, a few numbers
        repeated = torch.nonzero(levels[1:] >= levels[:-1]).flatten()
        if len(repeated):
            level = float(levels[int(repeated[0])])
            raise ValueError(f"solver {solver!r}: the network's discrete noise levels (its round_sigma) make the "
                             f"{grid.num_steps}-step {grid.schedule} grid repeat sigma = {level:.6g}, and its steps "
                             f"divide by their length in log sigma; use fewer steps, or heun, euler or ipndm (which "
                             f"take a repeated level as a zero step, as EDM)")
    return grid, solver, dict(config.solver_kwargs)


def describe(net, config: SamplerConfig) -> str:
    """One line naming the conventions that change results: solver, options, grid, end, NFE per image. Raises
    ValueError for what the first batch would refuse (rehearse_solver), so that generate.py refuses it before it
    claims an output folder."""
    grid, solver, solver_kwargs = build_grid(net, config)
    rehearse_solver(grid, solver, solver_kwargs, getattr(net, "round_sigma", None), config.denoise_to_zero)
    nfe = count_nfe(solver, grid.num_steps, grid.end, config.denoise_to_zero)
    options = ", ".join(f"{k}={v}" for k, v in sorted(solver_kwargs.items()))
    levels = grid.sigmas.tolist()
    positive = [s for s in levels if s > 0]
    text = (f"solver={solver}({options}) schedule={grid.schedule} steps={grid.num_steps} end={grid.end} "
            f"sigma={positive[0]:.4g}..{positive[-1]:.4g}{' then 0' if grid.end == 'zero' else ''}")
    if config.denoise_to_zero and grid.end == "sigma_min":
        text += " +denoise_to_zero"
    elif config.denoise_to_zero:  # said, not silently dropped: the flag was taken and did nothing
        text += " (denoise_to_zero changes nothing: the last step already lands on 0)"
    if grid.eval_sigmas is not None:
        text += " (decoupled evaluation grid)"
    orders = _revised_orders(grid, solver, solver_kwargs)
    if orders is not None:  # fid.py's results keep this line: one measured with the earlier orders is not kept
        text += f" step orders {','.join(map(str, orders))}"
    return f"{text}; {nfe} NFE per image"


def _revised_orders(grid: SigmaGrid, solver: str, solver_kwargs: dict) -> list[int] | None:
    """A multistep solver's step orders where versions before 2026-12-02 took others (revised_step_orders), else None.
    The solvers with both options (UniPC; DPM-Solver++'s orders are fixed at 2 and 3, which never changed)."""
    options = {**get_solver(solver).defaults(), **solver_kwargs}
    if "order" not in options or "lower_order_final" not in options:
        return None
    return revised_step_orders(grid.sigmas.tolist(), options["order"], options["lower_order_final"])


def rehearse_solver(grid: SigmaGrid, solver: str, solver_kwargs: dict, round_sigma=None,
                    denoise_to_zero: bool = False) -> None:
    """Run the solver once over the real grid on one pixel with a stand-in denoiser (D = 0; no randomness drawn):
    what a solver checks only when it runs (iPNDM's order, UniPC's order, Heun's churn beside a decoupled grid, ...)
    fails here as a ValueError, before any output folder is claimed, instead of in the first batch. Costs a few
    tensor operations per step."""
    def stand_in(x, sigma, class_labels=None):
        return torch.zeros_like(x)

    sample(stand_in, torch.ones(1, 1, 1, 1, dtype=torch.float64), grid.to("cpu"), solver=solver,
           randn_like=torch.zeros_like, round_sigma=round_sigma, denoise_to_zero=denoise_to_zero, **solver_kwargs)


class GridSampling:
    """How EDM's scalar-sigma process is sampled: a solver of samplers.SOLVERS over a sigma grid, from the unit
    latents times the first level. A forward process (processes/) hands generate.py its sampling object; a process
    that samples otherwise brings its own class with the same three methods:

        prepare(net, config, device) -> plan     once per run (the grid, the solver and its options)
        describe(net, config) -> str             one line for logs and result files
        sample(net, plan, inputs, config) -> x   one batch: float64 images from SeedInputs

    and optionally `record(net, config) -> dict` (generation.json) and `draws_noise(net, config) -> bool` (whether
    its steps draw fresh noise: the CLIs then say so for a network trained on paired noise, see
    losses.stochastic_sampling_notes).
    """

    learns_sigma_grids = True  # LD3 (samplers/ld3) applies: it learns the grid this sampling integrates over.
    takes_guidance = True  # samplers.guidance applies: it corrects the denoiser every solver here calls.

    def prepare(self, net, config: SamplerConfig, device=None):
        grid, solver, solver_kwargs = build_grid(net, config, device)
        get_solver(solver).check_options(solver_kwargs, solver)
        guidance = build_guidance(config.guidance)
        if guidance is None:
            return grid, solver, solver_kwargs
        return grid, solver, solver_kwargs, guidance.prepare(net, grid, solver, solver_kwargs, device,
                                                             config.denoise_to_zero)

    def describe(self, net, config: SamplerConfig) -> str:
        text = describe(net, config)
        guidance = build_guidance(config.guidance)
        if guidance is not None:
            grid, solver, solver_kwargs = build_grid(net, config)
            text += "; " + guidance.describe(net, grid, solver, solver_kwargs, config.denoise_to_zero)
        return text

    def draws_noise(self, net, config: SamplerConfig) -> bool:
        """Whether the steps draw fresh noise beyond the starting latents: the solver's (SolverEntry.adds_noise, e.g.
        Heun with S_churn > 0) or the guidance's (DG's boosting)."""
        _grid, solver, solver_kwargs = build_grid(net, config)
        entry = get_solver(solver)
        guidance = build_guidance(config.guidance)
        return entry.adds_noise({**entry.defaults(), **solver_kwargs}) or bool(getattr(guidance, "adds_noise", False))

    def record(self, net, config: SamplerConfig) -> dict:
        """The settings as they resolve (for generation.json): the solver with every option, the grid's levels, so
        that `--solver=heun --steps=18` and no option record the same, and a changed rho does not; the guidance by
        its record (defaults filled, its files by content), so `--dg-weight=2` and the default record the same."""
        grid, solver, solver_kwargs = build_grid(net, config)
        options = get_solver(solver).defaults()
        options.update(solver_kwargs)
        return dict(solver=solver, solver_options=options, sigmas=grid.sigmas.tolist(), end=grid.end,
                    eval_sigmas=None if grid.eval_sigmas is None else grid.eval_sigmas.tolist(),
                    # A grid ending at 0 already denoises in its last step: the flag changes nothing there.
                    denoise_to_zero=bool(config.denoise_to_zero) and grid.end == "sigma_min",
                    guidance=guidance_record(config.guidance),
                    # Only where an earlier version took other orders, whose records lack them (null otherwise, as
                    # absent): its folder is refused, not resumed with images of both.
                    step_orders=_revised_orders(grid, solver, solver_kwargs))

    def sample(self, net, plan, inputs: "SeedInputs", config: SamplerConfig) -> torch.Tensor:
        grid, solver, solver_kwargs, *guidance = plan  # a 4th entry: the prepared guidance
        if guidance:
            return guidance[0].sample(net, grid, solver, solver_kwargs, inputs, config.denoise_to_zero)
        return sample(net, inputs.latents, grid, solver=solver, class_labels=inputs.class_labels,
                      randn_like=inputs.randn_like, round_sigma=net.round_sigma,
                      denoise_to_zero=config.denoise_to_zero, **solver_kwargs)


GRID_SAMPLING = GridSampling()


def _class_labels(net, rnd: StackedRandomGenerator, batch_size: int, class_idx, device):
    """EDM: one-hot of a randint(label_dim) drawn from the per-seed generators after the latents; --class overrides
    (the draw still happens, so later draws such as churn noise stay aligned with EDM's)."""
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    if class_idx is not None and label_dim == 0:
        raise ValueError(f"a class ({class_idx}) was requested but the network is unconditional (label_dim = 0)")
    if class_idx is not None and not 0 <= class_idx < label_dim:
        raise ValueError(f"class {class_idx} is out of range for a network with label_dim = {label_dim}")
    if label_dim == 0:
        return None
    labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[batch_size])]
    if class_idx is not None:
        labels[:, :] = 0
        labels[:, class_idx] = 1
    return labels


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """EDM's conversion: (x * 127.5 + 128).clip(0, 255) truncated to uint8 (round-half-up of 127.5 (x + 1))."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


@dataclasses.dataclass
class SeedInputs:
    """What a batch draws from its per-seed generators, in EDM's order: the unit-variance latents, then the class
    labels; randn_like continues the same streams (a stochastic solver's churn noise)."""

    latents: torch.Tensor
    class_labels: torch.Tensor | None
    randn_like: Callable


def seed_inputs(net, seeds, class_idx=None, device=None) -> SeedInputs:
    device = torch.device(device) if device is not None else dist.device()
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    class_labels = _class_labels(net, rnd, len(seeds), class_idx, device)
    return SeedInputs(latents=latents, class_labels=class_labels, randn_like=rnd.randn_like)


@torch.no_grad()
def sample_seeds(net, seeds, config: SamplerConfig, *, grid_info=None, class_idx=None, device=None,
                 inputs: SeedInputs | None = None, sampling=None) -> torch.Tensor:
    """Sample one batch: float64 images (NCHW) for `seeds`, each from its own generator. inputs: the batch's
    seed_inputs when the caller keeps them too (LD3's teacher data); drawn here otherwise. sampling: the
    process's sampling object (default: EDM's GridSampling); grid_info: its prepared plan, when the caller has it."""
    sampling = sampling if sampling is not None else GRID_SAMPLING
    device = torch.device(device) if device is not None else dist.device()
    plan = grid_info if grid_info is not None else sampling.prepare(net, config, device)
    inputs = inputs if inputs is not None else seed_inputs(net, seeds, class_idx, device)
    return sampling.sample(accelerate(net, config.precision, config.compile, config.cuda_graph), plan, inputs, config)


def generate_images(net, seeds, *, batch_size: int = 64, solver: str | None = None, schedule: str = "edm",
                    num_steps: int | None = None, sigma_min: float | None = None, sigma_max: float | None = None,
                    end: str | None = None, denoise_to_zero: bool = False, class_idx: int | None = None,
                    solver_kwargs: dict | None = None, schedule_kwargs: dict | None = None, device=None,
                    rank: int | None = None, world_size: int | None = None, skip_seeds=None, progress: bool = False,
                    precision: str = "fp32", compile: bool = False, cuda_graph: bool = False,
                    sampling=None, guidance: dict | None = None, check_finite: str = "late"):
    """Yield (batch_seeds, images) for this rank's share of `seeds`: images are uint8 NCHW on `device`.

    batch_size is the maximum per rank (EDM's --batch). The seeds are split over ranks exactly as EDM's
    generate.py (see rank_batches); with torchrun every rank calls this with the same arguments. skip_seeds: seeds
    left out before sampling (a resumed run); batches are otherwise unchanged, so the images are unchanged too.
    solver None means 'heun', or the solver a schedule file was learned for. The defaults reproduce EDM's
    generate.py: Heun, rho = 7, 18 steps, sigma 0.002 ... 80 clamped to the net's range, round_sigma, appended 0.
    Performs no collective operations (ranks may skip different amounts of work). sampling: how the snapshot's
    process is sampled (`snapshot.process.sampling`); None is EDM's GridSampling. guidance: {name: options} of
    samplers.guidance.GUIDANCE (discriminator guidance), for a sampling that takes it. check_finite: a batch with
    NaN or inf raises NonFiniteSamples naming its seeds, before it is yielded ('batch': one device read per batch) or
    when the next batch is queued ('late', no stall; the bad batch has then been yielded).
    """
    if check_finite not in ("batch", "late"):
        raise ValueError(f"check_finite must be 'batch' or 'late', got {check_finite!r}")
    config = SamplerConfig(precision=precision, compile=compile, cuda_graph=cuda_graph, solver=solver,
                           schedule=schedule, num_steps=num_steps, sigma_min=sigma_min,
                           sigma_max=sigma_max, end=end, denoise_to_zero=denoise_to_zero,
                           solver_kwargs=dict(solver_kwargs or {}), schedule_kwargs=dict(schedule_kwargs or {}),
                           guidance=dict(guidance or {}))
    device = torch.device(device) if device is not None else dist.device()
    sampling = sampling if sampling is not None else GRID_SAMPLING
    if config.guidance and not getattr(sampling, "takes_guidance", False):
        raise ValueError(f"{type(sampling).__name__} (this snapshot's process) does not take guidance "
                         f"({', '.join(config.guidance)})")
    net = accelerate(net, precision, compile, cuda_graph)  # once: its compiled code and graphs serve every batch
    plan = sampling.prepare(net, config, device)
    skip = set(int(s) for s in skip_seeds) if skip_seeds is not None else set()
    batches = rank_batches(seeds, batch_size, rank, world_size)
    pending = None  # the previous batch's seeds and finiteness, for check_finite='late'
    show = progress and (dist.get_rank() if rank is None else rank) == 0
    if show:
        import tqdm
        batches = tqdm.tqdm(batches, unit="batch")
    for batch_seeds in batches:
        batch_seeds = [s for s in batch_seeds if s not in skip]
        if not batch_seeds:
            continue
        images = sample_seeds(net, batch_seeds, config, grid_info=plan, class_idx=class_idx, device=device,
                              sampling=sampling)
        # NaN or inf would become black pixels, saved and measured without a word. Checked on the host, either now
        # (the caller reads the batch back anyway: PNGs) or one batch late, when the next batch is queued behind the
        # check, so that the read does not stall the device.
        finite = torch.isfinite(images).flatten(1).all(dim=1)
        if check_finite == "batch":
            _raise_if_nonfinite(batch_seeds, finite)
        else:
            if pending is not None:
                _raise_if_nonfinite(*pending)
            pending = (batch_seeds, finite)
        yield batch_seeds, to_uint8(images)
    if pending is not None:
        _raise_if_nonfinite(*pending)


def _raise_if_nonfinite(seeds, finite: torch.Tensor) -> None:
    finite = finite.tolist()
    if not all(finite):
        bad = [seed for seed, ok in zip(seeds, finite) if not ok]
        raise NonFiniteSamples(f"the sampler produced NaN or inf for seed(s) {format_seeds(bad)}: these settings (or "
                               f"the network) diverge; use other sampler settings")


# ---------------------------------------------------------------------------------------------------------------
# PNG output.


def image_path(outdir: str, seed: int, subdirs: bool = False) -> str:
    image_dir = os.path.join(outdir, f"{seed - seed % 1000:06d}") if subdirs else outdir
    return os.path.join(image_dir, f"{seed:06d}.png")


# PNG modes by channel count. train.py trains on what the dataset's PNGs hold, grey + alpha and RGBA too (EDM's
# generate.py then fails at the first image it writes, after the sampling).
_PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def image_to_pil(image_hwc: np.ndarray) -> PIL.Image.Image:
    channels = image_hwc.shape[2]
    if channels not in _PIL_MODES:
        raise ValueError(f"cannot write an image of {channels} channels as a PNG (1 to 4: grey, grey + alpha, RGB, "
                         f"RGBA)")
    return PIL.Image.fromarray(image_hwc[:, :, 0] if channels == 1 else image_hwc, _PIL_MODES[channels])


def save_png_atomic(image: PIL.Image.Image, path: str) -> None:
    """Encode in memory, write to a temporary name in the same folder, then rename: a killed run never leaves a
    truncated {seed}.png. No fsync: a lost image is regenerated by the next run, and 50k fsyncs cost minutes.
    The temporary name '.{name}.tmp-<host>-<pid>-<random>' lets the next run remove it if this process is killed."""
    from dnnlib import util

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    tmp = util.temp_path(path, hidden=True)
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    except OSError as err:
        raise util.write_error(path, err) from err
    finally:
        try:
            os.remove(tmp)
        except OSError:
            pass  # renamed into place, or never created


OUTPUT_RECORD = "generation.json"  # beside the PNGs: what made them (see claim_output_folder)


class OutputFolderMismatch(ValueError):
    """An output folder holds images made by another network or with other sampler settings."""


def output_record(network: str, process_record, sampling, net, config: SamplerConfig, summary: str, class_idx,
                  subdirs: bool) -> dict:
    """What makes a folder's images (generation.json): the network file's hash, its process, the sampler settings
    as they resolve (the sampling object's `record(net, config)` where it has one, else the options less the exact
    speed option cuda_graph), bf16 and compile (both can move a pixel), and the content hash of every file an option
    names (a schedule file, a discriminator), so that a file rewritten in place is not taken for the old one. The
    network's path, the summary line and the options as given are kept for reading, not compared (_RECORD_TEXT)."""
    from dnnlib import util

    options = dataclasses.asdict(config)
    if options.get("schedule") not in SCHEDULES and os.path.isfile(str(options.get("schedule"))):
        options["schedule"] = os.path.abspath(options["schedule"])  # for the reader, as the network's path
    if hasattr(sampling, "record"):
        settings = sampling.record(net, config)
    else:
        settings = {k: v for k, v in options.items() if k not in SPEED_FIELDS}
    named = sorted({v for v in _strings(options) if os.path.isfile(v)})
    return dict(network=network if "://" in network else os.path.abspath(network),
                network_sha256=util.file_sha256(network), process=process_record, sampler=summary, options=options,
                settings=settings, precision=config.precision, compile=bool(config.compile),
                files_sha256=sorted(util.file_sha256(path) for path in named), class_idx=class_idx, subdirs=subdirs)


# generation.json entries for people and tools (the network's path, e.g. for report.py; the one-line summary; the
# options as given): not compared, the network's content hash is.
_RECORD_TEXT = ("network", "sampler", "options")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _differences(old, new, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two JSON records."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [name for key in sorted(set(old) | set(new), key=str)
                for name in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _lacks(record, name: str) -> bool:
    """Whether a JSON record lacks the entry of dotted `name` altogether (or one of the dicts on its way), as an
    earlier version's record lacks what it did not write (settings.step_orders, not only precision)."""
    for key in name.split("."):
        if not isinstance(record, dict) or key not in record:
            return True
        record = record[key]
    return False


def clear_output_folder(outdir: str) -> None:
    """--overwrite: the record first (a kill from here on leaves PNGs without a record, which the next run refuses),
    then every seed PNG ({seed}.png, also in the 1000-seed subfolders): no image of other settings stays behind to
    be skipped or measured. Other files are left alone."""
    try:
        os.remove(os.path.join(outdir, OUTPUT_RECORD))
    except FileNotFoundError:
        pass
    if not os.path.isdir(outdir):
        return
    folders = [outdir] + [e.path for e in os.scandir(outdir) if e.is_dir() and re.fullmatch(r"\d{6,}", e.name)]
    for folder in folders:
        for entry in os.scandir(folder):
            if entry.is_file() and re.fullmatch(r"\d+\.png", entry.name):
                os.remove(entry.path)
        if folder != outdir and not os.listdir(folder):
            os.rmdir(folder)


def claim_output_folder(outdir: str, record: dict, overwrite: bool = False) -> None:
    """Make sure every PNG in `outdir` will come from `record` (network hash, process, sampler, options, class).

    A folder whose record differs, or that holds PNGs but no record (made by an older version), is refused unless
    `overwrite`, in which case its seed PNGs are removed and the new record replaces the old (clear_output_folder;
    write_images(overwrite=True) then regenerates every seed of the run). A re-run with the same record is a resume.
    Call on one rank; the record is written atomically before any PNG.
    """
    from dnnlib import util

    path = os.path.join(outdir, OUTPUT_RECORD)
    record = util.json_safe(json.loads(json.dumps(record, sort_keys=True, default=str)))
    if not os.path.isfile(path) and os.path.isfile(os.path.join(outdir, "dataset.json")):
        # dataset_tool.py's folder (its images in 00000/, which the PNG test below does not see): the samples joined
        # the dataset, and --overwrite is no remedy.
        raise OutputFolderMismatch(f"{outdir} holds a dataset (dataset.json), which the images would join; use "
                                   f"another --outdir")
    dataset = enclosing_dataset(outdir)
    if dataset is not None:
        # A folder dataset is read with all its subfolders (ImageFolderDataset walks them): samples written anywhere
        # below it would be trained on, and counted by fid.py ref/calc over it, as real images.
        raise OutputFolderMismatch(f"{outdir} is inside the dataset {dataset} (its dataset.json), which the images "
                                   f"would join; use an --outdir outside it")
    problem = None
    if os.path.isfile(path):
        try:
            with open(path) as f:
                existing = util.json_safe(json.load(f))
        except (OSError, ValueError) as err:
            problem = f"{path}: unreadable record of the images in {outdir} ({err})"
        else:
            # One step (OneStepSampling's settings): its one call passes force_fp32, which runs eager, so --compile
            # moves no pixel there; a folder made with it refused the same images without it, and the reverse.
            one_step = all("one_step_sigma" in (r.get("settings") or {}) for r in (existing, record))
            changed = [name for name in _differences(existing, record) if name.split(".")[0] not in _RECORD_TEXT
                       and not (one_step and name == "compile")]
            if changed:
                shown = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
                problem = f"{outdir} holds images made with other settings (these differ: {shown}; see {path})"
                # Entries a record lacks altogether: written by an earlier version, which did not record them (its
                # images may be the same; nothing tells, so they are not mixed with these).
                absent = [name for name in changed if _lacks(existing, name)]
                if absent:
                    problem += (f"; that record, written by an earlier version, has no {', '.join(absent[:6])}"
                                f"{', ...' if len(absent) > 6 else ''}")
    elif os.path.isdir(outdir) and _holds_pngs(outdir):
        problem = f"{outdir} already holds PNGs without a record of what made them ({OUTPUT_RECORD})"
    if problem is not None and not overwrite:
        raise OutputFolderMismatch(f"{problem}; use another --outdir, or --overwrite to replace them")
    if problem is not None:
        clear_output_folder(outdir)
    os.makedirs(outdir, exist_ok=True)
    with util.atomic_output(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True, allow_nan=False)


def enclosing_dataset(path: str) -> str | None:
    """The nearest folder above `path` (not `path` itself) that holds a dataset.json, or None: a folder dataset,
    which ImageFolderDataset reads with every subfolder, so that any PNG below it is one of its images."""
    folder = os.path.realpath(path)
    while True:
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
        if os.path.isfile(os.path.join(folder, "dataset.json")):
            return folder


def _holds_pngs(outdir: str) -> bool:
    with os.scandir(outdir) as entries:  # closed at the first hit, not when garbage-collected
        return any(entry.name.endswith(".png") or (entry.is_dir() and re.fullmatch(r"\d{6,}", entry.name))
                   for entry in entries)


def write_images(net, seeds, outdir: str, *, subdirs: bool = False, batch_size: int = 64, progress: bool = True,
                 rank: int | None = None, world_size: int | None = None, overwrite: bool = False,
                 **sampling_kwargs) -> dict:
    """Generate the PNGs for `seeds` into `outdir` (this rank's share), skipping seeds whose PNG already exists.

    An existing PNG counts only when complete (header and IEND chunk, training.dataset.png_file_is_complete: about
    15 us per file): an empty or truncated one is generated again. Temporary files that killed earlier runs left
    in the output folders are removed first (only those of processes that no longer run, never another rank's).
    overwrite: generate every seed, whatever exists. sampling_kwargs go to generate_images (solver, schedule,
    num_steps, class_idx, device, sampling, ...). Returns counts {'written': n, 'skipped': m} for this rank.
    """
    from dnnlib import util
    from training.dataset import png_file_is_complete

    seeds = parse_int_list(seeds)
    mine = {s for batch in rank_batches(seeds, batch_size, rank, world_size) for s in batch}
    for directory in sorted({os.path.dirname(image_path(outdir, s, subdirs)) for s in mine}):
        util.remove_stale_temp_files(directory)
    existing = set() if overwrite else {s for s in mine if png_file_is_complete(image_path(outdir, s, subdirs))}
    for directory in sorted({os.path.dirname(image_path(outdir, s, subdirs)) for s in mine - existing}):
        os.makedirs(directory, exist_ok=True)

    def write(seed, image_np):
        save_png_atomic(image_to_pil(image_np), image_path(outdir, seed, subdirs))

    # PNG encoding (zlib releases the GIL) runs on writer threads while the next batch samples: on a GPU the main
    # thread queues batch k + 1 right after copying batch k to the host, instead of encoding 64 images first (0.4 ms
    # each at 32 px, 10-15 ms at 256 px). At most two batches wait to be written; a writer's error stops the run; an
    # interrupted run still writes the batches it finished (leaving the with-block waits for them).
    written, pending = 0, collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max_workers=PNG_WRITER_THREADS) as writers:
        # check_finite='batch': a batch with NaN is refused before its PNGs exist (the copy to the host waits anyway).
        for batch_seeds, images in generate_images(net, seeds, batch_size=batch_size, skip_seeds=existing,
                                                   progress=progress, rank=rank, world_size=world_size,
                                                   check_finite="batch", **sampling_kwargs):
            images_np = images.permute(0, 2, 3, 1).cpu().numpy()
            pending.extend(writers.submit(write, seed, image) for seed, image in zip(batch_seeds, images_np))
            while len(pending) > 2 * batch_size:
                pending.popleft().result()
                written += 1
        while pending:
            pending.popleft().result()
            written += 1
    return {"written": written, "skipped": len(mine & existing)}


PNG_WRITER_THREADS = 4


def tile_images(images, columns: int | None = None, gap: int = 2, scale: int = 1) -> np.ndarray:
    """HWC uint8 images (same shape) tiled row-major into one image: `scale`x nearest-neighbour enlargement and a
    `gap`-pixel white border between tiles, so that small images (16x16 digits) stay readable."""
    images = [im[:, :, None] if im.ndim == 2 else im for im in images]
    height, width, channels = images[0].shape
    height, width = height * scale, width * scale
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    canvas = np.full((rows * height + (rows + 1) * gap, columns * width + (columns + 1) * gap, channels), 255,
                     dtype=np.uint8)
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        top, left = gap + row * (height + gap), gap + col * (width + gap)
        canvas[top:top + height, left:left + width] = image.repeat(scale, axis=0).repeat(scale, axis=1)
    return canvas


def grid_scale(resolution: int, target: int = 64) -> int:
    """The integer enlargement that shows a tile at about `target` pixels (1 for 64x64 and larger images)."""
    return max(1, target // max(int(resolution), 1))


def save_image_grid(outdir: str, seeds, grid_path: str, *, subdirs: bool = False, columns: int | None = None,
                    real_images=None, gap: int = 2, scale: int | None = None) -> tuple:
    """Tile the PNGs of `seeds` (row-major, in seed order) into one PNG; returns (rows, columns).

    Tiles are enlarged to about 64 pixels (`scale`, by default from the image size) with a `gap` between them.
    real_images: HWC uint8 images of the training data, tiled the same way to the right of the samples (a wider
    white gap between the two), for a side-by-side look.
    """
    seeds = parse_int_list(seeds)
    if not seeds:
        raise ValueError("save_image_grid: no seeds")
    paths = [image_path(outdir, s, subdirs) for s in seeds]
    images = [np.asarray(PIL.Image.open(path)) for path in paths]
    for path, image in zip(paths, images):
        if image.shape != images[0].shape:  # a PNG left in the folder by another run (kept, as complete)
            raise ValueError(f"{path} has shape {image.shape} (H, W[, C]), but {paths[0]} has {images[0].shape}: "
                             f"the folder mixes images of different sizes")
    scale = scale or grid_scale(images[0].shape[0])
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    canvas = tile_images(images, columns, gap, scale)
    if real_images is not None and len(real_images) > 0:
        real = tile_images(list(real_images)[:len(images)], columns, gap, scale)
        separator = np.full((canvas.shape[0], 4 * max(gap, 1), canvas.shape[2]), 255, dtype=np.uint8)
        real = np.pad(real, ((0, canvas.shape[0] - real.shape[0]), (0, 0), (0, 0)), constant_values=255)
        if real.shape[2] != canvas.shape[2]:
            real = real.repeat(canvas.shape[2], axis=2) if real.shape[2] == 1 else real[:, :, :canvas.shape[2]]
        canvas = np.concatenate([canvas, separator, real], axis=1)
    directory = os.path.dirname(os.path.abspath(grid_path))
    os.makedirs(directory, exist_ok=True)
    save_png_atomic(image_to_pil(canvas), grid_path)
    return rows, columns
