"""Train the discriminator of discriminator guidance (DG), import the reference's released one, or measure one.

A thin CLI over training/dg.py (training) and samplers/dg/ (the discriminator and its files). Sampling with it is
generate.py's (and fid.py calc --network's) --dg option.
"""

import json
import os

import click
import torch

from dnnlib import util
from samplers.dg.discriminator import (
    DiscriminatorError,
    import_reference_discriminator,
    load_adm_classifier,
    load_discriminator,
    save_discriminator,
)
from torch_utils import distributed
from training import dg
from training import snapshots as _snapshots  # noqa: F401  (registers the network classes a DG pickle may hold)


def _run(func, *args, **kwargs):
    """The library's input errors as one CLI error line."""
    try:
        return func(*args, **kwargs)
    except (DiscriminatorError, ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None


def _device(device):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@click.group()
def main():
    """Discriminator guidance (Kim et al., ICML 2023): train the discriminator on real images and the score model's
    samples, then sample with `generate.py --dg=PKL --dg-weight=W`.

    Examples:

    \b
    # 1. The score model's samples (the fake set)
    python generate.py --network=net.pkl --outdir=fakes --seeds=0-49999 --subdirs
    \b
    # ... of a class-conditional network: one folder per class K (its generation.json records the class)
    python generate.py --network=net.pkl --class=0 --outdir=fakes/0 --seeds=0-4999
    python generate.py --network=net.pkl --class=1 --outdir=fakes/1 --seeds=5000-9999   # ... up to the last class
    \b
    # 2. The discriminator on the network's own features (no download), or on the reference's ADM classifier
    python train_dg.py train --real=datasets/cifar10-32x32.zip --fake=fakes --network=net.pkl --outdir=dg-run
    python train_dg.py train --real=... --fake=... --encoder=adm --adm-classifier=32x32_classifier.pt --outdir=...
    \b
    # ... at 64x64 on guided-diffusion's 64x64 classifier (fed cosine-schedule time, as the reference)
    python train_dg.py train --real=... --fake=... --encoder=adm --adm-classifier=64x64_classifier.pt --outdir=...
    \b
    # ... with AOT-paired perturbation noise (pools of 512 rows), as the AOT paper trains it
    python train_dg.py train --real=... --fake=... --network=net.pkl --aot=512 --outdir=dg-aot
    \b
    # 3. Guided sampling with any registered solver (Heun as the reference)
    python generate.py --network=net.pkl --outdir=out --seeds=0-49999 --dg=dg-run/discriminator-000050.pkl \\
        --dg-weight=2
    \b
    # The reference's released discriminator (EDM-G++), imported once
    python train_dg.py import --adm-classifier=32x32_classifier.pt --discriminator=discriminator_60.pt --out=dg.pkl

    One process (the reference trains on one GPU): under torchrun with several processes it stops.
    """
    _run(distributed.check_single_process, "train_dg.py")


@main.command()
@click.option("--real", help="Real images (dataset zip or folder)", metavar="ZIP|DIR", required=True)
@click.option("--fake", help="The score model's samples (zip or folder, e.g. generate.py's --outdir)",
              metavar="ZIP|DIR", required=True)
@click.option("--outdir", help="Where the discriminator pickles, stats and training state go", metavar="DIR",
              required=True)
@click.option("--encoder", help="Features: the score network's own middle blocks, or the ADM classifier",
              type=click.Choice(["network", "adm"]), default="network", show_default=True)
@click.option("--network", help="The score network snapshot (--encoder=network)", metavar="PKL|URL")
@click.option("--adm-classifier", "adm_classifier", help="guided-diffusion's 32x32_classifier.pt, or at 64 px its "
              "64x64_classifier.pt (--encoder=adm; the size follows the file)", metavar="PT|URL")
@click.option("--cond", help="Class-conditional discriminator (labels: the real set's dataset.json; generated "
              "images: one generate.py --class=K folder per class)", is_flag=True)
@click.option("--epochs", help="Epochs", metavar="INT", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--batch", help="Batch size", metavar="INT", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", help="Adam learning rate", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True),
              default=3e-4,
              show_default=True)
@click.option("--weight-decay", "weight_decay", help="Adam weight decay", metavar="FLOAT",
              type=click.FloatRange(min=0), default=1e-7,
              show_default=True)
@click.option("--num", "max_images", help="Use the first NUM images of each set  [default: all]",
              metavar="INT", type=click.IntRange(min=1), default=None)
@click.option("--aot", help="Pair the perturbation noise with the images in pools of N rows, as the AOT loss (0: off)",
              metavar="N", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--width", help="Head width (a multiple of 32 and of --head-channels)", metavar="INT",
              type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--depth", help="Head residual blocks", metavar="INT", type=click.IntRange(min=1), default=2,
              show_default=True)
@click.option("--head-channels", "head_channels", help="Channels per attention head of the head",
              metavar="INT", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", help="Random seed", metavar="INT", type=int, default=0, show_default=True)
@click.option("--resume", help="Continue a run: its training-state.pt or folder, or 'auto' (--outdir's, if any)",
              metavar="PT|DIR|auto", default=None)
@click.option("--overwrite", help="Start afresh in an --outdir that holds an earlier run: first remove its training "
              "state, stats and discriminator pickles (other files stay)", is_flag=True)
@click.option("--device", help="Torch device  [default: cuda if available, else cpu]", metavar="DEVICE", default=None)
def train(outdir, resume, overwrite, device, **options):
    """Train a DG discriminator; writes discriminator-EEEEEE.pkl after every epoch (sample with one via --dg)."""
    opts = _run(dg.DGTrainingOptions, **options)
    _run(dg.train_discriminator, opts, outdir, resume=resume, overwrite=overwrite, device=_device(device))
    click.echo(f'Done: the discriminators are in "{outdir}".')


@main.command("import")
@click.option("--adm-classifier", "adm_classifier", help="guided-diffusion's 32x32_classifier.pt from DG (or its "
              "64x64_classifier.pt: the size follows the file)", metavar="PT|URL", required=True)
@click.option("--discriminator", help="DG's released head (discriminator_60.pt uncond, discriminator_250.pt cond)",
              metavar="PT|URL", required=True)
@click.option("--cond", help="The conditional head (--discriminator is discriminator_250.pt)", is_flag=True)
@click.option("--label-dim", "label_dim", help="Classes of the score model it guides (--cond)",
              metavar="INT", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--out", help="DG pickle to write", metavar="PKL", required=True)
def import_reference(adm_classifier, discriminator, cond, label_dim, out):
    """Turn the reference's released discriminator (alsdudrla10/DG) into a DG pickle for --dg."""
    given = click.get_current_context().get_parameter_source("label_dim") == click.core.ParameterSource.COMMANDLINE
    if given and not cond:
        raise click.UsageError("--label-dim applies to the conditional head (--cond) only")
    out = os.path.expanduser(out)  # the shell expands no ~ after "="
    _run(util.check_output_path, out, "--out")
    # --out=discriminator_60.pt replaced the released head it was imported from.
    _run(util.check_output_not_input, out, "--out", [("--adm-classifier", adm_classifier),
                                                     ("--discriminator", discriminator)])
    classifier = _run(load_adm_classifier, adm_classifier)
    disc = _run(import_reference_discriminator, classifier, discriminator, conditional=cond, label_dim=label_dim)
    _run(save_discriminator, out, disc)
    click.echo(f'Wrote "{out}".')


@main.command()
@click.option("--dg", "dg_path", help="DG pickle", metavar="PKL", required=True)
@click.option("--real", help="Real images (dataset zip or folder)", metavar="ZIP|DIR", required=True)
@click.option("--fake", help="Generated images (zip or folder)", metavar="ZIP|DIR", required=True)
@click.option("--sigmas", help="Noise levels", metavar="LIST", default="0.01,0.1,0.5,1,2,5,10,40", show_default=True)
@click.option("--num", "max_images", help="Use the first NUM images of each set  [default: all]",
              metavar="INT", type=click.IntRange(min=1), default=None)
@click.option("--out", help="Also write the result as JSON", metavar="JSON", default=None)
@click.option("--device", help="Torch device  [default: cuda if available, else cpu]", metavar="DEVICE", default=None)
def accuracy(dg_path, real, fake, sigmas, max_images, out, device):
    """Accuracy of a discriminator by noise level (real and generated images, seeded noise)."""
    try:
        levels = [float(s) for s in sigmas.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {sigmas!r}",
                                 param_hint="--sigmas") from None
    if not all(level > 0 for level in levels):  # NaN included
        raise click.BadParameter(f"noise levels must be positive, got {sigmas!r}", param_hint="--sigmas")
    real, fake = os.path.expanduser(real), os.path.expanduser(fake)  # the shell expands no ~ after "="
    if out:
        out = os.path.expanduser(out)
        _run(util.check_output_path, out, "--out")  # before the work, not after it
        # --out=d.pkl (the JSON's name slipping to the DG pickle's) replaced the discriminator with the results.
        _run(util.check_output_not_input, out, "--out", [("--dg", dg_path), ("--real", real), ("--fake", fake)])
    disc = _run(load_discriminator, dg_path)
    device = _device(device)
    disc.to(device)
    sets = [_run(dg.load_image_set, path, use_labels=disc.needs_labels, max_images=max_images, option=option,
                 resolution=disc.img_resolution) for path, option in ((real, "--real"), (fake, "--fake"))]
    for image_set, option in zip(sets, ("--real", "--fake")):
        if image_set.images.shape[1] != disc.img_channels:
            raise click.BadParameter(f"{image_set.source} has {image_set.images.shape[1]} channels; the "
                                     f"discriminator takes {disc.img_channels}", param_hint=option)
        if image_set.classes is not None and int(image_set.classes.max()) >= disc.label_dim:
            raise click.BadParameter(f"{image_set.source} has class {int(image_set.classes.max())}; the "
                                     f"discriminator reads {disc.label_dim} classes (0-{disc.label_dim - 1})",
                                     param_hint=option)
    labels = [None if s.classes is None else torch.eye(disc.label_dim)[s.classes] for s in sets]
    result = dg.accuracy_by_noise_level(disc, sets[0].images, sets[1].images, levels, real_labels=labels[0],
                                        fake_labels=labels[1], device=device)
    for level, rates in result.items():
        click.echo(f"sigma {level:g}: real {rates['real']:.3f}, generated {rates['fake']:.3f}, "
                   f"mean {rates['mean']:.3f}")
    if out:
        with util.atomic_output(out, "w") as f:
            json.dump({str(k): v for k, v in result.items()}, f, indent=2)


if __name__ == "__main__":
    util.run_cli(main)
