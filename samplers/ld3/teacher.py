"""LD3's teacher data: noises drawn per seed exactly as generate.py draws them, the teacher solver's samples from them
and the class labels, saved as a torch file that loads with weights_only=True."""

import dataclasses
import math

import torch

from dnnlib import util
from samplers import SigmaGrid, count_nfe, sample
from samplers.generation import SamplerConfig, build_grid, sample_seeds, seed_inputs
from torch_utils import persistence

TEACHER_FILE_FORMAT = "ld3-teacher-data"
TEACHER_FILE_VERSION = 1


@dataclasses.dataclass
class TeacherData:
    """Noises (unit variance, as drawn per seed), the teacher's samples from them, class labels, and the teacher's
    description (`info`: solver, options, grid `sigmas`, NFE, network, ...)."""

    latents: torch.Tensor
    images: torch.Tensor
    class_labels: torch.Tensor | None = None
    seeds: torch.Tensor | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.latents.shape != self.images.shape:
            raise ValueError(f"teacher latents {tuple(self.latents.shape)} and images {tuple(self.images.shape)} "
                             f"differ in shape")
        if self.class_labels is not None and len(self.class_labels) != len(self.latents):
            raise ValueError(f"{len(self.class_labels)} class labels for {len(self.latents)} samples")
        if "sigmas" not in self.info:
            raise ValueError("teacher info must hold the teacher's grid 'sigmas'")

    def __len__(self):
        return len(self.latents)

    @property
    def sigma_max(self) -> float:
        return float(self.info["sigmas"][0])

    @property
    def sigma_min(self) -> float:
        return float(min(s for s in self.info["sigmas"] if s > 0))


@torch.no_grad()
def teacher_samples(denoiser, latents: torch.Tensor, grid: SigmaGrid, *, solver: str, solver_kwargs=None,
                    class_labels=None, batch_size: int = 256, denoise_to_zero: bool = False) -> torch.Tensor:
    """Run the teacher on `latents` in batches (samplers.sample); float64 out."""
    outputs = []
    for start in range(0, len(latents), batch_size):
        labels = None if class_labels is None else class_labels[start:start + batch_size]
        outputs.append(sample(denoiser, latents[start:start + batch_size], grid, solver=solver, class_labels=labels,
                              round_sigma=getattr(denoiser, "round_sigma", None), denoise_to_zero=denoise_to_zero,
                              **(solver_kwargs or {})))
    return torch.cat(outputs)


TEACHER_STEPS = 20  # LD3's CIFAR-10 teacher: UniPC, 20 NFE


@torch.no_grad()
def generate_teacher(net, seeds, *, solver: str = "unipc", num_steps: int = TEACHER_STEPS, schedule: str = "edm",
                     solver_kwargs: dict | None = None, schedule_kwargs: dict | None = None, end: str | None = None,
                     sigma_min: float | None = None, sigma_max: float | None = None, denoise_to_zero: bool = False,
                     class_idx: int | None = None, batch_size: int = 64, device=None, network: str = "",
                     network_sha256: str | None = None, progress: bool = False) -> TeacherData:
    """Teacher data for `seeds`, sampled by generate.py's own per-batch path (samplers.generation.sample_seeds), so a
    teacher sample is generate.py's image for that seed with the same sampler settings, before the uint8 conversion.
    Defaults: LD3's CIFAR-10 teacher, UniPC order 3 bh1, 20 NFE on EDM's rho = 7 grid, ending at sigma_min.
    network / network_sha256: recorded in `info` (provenance; `teacher_differences` compares them)."""
    device = torch.device(device or "cpu")
    config, grid_info, info = teacher_plan(net, solver=solver, num_steps=num_steps, schedule=schedule,
                                           solver_kwargs=solver_kwargs, schedule_kwargs=schedule_kwargs, end=end,
                                           sigma_min=sigma_min, sigma_max=sigma_max,
                                           denoise_to_zero=denoise_to_zero, class_idx=class_idx, device=device,
                                           network=network, network_sha256=network_sha256)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("generate_teacher: no seeds")
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    if progress:
        import tqdm
        batches = tqdm.tqdm(batches, unit="batch", desc="teacher")
    latents, images, labels = [], [], []
    for batch_seeds in batches:
        inputs = seed_inputs(net, batch_seeds, class_idx, device)
        images.append(sample_seeds(net, batch_seeds, config, grid_info=grid_info, device=device, inputs=inputs).cpu())
        latents.append(inputs.latents.cpu())
        labels.append(None if inputs.class_labels is None else inputs.class_labels.cpu())
    return TeacherData(latents=torch.cat(latents), images=torch.cat(images).to(torch.float32),
                       class_labels=None if labels[0] is None else torch.cat(labels),
                       seeds=torch.tensor(seeds, dtype=torch.int64), info=info)


def teacher_plan(net, *, solver: str = "unipc", num_steps: int = 20, schedule: str = "edm",
                 solver_kwargs: dict | None = None, schedule_kwargs: dict | None = None, end: str | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None, denoise_to_zero: bool = False,
                 class_idx: int | None = None, device=None, network: str = "", network_sha256: str | None = None):
    """What `generate_teacher` with these arguments will sample, before sampling: (SamplerConfig, build_grid's
    (grid, solver, solver_kwargs), the `info` its TeacherData will hold)."""
    config = SamplerConfig(solver=solver, schedule=schedule, num_steps=num_steps, sigma_min=sigma_min,
                           sigma_max=sigma_max, end=end, denoise_to_zero=denoise_to_zero,
                           solver_kwargs=dict(solver_kwargs or {}), schedule_kwargs=dict(schedule_kwargs or {}))
    grid_info = build_grid(net, config, torch.device(device or "cpu"))
    return config, grid_info, teacher_info(grid_info, config, class_idx=class_idx, network=network,
                                           network_sha256=network_sha256)


def teacher_info(grid_info, config: SamplerConfig, *, class_idx=None, network: str = "",
                 network_sha256: str | None = None) -> dict:
    """The teacher's description stored with its samples: solver, options, grid, NFE, network (path and sha256),
    class. grid_info: samplers.generation.build_grid's (grid, solver, solver_kwargs) for `config`."""
    grid, solver, solver_kwargs = grid_info
    return dict(solver=solver, solver_kwargs=dict(solver_kwargs), schedule=str(config.schedule),
                schedule_kwargs=dict(config.schedule_kwargs or {}), num_steps=grid.num_steps, end=grid.end,
                denoise_to_zero=bool(config.denoise_to_zero),
                nfe=count_nfe(solver, grid.num_steps, grid.end, config.denoise_to_zero),
                sigmas=[float(s) for s in grid.sigmas.tolist()], network=str(network), network_sha256=network_sha256,
                class_idx=class_idx)


# What makes two teacher files the same data: info keys (by the name a user knows them), then the seeds. The network's
# path may differ (a copy, another folder); its sha256 may not. The grid (sigmas) covers schedule, steps and range.
PROVENANCE_KEYS = {"network_sha256": "network", "solver": "solver", "solver_kwargs": "solver options",
                   "sigmas": "grid (schedule, steps, sigma range)", "end": "grid end",
                   "denoise_to_zero": "denoise-to-zero", "class_idx": "class"}


def teacher_differences(existing: TeacherData, info: dict, seeds) -> list[str]:
    """What differs between `existing` teacher data and the data `info` and `seeds` describe (names as a user knows
    them; empty: the same data). A setting the existing file does not record (an older file) counts as different."""
    def same(key):
        ours, theirs = existing.info[key], info.get(key)
        if key == "sigmas" and isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
            # the grid computed on another device may differ in the last bits
            return all(math.isclose(a, b, rel_tol=1e-12, abs_tol=0) for a, b in zip(ours, theirs))
        return ours == theirs

    differs = [label if key in existing.info else f"{label} (not recorded)" for key, label in PROVENANCE_KEYS.items()
               if key not in existing.info or not same(key)]
    if existing.seeds is None or existing.seeds.tolist() != [int(s) for s in seeds]:
        differs.append("seeds" if existing.seeds is not None else "seeds (not recorded)")
    return differs


def save_teacher_data(path: str, data: TeacherData) -> None:
    """torch.save of plain tensors, numbers and strings (loads with weights_only=True), written atomically."""
    doc = dict(format=TEACHER_FILE_FORMAT, version=TEACHER_FILE_VERSION, latents=data.latents.cpu(),
               images=data.images.cpu(), class_labels=None if data.class_labels is None else data.class_labels.cpu(),
               seeds=None if data.seeds is None else data.seeds.cpu(), info=dict(data.info))
    with util.atomic_output(path, "wb") as f:
        torch.save(doc, f)


def load_teacher_data(path: str) -> TeacherData:
    try:
        doc = persistence.safe_torch_load(path)  # not torch.load alone: TorchScript before torch 2.6
    except FileNotFoundError:
        raise FileNotFoundError(f"teacher data file not found: {path}") from None
    except Exception as err:
        raise ValueError(f"{path}: not a readable teacher data file ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != TEACHER_FILE_FORMAT:
        raise ValueError(f"{path}: not LD3 teacher data (expected a dict with format={TEACHER_FILE_FORMAT!r}; "
                         f"write it with `python ld3.py gen-data`)")
    if doc.get("version") != TEACHER_FILE_VERSION:
        raise ValueError(f"{path}: unsupported teacher data version {doc.get('version')!r}, "
                         f"expected {TEACHER_FILE_VERSION}")
    try:
        return TeacherData(latents=doc["latents"], images=doc["images"], class_labels=doc.get("class_labels"),
                           seeds=doc.get("seeds"), info=dict(doc["info"]))
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: malformed teacher data: {err}") from None
