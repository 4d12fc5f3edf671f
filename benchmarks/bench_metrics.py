"""Metric pipeline measurements: feature-extraction throughput and peak memory of the streamed pass.

  python benchmarks/bench_metrics.py throughput [--num 64] [--batch 16] [--threads 2] [--device cpu]
      images/s of an Inception-sized stand-in detector (299x299 internal resize, ~6 GFLOPs/image, 2048-d)
      on 32x32 uint8 images, for features only (FID) and features + probabilities (FID + IS), the latter in two
      detector passes and in one (the probabilities from the features, as the metrics pass computes them).

  python benchmarks/bench_metrics.py memory --num 5000 --num 50000 [--workdir /tmp/bench-metrics]
      peak RSS of `fid.py calc`-equivalent passes (fid,is) over a ZIP of N 32x32 PNGs, each in a fresh
      subprocess, with a cheap stand-in that has the real output sizes (2048-d features, 1008 classes):
      the float64 accumulators are full size while the detector costs little.

Stand-ins are random networks: these numbers measure the pipeline, not metric values.
"""

import io
import json
import os
import resource
import subprocess
import sys
import time
import zipfile

import click
import numpy as np
import PIL.Image
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dnnlib  # noqa: E402
from metrics import detectors as detectors_lib  # noqa: E402
from metrics import evaluate  # noqa: E402


@click.group()
def main():
    """Throughput and memory measurements of the metrics pipeline."""


def _flops_per_image(module: torch.nn.Module, resolution: int) -> float:
    flops, size = 0.0, resolution
    for layer in module.trunk.layers:
        if isinstance(layer, torch.nn.Conv2d):
            size = (size + 2 * layer.padding[0] - layer.kernel_size[0]) // layer.stride[0] + 1
            flops += 2 * size * size * layer.weight.numel()
    return flops


@main.command()
@click.option("--num", default=64, show_default=True, help="Images to time")
@click.option("--batch", default=16, show_default=True, help="Batch size")
@click.option("--threads", default=None, type=int, help="torch intra-op threads (default: torch's)")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
def throughput(num, batch, threads, device):
    """Images/s of an Inception-sized stand-in detector."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    net = detectors_lib.StandinInception(**detectors_lib.INCEPTION_SIZED).eval().to(device)
    params = sum(p.numel() for p in net.parameters())
    print(f"stand-in: {params / 1e6:.1f} M parameters, {_flops_per_image(net, 299) / 1e9:.2f} GFLOPs per image "
          f"(Inception-v3: 23.8 M, ~5.7 GFLOPs); torch threads {torch.get_num_threads()}, device {device}")
    images = torch.randint(0, 256, [num, 3, 32, 32], dtype=torch.uint8, device=device)
    detector = detectors_lib.Detector("inception", net, "stand-in", "", detectors_lib.DETECTORS["inception"])
    detectors_lib._probe(detector, device)
    print(f"probabilities: {detector.describe()['probabilities']}")
    with torch.no_grad():
        net(images[:2], return_features=True)  # warm-up
        for label, call in [("features (fid)", detector.features),
                            ("features + probabilities, two passes (fid,is before)",
                             lambda chunk: (detector.features(chunk), detector.probabilities(chunk))),
                            ("features + probabilities, one pass (fid,is)", detector.features_and_probabilities)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for lo in range(0, num, batch):
                call(images[lo:lo + batch])
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            print(json.dumps(dict(mode=label, images=num, batch=batch, seconds=round(seconds, 2),
                                  images_per_s=round(num / seconds, 2))))


def _make_zip(path: str, num: int) -> None:
    if os.path.isfile(path):
        return
    rng = np.random.default_rng(0)
    with dnnlib.util.atomic_output(path, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(num):
            level = rng.integers(20, 236, (1, 1, 3))
            image = np.clip(level + rng.integers(-20, 21, (32, 32, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            PIL.Image.fromarray(image).save(buf, format="png", compress_level=0)
            zf.writestr(f"{i // 1000:05d}/img{i:08d}.png", buf.getvalue())


@main.command()
@click.option("--num", "nums", multiple=True, type=int, default=[5000, 50000], show_default=True,
              help="Images per measurement (repeatable)")
@click.option("--workdir", default="/tmp/bench-metrics", show_default=True,
              help="Where the image zips and the stand-in detector go")
@click.option("--batch", default=250, show_default=True, help="Batch size")
def memory(nums, workdir, batch):
    """Peak RSS of a streamed fid,is pass over N images, each N in a fresh process."""
    os.makedirs(workdir, exist_ok=True)
    detector = os.path.join(workdir, "inception-outputs-sized.pt")
    if not os.path.isfile(detector):
        detectors_lib.save_standin(detectors_lib.StandinInception(feature_dim=2048, num_classes=1008, resolution=8,
                                                                  channels=(8,), strides=(2,)), detector)
    for num in nums:
        data = os.path.join(workdir, f"images-{num}.zip")
        start = time.perf_counter()
        _make_zip(data, num)
        made = time.perf_counter() - start
        proc = subprocess.run([sys.executable, __file__, "memory-worker", data, detector, str(batch)],
                              capture_output=True, text=True, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update(zip_seconds=round(made, 1),
                      pr_features_mib_if_requested=round(num * 4096 * 2 / 2**20, 1))  # float16 VGG16 features
        print(json.dumps(result))


@main.command("memory-worker", hidden=True)
@click.argument("data")
@click.argument("detector")
@click.argument("batch", type=int)
def memory_worker(data, detector, batch):
    torch.set_num_threads(2)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    source = evaluate.dataset_source(data, num=None, batch_size=batch, num_workers=0)
    detectors = evaluate.load_detectors(["fid", "is"], {"inception": detector}, torch.device("cpu"), verbose=False)
    stats = evaluate.run_pass(source, ["fid", "is"], detectors, torch.device("cpu"), progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(num_images=source.num_images, seconds=round(seconds, 1),
                          images_per_s=round(source.num_images / seconds, 1), peak_rss_mib=round(peak / 1024, 1),
                          rss_after_imports_mib=round(baseline / 1024, 1), is_mean=round(stats["is_mean"], 6))))


if __name__ == "__main__":
    main()
