"""dnnlib.util.open_url's downloads against a local HTTP server: what may enter the cache (no web pages, nothing that
fails its checksum, nothing half-received), streaming, the rate limit, retries, and the offline advice of open_url and
of the detector, GDD weight and DG loaders that use it."""

import hashlib
import http.server
import os
import threading

import pytest
import requests
import torch

from dnnlib import util
from metrics import detectors as detectors_lib
from training import discriminators

PAYLOAD = bytes(range(256)) * 4096 * 3  # 3 MiB: several DOWNLOAD_CHUNK_SIZE pieces
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """A local HTTP server whose answers the test chooses: routes[path](handler) answers a GET of `path`."""

    def __init__(self):
        self.routes, self.hits = {}, {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                route = server.routes.get(self.path)
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    route(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


def send(body: bytes, status: int = 200, content_type: str = "application/octet-stream", length: int | None = None):
    def route(handler):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        handler.wfile.write(body)
        if length is not None:  # declared more than it sends: cut the connection
            handler.close_connection = True
    return route


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(util, "_cache_dir_override", None)
    monkeypatch.setattr(util.time, "sleep", lambda seconds: None)  # retry backoff; the routes wait on Events
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def cache_files(cache_dir) -> list[str]:
    return sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []


# ---------------------------------------------------------------------------------------------------------------------
# Finding 1: a web page sent with status 200 instead of the file.


def test_html_error_page_is_refused_not_cached_not_retried(server, tmp_path):
    page = b"<!DOCTYPE html><html><body>Error: quota exceeded</body></html>"
    server.routes["/weights.pkl"] = send(page, content_type="text/html; charset=utf-8")
    server.routes["/sniffed.pkl"] = send(b"\n  <HTML><body>Sign in</body></HTML>")  # no text/html type: the body says
    cache_dir = tmp_path / "cache"
    for path in ("/weights.pkl", "/sniffed.pkl"):
        url = server.url(path)
        with pytest.raises(OSError) as info:
            util.open_url(url, cache_dir=str(cache_dir), num_attempts=3, verbose=False)
        assert str(info.value).startswith(f"could not download {url}: the server sent a web page")
        assert "instead of the file; nothing was cached" in str(info.value)
        assert server.hits[path] == 1  # not retried
    assert cache_files(cache_dir) == []
    # A URL that names a web page gets one.
    server.routes["/index.html"] = send(page, content_type="text/html")
    with util.open_url(server.url("/index.html"), cache_dir=str(cache_dir), verbose=False) as f:
        assert f.read() == page


# ---------------------------------------------------------------------------------------------------------------------
# Finding 2: streaming into the cache, checksum before the rename, the rate limit, retries.


def test_download_is_streamed_into_the_cache(server, tmp_path, monkeypatch):
    def no_buffering(self):
        raise AssertionError("the whole body read into memory")

    monkeypatch.setattr(requests.Response, "content", property(no_buffering))
    server.routes["/big.bin"] = send(PAYLOAD)
    url, cache_dir = server.url("/big.bin"), str(tmp_path / "cache")
    path = util.open_url(url, cache_dir=cache_dir, return_filename=True, verbose=False,
                         checksum=f"sha256:{PAYLOAD_SHA256}")
    assert path == util.url_cache_path(url, cache_dir)
    with open(path, "rb") as f:
        assert f.read() == PAYLOAD
    assert cache_files(cache_dir) == [os.path.basename(path)]  # no temporary file left beside it
    # cache=False: in memory, nothing cached.
    server.routes["/mem.bin"] = send(b"in memory")
    data = util.open_url(server.url("/mem.bin"), cache_dir=cache_dir, cache=False, verbose=False)
    assert data.read() == b"in memory" and len(cache_files(cache_dir)) == 1


def test_checksum_mismatch_leaves_nothing_in_the_cache(server, tmp_path):
    server.routes["/w.pth"] = send(PAYLOAD)
    url, cache_dir = server.url("/w.pth"), str(tmp_path / "cache")
    with pytest.raises(OSError) as info:
        util.open_url(url, cache_dir=cache_dir, checksum="sha256:" + "0" * 64, verbose=False)
    assert str(info.value) == (f"checksum mismatch for {url}: expected {'0' * 64} (sha256), got {PAYLOAD_SHA256}; "
                               f"nothing was cached")
    assert cache_files(cache_dir) == [] and server.hits["/w.pth"] == 1
    # The 8-hex-digit prefix of torch.hub file names.
    path = util.open_url(url, cache_dir=cache_dir, checksum=f"sha256:{PAYLOAD_SHA256[:8]}", return_filename=True,
                         verbose=False)
    with open(path, "rb") as f:
        assert f.read() == PAYLOAD
    server.routes["/w.pth?again"] = send(PAYLOAD)
    with pytest.raises(OSError, match=rf"expected 0123abcd \(sha256 prefix\), got {PAYLOAD_SHA256}"):
        util.open_url(server.url("/w.pth?again"), cache_dir=cache_dir, checksum="sha256:0123abcd", verbose=False)


def test_trickling_download_is_abandoned(server, tmp_path, monkeypatch):
    stop = threading.Event()

    def trickle(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        try:
            for _ in range(200):  # a byte every 20 ms: each read is quick, the download would take half an hour
                if stop.wait(0.02):
                    break
                handler.wfile.write(b"x")
                handler.wfile.flush()
        except OSError:
            pass
        handler.close_connection = True

    monkeypatch.setattr(util, "MIN_DOWNLOAD_RATE", 1000)
    server.routes["/slow.pkl"] = trickle
    url, cache_dir = server.url("/slow.pkl"), str(tmp_path / "cache")
    try:
        with pytest.raises(OSError) as info:
            util.open_url(url, cache_dir=cache_dir, timeout=0.5, num_attempts=3, verbose=False)
    finally:
        stop.set()
    message = str(info.value)
    assert message.startswith(f"could not download {url}: too slow, ") and " KiB/s on average over " in message
    assert "(the minimum is 0.976562 KiB/s;" in message and "If this machine is offline" in message
    assert cache_files(cache_dir) == [] and server.hits["/slow.pkl"] == 1


def test_retries_5xx_and_truncated_bodies_not_4xx(server, tmp_path):
    cache_dir = str(tmp_path / "cache")
    server.routes["/busy.bin"] = send(b"", status=503)
    server.routes["/cut.bin"] = send(PAYLOAD[:1000], length=len(PAYLOAD))
    for path in ("/busy.bin", "/cut.bin"):
        with pytest.raises(OSError, match=f"could not download {server.url(path)} after 2 attempt"):
            util.open_url(server.url(path), cache_dir=cache_dir, num_attempts=2, verbose=False)
        assert server.hits[path] == 2
    with pytest.raises(OSError) as info:
        util.open_url(server.url("/gone.bin"), cache_dir=cache_dir, num_attempts=3, verbose=False)
    assert str(info.value) == f"could not download {server.url('/gone.bin')}: HTTP 404"
    assert server.hits["/gone.bin"] == 1 and cache_files(cache_dir) == []


# ---------------------------------------------------------------------------------------------------------------------
# Finding 3: offline advice that works.


def test_offline_hint_names_the_cache_file_in_use(server, tmp_path):
    url, cache_dir = server.url("/missing/inception.pkl"), str(tmp_path / "my-cache")
    server.routes["/missing/inception.pkl"] = send(b"", status=502)
    with pytest.raises(OSError) as info:
        util.open_url(url, cache_dir=cache_dir, num_attempts=1, verbose=False)
    cache_file = util.url_cache_path(url, cache_dir)
    assert str(info.value).endswith(f"or save it as {cache_file} (the file the download cache looks for).")
    os.makedirs(cache_dir)
    with open(cache_file, "wb") as f:  # following the advice works
        f.write(b"copy")
    with util.open_url(url, cache_dir=cache_dir, verbose=False) as f:
        assert f.read() == b"copy"
    other = server.url("/missing/other.pkl")
    server.routes["/missing/other.pkl"] = send(b"", status=502)
    with pytest.raises(OSError) as info:  # a caller with its own advice
        util.open_url(other, cache_dir=cache_dir, num_attempts=1, verbose=False, offline_hint="")
    assert str(info.value).endswith(f"Server Error: Bad Gateway for url: {other}.")


@pytest.fixture
def unreachable_inception(monkeypatch):
    detectors_lib._loaded.clear()
    monkeypatch.setattr(util, "_cache_dir_override", None)
    monkeypatch.setattr(util.time, "sleep", lambda seconds: None)
    spec = detectors_lib.DETECTORS["inception"]
    url = "http://127.0.0.1:9/inception-2015-12-05.pkl"
    monkeypatch.setitem(detectors_lib.DETECTORS, "inception", detectors_lib.DetectorSpec(
        url, ("http://127.0.0.1:9/inception-2015-12-05.pt",), None, spec.feature_kwargs, spec.probability_kwargs))
    yield url
    detectors_lib._loaded.clear()


def test_detector_offline_error_gives_its_advice_once(unreachable_inception):
    with pytest.raises(detectors_lib.DetectorUnavailableError) as info:
        detectors_lib.load_detector("inception", device="cpu", verbose=False)
    message = str(info.value)
    assert message.count("If this machine is offline") == 1 and ".." not in message
    assert message.endswith(f"or save {unreachable_inception} as {util.url_cache_path(unreachable_inception)} (the "
                            f"file the download cache looks for; set $DNNLIB_CACHE_DIR to move the cache).")


def test_broken_cached_detector_names_the_cache_file(unreachable_inception, tmp_path):
    cache_file = util.url_cache_path(unreachable_inception)
    whole = detectors_lib.save_standin(detectors_lib.StandinInception(), str(tmp_path / "inception.pt"))
    os.makedirs(os.path.dirname(cache_file))
    with open(whole, "rb") as src, open(cache_file, "wb") as dst:
        dst.write(src.read()[:300])  # truncated
    with pytest.raises(detectors_lib.DetectorUnavailableError) as info:
        detectors_lib.load_detector("inception", device="cpu", verbose=False)
    assert str(info.value).startswith(f"could not load the inception detector from {unreachable_inception} (its "
                                      f"cache copy {cache_file}: delete that file so that it is fetched again): ")
    with open(cache_file, "wb") as f:
        f.write(b"hello")
    with pytest.raises(detectors_lib.DetectorUnavailableError, match=r"\(its cache copy .*: delete that file .*"
                       r"neither a TorchScript archive nor a pickle"):
        detectors_lib.load_detector("inception", device="cpu", verbose=False)


# ---------------------------------------------------------------------------------------------------------------------
# Finding 4: GDD weights are verified before they are cached.


def test_gdd_weights_with_a_bad_checksum_are_not_cached(server, tmp_path):
    state = {"w": torch.arange(4.0)}
    torch.save(state, tmp_path / "good.pth")
    good = (tmp_path / "good.pth").read_bytes()
    server.routes["/tiny-0123abcd.pth"] = send(good[:-10] + b"corrupted!")
    url = server.url("/tiny-0123abcd.pth")
    digest = hashlib.sha256(good).hexdigest()
    with pytest.raises(discriminators.DiscriminatorUnavailableError) as info:
        discriminators.load_weights_file("tiny weights", url, digest[:8], verbose=False)
    assert f"checksum mismatch for {url}: expected {digest[:8]} (sha256 prefix)" in str(info.value)
    assert str(info.value).count("elsewhere") == 1  # its own advice only
    assert not os.path.exists(util.url_cache_path(url))
    server.routes["/tiny-0123abcd.pth"] = send(good)
    loaded = discriminators.load_weights_file("tiny weights", url, digest[:8], verbose=False)
    assert torch.equal(loaded["w"], state["w"]) and os.path.isfile(util.url_cache_path(url))


# ---------------------------------------------------------------------------------------------------------------------
# Finding 7: --dg under torchrun: rank 0 fetches first.


@pytest.mark.parametrize("rank", [0, 1])
def test_dg_discriminator_is_loaded_by_rank_0_first(monkeypatch, rank):
    from samplers import guidance

    events = []
    monkeypatch.setattr(guidance.dist, "get_rank", lambda: rank)
    monkeypatch.setattr(guidance.dist, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(guidance, "load_discriminator", lambda path: events.append(f"load {path}") or "disc")
    monkeypatch.setattr(guidance, "_LOADED", {})
    url = "http://127.0.0.1:9/dg.pkl"
    assert guidance._load_cached(url) == "disc"
    assert events == (["load " + url, "barrier"] if rank == 0 else ["barrier", "load " + url])


def test_detector_falls_back_to_its_alternate_url(unreachable_inception, tmp_path, capsys):
    # The canonical host down: the same network in StyleGAN2-ADA's format is fetched (here: found in the cache),
    # and the results name the file actually used.
    alternate = detectors_lib.DETECTORS["inception"].alternate_urls[0]
    cache_file = util.url_cache_path(alternate)
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    detectors_lib.save_standin(detectors_lib.StandinInception(), cache_file)
    detector = detectors_lib.load_detector("inception", device="cpu", verbose=True)
    assert detector.source == alternate and detector.feature_dim == 16
    said = f"inception detector: {unreachable_inception} could not be fetched; using {alternate}"
    assert said in capsys.readouterr().out
    # Both unreachable: one error naming both failures, the canonical's first.
    detectors_lib._loaded.clear()
    os.remove(cache_file)
    with pytest.raises(detectors_lib.DetectorUnavailableError) as info:
        detectors_lib.load_detector("inception", device="cpu", verbose=False)
    message = str(info.value)
    assert message.startswith(f"could not fetch the inception detector from {unreachable_inception}: ")
    assert f"; from {alternate}: " in message and message.count("If this machine is offline") == 1


def test_cache_files_named_by_edms_dnnlib_are_found(server, tmp_path):
    # EDM's dnnlib caches https://host/dir/f.pkl as '<md5 of url>_https___host_dir_f.pkl' (the whole URL) in the same
    # default folder: a user's existing EDM cache works offline, as EDM's own lookup (one '<md5>_*' file) does.
    import hashlib
    import re

    server.routes["/edm/net.pkl"] = send(PAYLOAD)
    url, cache_dir = server.url("/edm/net.pkl"), str(tmp_path / "cache")
    os.makedirs(cache_dir)
    edm_name = hashlib.md5(url.encode()).hexdigest() + "_" + re.sub(r"[^0-9a-zA-Z-._]", "_", url)
    assert edm_name != os.path.basename(util.url_cache_path(url, cache_dir))
    with open(os.path.join(cache_dir, edm_name), "wb") as f:
        f.write(b"EDM's copy")
    # An unfinished download of ours beside it is not a cache copy.
    with open(util.temp_path(util.url_cache_path(url, cache_dir)), "wb") as f:
        f.write(b"partial")
    assert util.cached_path(url, cache_dir) == os.path.join(cache_dir, edm_name)
    with util.open_url(url, cache_dir=cache_dir, verbose=False) as f:
        assert f.read() == b"EDM's copy"
    assert server.hits.get("/edm/net.pkl", 0) == 0
    # Two candidates: EDM would not choose either; neither do we (downloaded into our own name).
    with open(os.path.join(cache_dir, edm_name + "2"), "wb") as f:
        f.write(b"another")
    assert util.cached_path(url, cache_dir) is None
    path = util.open_url(url, cache_dir=cache_dir, return_filename=True, verbose=False)
    assert path == util.url_cache_path(url, cache_dir) and server.hits["/edm/net.pkl"] == 1
    assert util.cached_path(url, cache_dir) == path  # our own name first
