"""LPIPS(vgg) (metrics/lpips.py), LD3's distance: against a direct implementation of its definition, gradients,
resizing, and the message when its weights cannot be had."""

import hashlib
import http.server
import os
import threading

import pytest
import torch

from dnnlib import util
from metrics import lpips
from samplers.ld3 import make_distance


def test_lpips_missing_weights_message(tmp_path, monkeypatch):
    with pytest.raises(lpips.LPIPSUnavailableError, match="--lpips-vgg PATH --lpips-lin PATH"):
        lpips.load_lpips(str(tmp_path / "missing-vgg.pth"), str(tmp_path / "missing-lin.pth"))

    def offline(url, **kwargs):
        raise OSError(f"could not download {url}: offline")

    monkeypatch.setattr("dnnlib.util._download", offline)
    with pytest.raises(lpips.LPIPSUnavailableError) as info:
        make_distance("lpips")
    assert lpips.LPIPS_VGG16_URL in str(info.value) and "--loss l2" in str(info.value)


def fake_lpips_weights(tmp_path):
    """Random weights in the layouts of torchvision's vgg16 state dict and lpips' v0.1 vgg.pth."""
    gen = torch.Generator().manual_seed(0)
    vgg = {}
    for layer in lpips.VGG16_LAYERS:
        if layer != "M":
            index, c_in, c_out = layer
            vgg[f"features.{index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=gen) * (2 / (9 * c_in)) ** 0.5
            vgg[f"features.{index}.bias"] = torch.randn(c_out, generator=gen) * 0.01
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen)
           for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "lin.pth")
    return vgg, lin, str(tmp_path / "vgg16.pth"), str(tmp_path / "lin.pth")


def reference_lpips(vgg, lin, x, y):
    """LPIPS written out directly from its definition, one image at a time."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    taps = {3: 0, 8: 1, 15: 2, 22: 3, 29: 4}
    values = []
    for a, b in zip(x, y):
        feats = []
        for img in (a[None], b[None]):
            h, out = (img - shift) / scale, []
            for index in range(30):
                if f"features.{index}.weight" in vgg:
                    h = torch.nn.functional.conv2d(h, vgg[f"features.{index}.weight"], vgg[f"features.{index}.bias"],
                                                   padding=1)
                elif index in (4, 9, 16, 23):
                    h = torch.nn.functional.max_pool2d(h, 2)
                else:
                    h = h.clamp_min(0)
                if index in taps:
                    out.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
            feats.append(out)
        values.append(sum(float(((fa - fb) ** 2 * lin[f"lin{k}.model.1.weight"]).sum(1).mean())
                          for k, (fa, fb) in enumerate(zip(*feats))))
    return torch.tensor(values)


def test_lpips_with_local_weights(tmp_path):
    vgg, lin, vgg_path, lin_path = fake_lpips_weights(tmp_path)
    lpips_distance = make_distance("lpips", lpips_vgg=vgg_path, lpips_lin=lin_path)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 16, 16, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 16, 16, generator=gen)).clamp(-1, 1)
    distance = lpips_distance(x, y)
    assert distance.shape == (3,) and torch.allclose(distance, reference_lpips(vgg, lin, x, y), rtol=1e-4)
    assert torch.allclose(lpips_distance(x, x), torch.zeros(3), atol=1e-7)
    x64 = x.double().requires_grad_(True)
    lpips_distance(x64, y).sum().backward()
    assert torch.isfinite(x64.grad).all() and x64.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="--lpips-resize"):
        lpips_distance(x[:, :1, :8, :8], y[:, :1, :8, :8])
    resized = lpips.load_lpips(vgg_path, lin_path, resize=16)
    grey = x[:, :1, ::2, ::2]
    expected = reference_lpips(vgg, lin, *(torch.nn.functional.interpolate(
        t.repeat(1, 3, 1, 1), size=(16, 16), mode="bilinear", align_corners=False) for t in (grey, grey.flip(0))))
    assert torch.allclose(resized(grey, grey.flip(0)), expected, rtol=1e-4)


def test_lpips_vgg_download_is_verified_before_it_is_cached(tmp_path, monkeypatch):
    """A bad download of the canonical VGG16 file fails its sha256 prefix without entering the cache (checked after
    caching, it stayed there and failed every later run)."""
    _vgg, _lin, vgg_path, lin_path = fake_lpips_weights(tmp_path)
    good = open(vgg_path, "rb").read()
    served = {"body": good[:-8] + b"garbage!"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(served["body"])))
            self.end_headers()
            self.wfile.write(served["body"])

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(util, "_cache_dir_override", None)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/vgg16-0123abcd.pth"
    prefix = hashlib.sha256(good).hexdigest()[:8]
    monkeypatch.setattr(lpips, "LPIPS_VGG16_URL", url)
    monkeypatch.setattr(lpips, "LPIPS_VGG16_SHA256_PREFIX", prefix)
    try:
        with pytest.raises(lpips.LPIPSUnavailableError) as info:
            lpips.load_lpips(None, lin_path, verbose=False)
        assert f"checksum mismatch for {url}: expected {prefix} (sha256 prefix)" in str(info.value)
        assert f"or save them as {util.url_cache_path(url)} and " in str(info.value)  # the exact cache file
        assert not os.path.exists(util.url_cache_path(url))
        served["body"] = good
        assert isinstance(lpips.load_lpips(None, lin_path, verbose=False), lpips.LPIPS)
        assert open(util.url_cache_path(url), "rb").read() == good
    finally:
        server.shutdown()
        server.server_close()
