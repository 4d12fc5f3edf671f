"""Convert image collections into EDM's dataset format: uncompressed PNGs plus dataset.json, in a zip or a folder."""

import click

import dnnlib.util

# training.dataset_tool_lib is imported where it is used: it imports torch (the safe unpickler, the zip reader's
# checks), which takes seconds that `--help` and a usage error should not wait for.


def _resolution_option(ctx, param, value):
    if value is None:
        return None
    from training.dataset_tool_lib import DatasetToolError, parse_resolution
    try:
        return parse_resolution(value)
    except DatasetToolError:
        raise click.BadParameter(f"expected WxH or W,H (e.g. 32x32), got {value!r}") from None


@click.command()
@click.option("--source", help="Input: folder, zip, CIFAR-10 tarball, MNIST idx file or 'digits'", metavar="PATH",
              type=str, required=True)
@click.option("--dest", help="Output: a .zip file, or a new or empty folder", metavar="PATH", type=str, required=True)
@click.option("--max-images", help="Convert at most this many images (the first ones)", metavar="INT",
              type=click.IntRange(min=1))
@click.option("--transform", help="Crop/resize mode (needs --resolution)", type=click.Choice(["center-crop",
              "center-crop-wide"]))
@click.option("--resolution", help="Output size, e.g. 32x32 (also 32,32)", metavar="WxH", type=str,
              callback=_resolution_option)
def main(source, dest, max_images, transform, resolution):
    """Convert an image dataset into a zip or folder usable by train.py and fid.py (EDM's format).

    \b
    --source cifar-10-python.tar.gz      CIFAR-10 (the 50,000 training images, labels 0-9)
    --source train-images-idx3-ubyte.gz  MNIST / Fashion-MNIST (gz or not; labels from the matching
                                         train-labels-idx1-ubyte[.gz]); 28x28 is zero-padded to 32x32 as
                                         in EDM, and --resolution then resizes the padded image
    --source path/                       all images under path/, recursively; labels from path/dataset.json,
                                         else (no dataset.json) from the names of class sub-folders (sorted
                                         as names, as EDM: 10 before 2; a note says so); symlinks followed
                                         (EDM's does not enter symlinked folders)
    --source dataset.zip                 all images in the zip; labels from its dataset.json (at its root,
                                         or in the one folder that holds all its images)
    --source digits                      scikit-learn's 1,797 8x8 handwritten digits (offline, labels 0-9),
                                         resized to 32x32 unless --resolution says otherwise (use ./digits for
                                         a folder of that name)

    \b
    --dest /path/to/dataset.zip          an uncompressed (ZIP_STORED) zip
    --dest /path/to/folder               a folder that must not exist yet or be empty

    Images are written as uncompressed PNGs named {idx//1000:05d}/img{idx:08d}.png, with idx the position in the
    source, and labels go to dataset.json: {"labels": [["00000/img00000000.png", 6], ...]}, or {"labels": null} when
    the source has none. A source dataset.json that labels some images but not all, or names files the source does
    not have, is an error (EDM drops all labels, or ignores the names, then); one with null labels means no labels
    (EDM then takes them from the sub-folder names: for its own datasets, the 00000/, 00001/ shards). Palette images
    become RGB (EDM writes their palette indices as greyscale); with transparency they have 4 channels and are
    refused, as are 16-bit PNGs. CMYK JPEGs (ImageNet's training set has some) are converted to RGB, where EDM's
    center-crop reads their four channels' bytes as RGB (Pillow <= 12; it fails on Pillow 13), so those images
    differ from EDM's ImageNet; 1-bit images are resized as greyscale (EDM: in 1-bit mode). Files PIL cannot decode
    by itself (.pdf, .eps, .h5, ...) and macOS's ._* / __MACOSX files are not images. With pyspng installed the
    result is the same. Otherwise the output is EDM's byte for byte (PNGs, names, dataset.json; an audit on
    2026-12-02 over RGB/greyscale PNG, JPEG, BMP, WebP, sizes 1x1 to 1024x1024, every transform, class folders,
    zips, CIFAR-10, MNIST), on the same Pillow: Pillow 13 changed Lanczos for some non-square shrinks (80x100 to
    64x64: up to 10 levels), so pin Pillow to reproduce a non-square --resolution dataset exactly.

    Output images must be square, have a power-of-two side and 1 or 3 channels, identical for all images.
    Without --transform, --resolution resizes (Lanczos). --transform=center-crop crops to the short side;
    --transform=center-crop-wide keeps a central WxH band and letterboxes it into WxW (e.g. 512x384; H <= W);
    images smaller than the band are skipped, as EDM, and counted.

    Labels in a source's dataset.json must be class indices, integers in 0..65535, one per file.

    The output is written under a temporary name and renamed when complete: after an error (a bad image or label,
    a full disk) nothing is left at --dest, and the temporary output of a killed earlier run is removed.
    """
    from training.dataset_tool_lib import DatasetToolError, convert_dataset
    # The shell expands no ~ after "=": --dest=~/x.zip was written to a folder named '~' in the current one.
    source, dest = dnnlib.util.expand_user(source), dnnlib.util.expand_user(dest)
    try:
        num_images = convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution,
                                     log=click.echo)
    except DatasetToolError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Wrote {num_images} images to {dest}")


if __name__ == "__main__":
    dnnlib.util.run_cli(main)
