"""The quick start's pipeline on a budget of seconds: every output file and the metrics JSON keys."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_pipeline_small_budget(tmp_path):
    from metrics.detectors import StandinInception, save_standin

    inception = save_standin(StandinInception(), str(tmp_path / "standin-inception.pt"))
    outdir = tmp_path / "qs"
    args = [sys.executable, "quickstart.py", "--outdir", str(outdir), "--resolution", "8", "--kimg", "0.1",
            "--batch", "16", "--cbase", "8", "--cres", "1,2", "--samples", "24", "--steps", "3",
            "--classifier-epochs", "2", "--device", "cpu", "--inception", inception]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Results in" in result.stdout

    assert (outdir / "digits-8x8.zip").is_file()
    run = outdir / "training-run"
    for name in ["network-snapshot-000000.pkl", "stats.jsonl", "log.txt", "training_options.json", "DONE"]:
        assert (run / name).is_file(), name
    pngs = sorted(p.name for p in (outdir / "samples").rglob("*.png"))
    assert pngs == [f"{seed:06d}.png" for seed in range(24)]
    report_png = Image.open(outdir / "training-report.png")
    assert report_png.size[0] >= 560 and report_png.size[1] >= 300
    grid = Image.open(outdir / "samples-grid.png")
    assert grid.size[0] >= 8 * 4 and grid.size[1] >= 8 * 4
    metrics = json.loads((outdir / "metrics.json").read_text())
    for key in ["classifier_frechet_distance", "classifier_frechet_distance_floor", "classifier_frechet_note",
                "num_images", "classifier", "sample_class_histogram", "fid", "fid_note", "snapshot", "sampler",
                "training_kimg", "total_seconds"]:
        assert key in metrics, key
    assert metrics["num_images"] == 24 and sum(metrics["sample_class_histogram"]) == 24
    assert metrics["classifier_frechet_distance"] > metrics["classifier_frechet_distance_floor"] >= 0
    assert isinstance(metrics["fid"], float) and metrics["fid"] >= 0
    assert metrics["sampler"]["nfe"] == 5
    assert "NOT FID" in metrics["classifier_frechet_note"]

    # A second run skips every finished step and rewrites nothing but the metrics.
    snapshot_mtime = os.path.getmtime(run / "network-snapshot-000000.pkl")
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "exists, skipping" in again.stdout and "is complete, skipping" in again.stdout
    assert os.path.getmtime(run / "network-snapshot-000000.pkl") == snapshot_mtime
