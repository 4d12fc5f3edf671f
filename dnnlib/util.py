"""General utilities: EasyDict, class construction by name, URL/file opening with a download cache.

The names follow EDM's `dnnlib.util` so that EDM-format pickles that reference `dnnlib.EasyDict` resolve.
"""

import contextlib
import hashlib
import importlib
import io
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
import warnings
from typing import Any


class _ReadOnlyClassAttributes(type):
    """A class whose attributes cannot be set once it is made. Pickle's BUILD sets attributes on whatever object it is
    handed, a class too: a file naming EasyDict could otherwise give every EasyDict in the process a class attribute,
    which `d.key` returns for any missing key (safe_pickle whitelists EasyDict)."""

    def __setattr__(cls, name, value):
        raise AttributeError(f"the attributes of class {cls.__name__} are read-only (set keys on its instances)")

    def __delattr__(cls, name):
        raise AttributeError(f"the attributes of class {cls.__name__} are read-only")


class EasyDict(dict, metaclass=_ReadOnlyClassAttributes):
    """A dict whose items are also attributes: `d.key` is `d['key']`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


# ---------------------------------------------------------------------------------------------------------------------
# Logging: tee stdout/stderr to a file (train.py's log.txt).


class Logger:
    """Copies everything written to stdout/stderr into a file, while still printing it."""

    def __init__(self, file_name: str | None = None, file_mode: str = "a", should_flush: bool = True):
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush = should_flush
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = self
        sys.stderr = self

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.close()

    def write(self, text: str) -> None:
        if not text:
            return
        if self.file is not None:
            with self._file_errors():
                self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self) -> None:
        if self.file is not None:
            with self._file_errors():
                self.file.flush()
        self.stdout.flush()

    @contextlib.contextmanager
    def _file_errors(self):
        """A write to the file that fails (a full disk) raises one OutputPathError naming it, and the file is let go:
        what is printed next, that error included, reaches the terminal. Kept, every later print raised again, and
        the error's own traceback failed to print (two tracebacks, neither naming the file)."""
        try:
            yield
        except OSError as err:
            name, file, self.file = self.file.name, self.file, None
            try:
                file.close()
            except OSError:
                pass  # its buffer cannot be written either
            raise write_error(name, err) from err

    def isatty(self) -> bool:
        return self.stdout.isatty()

    def close(self) -> None:
        """Closes the file without an error of its own: close runs on the way out, often of the error a full disk
        caused, and a failing last flush replaced that error's one line by a traceback."""
        with contextlib.suppress(OutputPathError):
            self.flush()
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


def format_time(seconds: float) -> str:
    """'1d 02h 03m', '2h 03m 04s', '3m 04s' or '4s'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s"
    return f"{s // 86400}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m"


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float as the string 'inf', '-inf' or 'nan': Python's json writes them as bare
    Infinity/NaN, which strict JSON readers (jq, JavaScript, pandas' default) refuse. Python reads the strings back
    with float(); a record read from an older file (bare Infinity) becomes equal to a new one through this too."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def parse_bool(value: str | bool) -> bool:
    """Replacement for distutils.util.strtobool, which is gone in Python 3.12."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on", "t"):
        return True
    if v in ("0", "false", "no", "n", "off", "f"):
        return False
    raise ValueError(f"expected a boolean (true/false, yes/no, 1/0), got {value!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Construction by name: config dicts name classes as 'package.module.Class' strings (as in EDM's train.py).


def get_obj_by_name(name: str) -> Any:
    """Resolve 'package.module.attr' to the object, importing the longest importable module prefix."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Only swallow the error when it is the module we tried, not something it imports.
            if err.name is not None and not module_name.startswith(err.name):
                raise
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            continue
    raise ImportError(f"cannot resolve object name {name!r}")


def call_func_by_name(*args, func_name: str, **kwargs) -> Any:
    func = get_obj_by_name(func_name)
    if not callable(func):
        raise TypeError(f"{func_name!r} is not callable")
    return func(*args, **kwargs)


def construct_class_by_name(*args, class_name: str, **kwargs) -> Any:
    """construct_class_by_name(class_name='training.networks.SongUNet', **kwargs) -> instance."""
    return call_func_by_name(*args, func_name=class_name, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Opening files and URLs with a download cache.

_cache_dir_override: str | None = None


def set_cache_dir(path: str | None) -> None:
    global _cache_dir_override
    _cache_dir_override = path


def make_cache_dir_path(*paths: str) -> str:
    """The download cache: set_cache_dir(), else $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib (as EDM)."""
    if _cache_dir_override is not None:
        return os.path.join(_cache_dir_override, *paths)
    if "DNNLIB_CACHE_DIR" in os.environ:
        return os.path.join(os.environ["DNNLIB_CACHE_DIR"], *paths)
    home = os.environ.get("HOME") or os.environ.get("USERPROFILE") or tempfile.gettempdir()
    return os.path.join(home, ".cache", "dnnlib", *paths)


def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    """True for http(s):// strings (and file:// ones when allowed)."""
    if not isinstance(obj, str):
        return False
    return bool(re.match(r"^https?://[^/]+", obj)) or (allow_file_urls and obj.startswith("file://"))


def _file_url_to_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    path = urllib.request.url2pathname(parsed.path)
    if parsed.netloc.startswith("~"):  # file://~/x: urlparse takes '~' for a host name; users mean their home
        return os.path.expanduser(parsed.netloc + path)
    if parsed.netloc and parsed.netloc != "localhost":
        path = f"//{parsed.netloc}{path}"
    return path


def _hash_file(path: str, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The shortest digest prefix accepted as a checksum: torch.hub file names carry 8 hex digits of the sha256.
MIN_CHECKSUM_PREFIX = 8


class _Checksum:
    """A parsed `checksum` argument: 'sha256:<hex>', 'md5:<hex>', or bare hex (length decides: 32 md5, 40 sha1,
    64 sha256). With an algorithm named, fewer hex digits than the full digest (at least MIN_CHECKSUM_PREFIX) mean
    a prefix of it: 'sha256:6c64b313' for torchvision's vgg16_bn-6c64b313.pth."""

    def __init__(self, expected: str):
        algorithm, _, digest = expected.rpartition(":")
        digest = digest.lower()
        if not algorithm:
            algorithm = {32: "md5", 40: "sha1", 64: "sha256"}.get(len(digest), "")
            if not algorithm:
                raise ValueError(f"cannot tell the hash algorithm of checksum {expected!r}; write it as "
                                 f"'sha256:<hex>'")
        try:
            full = hashlib.new(algorithm).digest_size * 2
        except ValueError:
            raise ValueError(f"unknown hash algorithm {algorithm!r} in checksum {expected!r}") from None
        if not re.fullmatch(r"[0-9a-f]+", digest) or not MIN_CHECKSUM_PREFIX <= len(digest) <= full:
            raise ValueError(f"checksum {expected!r}: expected {full} hex digits, or a prefix of at least "
                             f"{MIN_CHECKSUM_PREFIX}")
        self.algorithm, self.digest = algorithm, digest
        self.kind = algorithm if len(digest) == full else f"{algorithm} prefix"

    def hasher(self):
        return hashlib.new(self.algorithm)

    def mismatch(self, what: str, actual: str) -> str | None:
        """None when `actual` (a full hex digest) fits; else the error message."""
        if actual.lower().startswith(self.digest):
            return None
        return f"checksum mismatch for {what}: expected {self.digest} ({self.kind}), got {actual}"


def _check_hash(data_or_path: bytes | str, expected: str | None, what: str) -> None:
    """Raise OSError when the bytes or the file at a path do not fit `expected` (see _Checksum)."""
    if expected is None:
        return
    checksum = _Checksum(expected)
    if isinstance(data_or_path, bytes):
        actual = hashlib.new(checksum.algorithm, data_or_path).hexdigest()
    else:
        actual = _hash_file(data_or_path, checksum.algorithm)
    problem = checksum.mismatch(what, actual)
    if problem:
        raise OSError(problem)


def _cache_file_name(url: str) -> str:
    url_md5 = hashlib.md5(url.encode("utf-8")).hexdigest()
    safe_name = re.sub(r"[^0-9a-zA-Z._-]+", "_", os.path.basename(urllib.parse.urlparse(url).path) or "download")
    return f"{url_md5}_{safe_name}"


def url_cache_path(url: str, cache_dir: str | None = None) -> str:
    """The file in which open_url() caches `url` (whether or not it exists): '<cache>/<md5 of url>_<file name>'.
    Placing a copy of the file there makes open_url(url) work offline."""
    if cache_dir is None:
        cache_dir = make_cache_dir_path("downloads")
    return os.path.join(cache_dir, _cache_file_name(url))


def cached_path(url: str, cache_dir: str | None = None) -> str | None:
    """Where open_url() caches `url`, if that file exists (None otherwise). Never touches the network.

    EDM's and StyleGAN's dnnlib name a cached file '<md5 of url>_<name>' too, with another name part (the whole URL,
    or the server's file name); they share the default cache folder, so such a file is used when it is the only one
    with the URL's md5 (EDM's own rule). Temporary files of unfinished downloads are not."""
    path = url_cache_path(url, cache_dir)
    if os.path.isfile(path):
        return path
    directory = os.path.dirname(path)
    prefix = hashlib.md5(url.encode("utf-8")).hexdigest() + "_"
    try:
        names = [name for name in os.listdir(directory)
                 if name.startswith(prefix) and ".tmp-" not in name and os.path.isfile(os.path.join(directory, name))]
    except OSError:
        return None
    return os.path.join(directory, names[0]) if len(names) == 1 else None


# Downloads are streamed in pieces of this size into the cache file: never the whole file in memory.
DOWNLOAD_CHUNK_SIZE = 1 << 20
# Bytes per second. `timeout` bounds each socket read only, so a server that trickles a byte now and then would hold
# a run forever: once `timeout` seconds have passed, a download whose average rate is below this is abandoned.
MIN_DOWNLOAD_RATE = 16 * 1024


class _DownloadRefused(Exception):
    """A download that retrying will not mend (4xx, a web page, a checksum mismatch, too slow). Not an OSError, so
    that atomic_output passes it through (removing its temporary file) instead of calling it a write error."""

    def __init__(self, message: str, offline_hint: bool = False):
        super().__init__(message)
        self.offline_hint = offline_hint  # whether getting the file elsewhere is the way out


class _DownloadFailed(Exception):
    """A download broken off (connection lost, truncated body): retried. Not an OSError, as _DownloadRefused."""


def open_url(url: str, cache_dir: str | None = None, num_attempts: int = 3, verbose: bool = True,
             return_filename: bool = False, cache: bool = True, checksum: str | None = None,
             timeout: float = 60.0, offline_hint: str | None = None) -> Any:
    """Open a local path, a file:// URL or an http(s) URL; return a binary file object (or a path).

    '~' in a local path or a file://~/ URL is the user's home folder. Downloads are cached under `cache_dir` (default:
    make_cache_dir_path('downloads')) as url_cache_path(url, cache_dir). They are streamed into a temporary file,
    checked and only then renamed into place: an interrupted download, a web page sent instead of the file (an HTML
    login or error page, unless the URL names a .htm/.html file) or a checksum mismatch leaves nothing in the cache.
    5xx answers and broken connections are retried `num_attempts` times with backoff; 4xx answers, web pages and
    checksum mismatches are not. `timeout` bounds each network read, and a download slower on average than
    MIN_DOWNLOAD_RATE once `timeout` seconds have passed is abandoned. cache=False returns the download in memory.

    checksum: 'sha256:<hex>', 'md5:<hex>', or bare hex (32 digits md5, 40 sha1, 64 sha256). With the algorithm named,
    a shorter hex string (at least MIN_CHECKSUM_PREFIX digits) is a prefix of the digest: 'sha256:6c64b313' for the
    8 digits that torch.hub file names carry. The file returned is verified: local file, cached copy or download.

    offline_hint: what the error of a failed download suggests. None: the generic advice (pass a local path, or save
    the file as its cache file); callers with their own advice pass it ('' for none) so it is not given twice.
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"open_url expects a path or URL string, got {url!r}")
    if num_attempts < 1:
        raise ValueError("num_attempts must be at least 1")
    expected = _Checksum(checksum) if checksum is not None else None  # a malformed checksum fails before any work

    # Local paths.
    if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        path = os.path.expanduser(url)
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a folder, not a file" + (f" (from {url})" if path != url else ""))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}" + (f" (from {url})" if path != url else ""))
        _check_hash(path, checksum, path)
        return path if return_filename else open(path, "rb")

    # file:// URLs: read the file in place; cache a copy when asked so later runs work if it moves.
    if url.startswith("file://"):
        path = _file_url_to_path(url)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path} (from {url})")
        if not cache:
            _check_hash(path, checksum, url)
            return path if return_filename else open(path, "rb")
        try:
            cached = _copy_into_cache(url, path, cache_dir, expected)
        except _DownloadRefused as err:
            raise OSError(str(err)) from None
        return cached if return_filename else open(cached, "rb")

    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme {scheme!r} in {url}; use a local path, file:// or http(s)://")
    if return_filename and not cache:
        raise ValueError("return_filename=True needs cache=True for a remote URL")

    cache_path = cached_path(url, cache_dir) or url_cache_path(url, cache_dir)
    if cache and os.path.isfile(cache_path):
        if expected is not None:
            problem = expected.mismatch(f"{url} (cached at {cache_path})", _hash_file(cache_path, expected.algorithm))
            if problem:
                raise OSError(f"{problem}: delete {cache_path} to download it again")
        return cache_path if return_filename else open(cache_path, "rb")

    if offline_hint is None:
        offline_hint = (f"If this machine is offline, download {url} elsewhere and pass its local path (or a file:// "
                        f"URL) instead of the URL")
        offline_hint += f", or save it as {cache_path} (the file the download cache looks for)." if cache else "."
    data = _download(url, cache_path=cache_path if cache else None, checksum=expected, num_attempts=num_attempts,
                     verbose=verbose, timeout=timeout, offline_hint=offline_hint)
    if not cache:
        return data
    return cache_path if return_filename else open(cache_path, "rb")


def _copy_into_cache(url: str, path: str, cache_dir: str | None, expected: _Checksum | None) -> str:
    """The cache copy of a file:// URL's file, refreshed whenever it differs from the source in size or mtime (in
    either direction: `cp -p` and `rsync -t` give a replaced file an older time) or does not fit the checksum. The
    copy gets the source's mtime so that the next call can tell it is current."""
    cache_path = url_cache_path(url, cache_dir)
    source = os.stat(path)
    try:
        copy = os.stat(cache_path)
        current = copy.st_size == source.st_size and copy.st_mtime_ns == source.st_mtime_ns
    except FileNotFoundError:
        current = False
    if current and (expected is None or expected.mismatch(url, _hash_file(cache_path, expected.algorithm)) is None):
        return cache_path
    hasher = expected.hasher() if expected is not None else None
    with atomic_output(cache_path, "wb") as f, open(path, "rb") as src:
        for chunk in iter(lambda: src.read(DOWNLOAD_CHUNK_SIZE), b""):
            if hasher is not None:
                hasher.update(chunk)
            f.write(chunk)
        problem = expected.mismatch(url, hasher.hexdigest()) if expected is not None else None
        if problem:  # raised before the rename: a bad source never lands in the cache
            raise _DownloadRefused(problem)
    try:
        os.utime(cache_path, ns=(source.st_atime_ns, source.st_mtime_ns))
    except OSError:
        pass  # the copy is still right; the next call just copies again
    return cache_path


def _names_web_page(url: str) -> bool:
    return urllib.parse.urlparse(url).path.lower().endswith((".htm", ".html"))


def _looks_like_web_page(head: bytes) -> bool:
    return head.lstrip().lower().startswith((b"<!doctype html", b"<html"))


def _download(url: str, *, cache_path: str | None, checksum: _Checksum | None, num_attempts: int, verbose: bool,
              timeout: float, offline_hint: str) -> io.BytesIO | None:
    """Download `url` into `cache_path` (None: into memory, returned), with retries; OSError when it cannot."""
    import requests  # Imported here so that local-only use does not need it.

    last_error: Exception | None = None
    for attempt in range(num_attempts):
        if verbose:
            print(f"Downloading {url} ...", end="", flush=True, file=sys.stderr)
        try:
            data = _download_once(url, cache_path, checksum, timeout)
            if verbose:
                print(" done", file=sys.stderr)
            return data
        except _DownloadRefused as err:
            if verbose:
                print(" failed", file=sys.stderr)
            hint = f" {offline_hint}" if err.offline_hint and offline_hint else ""
            raise OSError(f"{err}{hint}") from None
        except OutputPathError:
            if verbose:
                print(" failed", file=sys.stderr)
            raise  # the cache folder cannot be written (e.g. disk full): another attempt would not help
        except (_DownloadFailed, OSError, requests.RequestException) as err:
            if verbose:
                print(" failed", file=sys.stderr)
            last_error = err
        if attempt + 1 < num_attempts:
            time.sleep(min(2.0 ** attempt, 5.0))
    hint = f" {offline_hint}" if offline_hint else ""
    reason = str(last_error).rstrip(".")  # some end in '.' ('Exceeded 30 redirects.'): one full stop, not two
    raise OSError(f"could not download {url} after {num_attempts} attempt(s): {reason}.{hint}") from last_error


def _download_once(url: str, cache_path: str | None, checksum: _Checksum | None, timeout: float) -> io.BytesIO | None:
    import requests

    with requests.Session() as session, session.get(url, timeout=timeout, stream=True) as res:
        if 400 <= res.status_code < 500:  # will not get better by retrying
            raise _DownloadRefused(f"could not download {url}: HTTP {res.status_code}")
        res.raise_for_status()  # 5xx: retried
        content_type = res.headers.get("Content-Type", "")
        if not _names_web_page(url) and content_type.split(";")[0].strip().lower() in ("text/html",
                                                                                       "application/xhtml+xml"):
            raise _DownloadRefused(f"could not download {url}: the server sent a web page ({content_type}; a login "
                                   f"or error page?) instead of the file; nothing was cached")
        if cache_path is None:
            buffer = io.BytesIO()
            _stream_body(url, res, buffer, checksum, timeout)
            buffer.seek(0)
            return buffer
        with atomic_output(cache_path, "wb") as f:
            _stream_body(url, res, f, checksum, timeout)
        return None


def _body_chunks(res):
    if hasattr(res.raw, "read1"):  # urllib3 >= 2.1: returns what has arrived, so the rate check runs as bytes trickle
        while chunk := res.raw.read1(DOWNLOAD_CHUNK_SIZE, decode_content=True):
            yield chunk
    else:  # older urllib3: each read waits for a full piece
        yield from res.iter_content(DOWNLOAD_CHUNK_SIZE)


def _stream_body(url: str, res, out, checksum: _Checksum | None, timeout: float) -> None:
    """Copy the response body to `out`, checking as it goes; raises _DownloadRefused / _DownloadFailed."""
    import requests
    import urllib3

    hasher = checksum.hasher() if checksum is not None else None
    check_page = not _names_web_page(url)
    head = b""
    received = 0
    start = time.monotonic()
    chunks = _body_chunks(res)
    while True:
        try:
            chunk = next(chunks, None)
        except (OSError, urllib3.exceptions.HTTPError, requests.RequestException) as err:
            raise _DownloadFailed(f"{type(err).__name__}: {err}") from err
        if chunk is None:
            break
        if check_page and len(head) < 64:  # a web page sent as some other Content-Type (or none)
            head += chunk[:64 - len(head)]
            if _looks_like_web_page(head):
                raise _DownloadRefused(f"could not download {url}: the server sent a web page (it starts with "
                                       f"{head.lstrip()[:15]!r}; a login or error page?) instead of the file; "
                                       f"nothing was cached")
        if hasher is not None:
            hasher.update(chunk)
        out.write(chunk)
        received += len(chunk)
        elapsed = time.monotonic() - start
        if elapsed > timeout and received / elapsed < MIN_DOWNLOAD_RATE:
            raise _DownloadRefused(f"could not download {url}: too slow, {received / elapsed / 1024:.2f} KiB/s on "
                                   f"average over {elapsed:.1f} s (the minimum is {MIN_DOWNLOAD_RATE / 1024:g} KiB/s; "
                                   f"{received:,} bytes received); nothing was cached.", offline_hint=True)
    if received == 0:
        raise _DownloadFailed("no data received")
    length = res.headers.get("Content-Length")
    if length is not None and length.isdigit() and not res.headers.get("Content-Encoding") and received != int(length):
        raise _DownloadFailed(f"incomplete download: {received:,} of {int(length):,} bytes")
    if hasher is not None:
        problem = checksum.mismatch(url, hasher.hexdigest())
        if problem:  # raised before atomic_output renames the file: nothing is cached
            raise _DownloadRefused(f"{problem}; nothing was cached")


# ---------------------------------------------------------------------------------------------------------------------
# Output files: temporary names that identify their writer, removal of stale ones, and up-front writability checks.
#
# Every atomic write goes to '<name>.tmp-<host>-<pid>-<random>' beside its target and is renamed into place when
# complete. A writer killed with SIGKILL leaves its temporary file behind; the next run of the same command removes
# the ones whose process is gone (remove_stale_temp_files). Files of live processes (other ranks, other runs) and of
# other hosts (a shared file system: their processes cannot be checked from here) are never touched.

_TEMP_NAME_RE = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>[0-9]+)-[0-9a-f]{8}$")


def _host_tag() -> str:
    """This host's name with everything but letters, digits, '_' and '.' replaced (so that '-' separates fields)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "localhost"


# The longest file name most file systems take (ext4, XFS, tmpfs, NTFS: 255 bytes), and what temp_path adds to a name
# at most: '.' (hidden), '.tmp-', a 64-character host tag, '-', a 10-digit pid, '-', 8 hex digits.
NAME_MAX = 255
_TEMP_SUFFIX_MAX = 1 + len(".tmp-") + 64 + 1 + 10 + 1 + 8


def temp_prefix(path: str, hidden: bool = False) -> str:
    """The start of every temp_path(path, hidden) name, up to and including '.tmp-' (remove_stale_temp_files' prefix).

    A name too long to take the suffix within NAME_MAX is cut (at a character boundary): the target of a legal name
    such as a 240-byte --out failed with 'File name too long' for its temporary file alone, after all the work."""
    return f"{'.' if hidden else ''}{cut_name(os.path.basename(path), NAME_MAX - _TEMP_SUFFIX_MAX)}.tmp-"


def cut_name(name: str, max_bytes: int) -> str:
    """`name` cut to at most `max_bytes` bytes as the file system stores it, at a character boundary."""
    encoded = os.fsencode(name)
    if len(encoded) <= max_bytes:
        return name
    return os.fsdecode(encoded[:max_bytes].decode("utf-8", "ignore").encode("utf-8"))


def temp_path(path: str, hidden: bool = False) -> str:
    """A temporary name beside `path` naming this process: '<path>.tmp-<host>-<pid>-<8 hex>'.

    hidden=True prefixes the file name with '.', so that listings of the folder (e.g. `ls`) skip it. A long name is
    cut to fit (temp_prefix).
    """
    name = f"{temp_prefix(path, hidden)}{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return os.path.join(os.path.dirname(path), name)


def process_is_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host. In doubt (no permission to ask, Windows): True."""
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def is_stale_temp_name(name: str) -> bool:
    """True for a temp_path() name written by a process of this host that no longer runs."""
    match = _TEMP_NAME_RE.search(name)
    return match is not None and match.group("host") == _host_tag() and not process_is_alive(int(match.group("pid")))


def remove_stale_temp_files(directory: str, prefix: str = "") -> list[str]:
    """Remove the temporary files and folders of dead writers (see is_stale_temp_name) directly in `directory`.

    prefix: only names that start with it (e.g. 'out.json.tmp-'). Returns the removed paths. A missing folder, an
    entry removed meanwhile by another process, or one that cannot be removed is left as it is without error.
    """
    try:
        entries = [entry for entry in os.scandir(directory) if entry.name.startswith(prefix) and ".tmp-" in entry.name]
    except OSError:
        return []
    removed = []
    for entry in entries:
        if not is_stale_temp_name(entry.name):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.remove(entry.path)
            removed.append(entry.path)
        except OSError:
            pass
    return removed


class OutputPathError(OSError):
    """An output that cannot be written; str() is one line naming the option or file and why."""


def write_error(path: str, err: OSError) -> OutputPathError:
    """The OutputPathError for a failed write of `path` (a full disk: 'cannot write PATH (No space left on device)')."""
    return OutputPathError(f"cannot write {path} ({err.strerror or err})")


def expand_user(path: str | None) -> str | None:
    """`path` with a leading ~ expanded; None stays None. The shell expands no ~ after '=' (--out=~/x)."""
    return None if path is None else os.path.expanduser(path)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


def concise_warnings() -> None:
    """Show warnings as one line, 'file:line: Category: message', for the command-line tools: Python's default adds
    the warning's source line (e.g. `return func(*args, **kwargs)`), which in a command's output reads like a
    traceback."""
    warnings.formatwarning = _one_line_warning


def run_cli(command) -> None:
    """Run a click command as a command-line tool: warnings in one line (concise_warnings), and under torchrun a usage
    error (a bad option, a missing file it names) printed by each node's local rank 0 only. Every rank parses the same
    command line on the same file system, so 8 GPUs printed the same error 8 times; the other ranks exit with the same
    code (2) in silence. Other errors are still printed by every rank that meets them: they can differ between ranks.
    Otherwise as click's standalone mode: exit codes, 'Aborted!' on Ctrl-C at a prompt."""
    import click
    concise_warnings()
    try:
        code = command.main(standalone_mode=False)
    except click.UsageError as err:
        if os.environ.get("LOCAL_RANK", "0") in ("", "0"):
            err.show()
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    # A command's return value, or the code of a ctx.exit() (--help: 0).
    sys.exit(code if isinstance(code, int) else 0)


def check_output_path(path: str, option: str, is_dir: bool = False) -> None:
    """Fail early, before any work, when `path` cannot be written; the error names `option` (e.g. '--outdir').

    is_dir=False: `path` is a file to create or replace; is_dir=True: a folder to create or write into. Missing
    folders on the way are fine when the nearest existing one is a writable folder (they are created later by the
    writer; nothing is created here). Checks that no name on the way is longer than NAME_MAX, that the kinds match
    (a folder is not a file name and vice versa), that a file can be created there (a probe file, removed at once)
    and that the disk is not full.
    Raises OutputPathError.
    """
    if not isinstance(path, str) or path == "":
        raise OutputPathError(f"{option}: expected a {'folder' if is_dir else 'file'} path, got {path!r}")
    target = os.path.abspath(path)
    too_long = [name for name in target.split(os.sep) if len(os.fsencode(name)) > NAME_MAX]
    if too_long:
        raise OutputPathError(f"{option}: {path}: the name {too_long[0][:40]}... is {len(os.fsencode(too_long[0]))} "
                              f"bytes long; file systems take at most {NAME_MAX}")
    if os.path.isdir(target) and not is_dir:
        raise OutputPathError(f"{option}: {path} is a folder; expected a file name")
    if os.path.exists(target) and not os.path.isdir(target) and is_dir:
        raise OutputPathError(f"{option}: {path} exists and is not a folder")
    directory = target if is_dir else os.path.dirname(target)
    while not os.path.exists(directory):
        directory = os.path.dirname(directory)
    if not os.path.isdir(directory):
        raise OutputPathError(f"{option}: cannot create {path}: {directory} is a file, not a folder")
    probe = temp_path(os.path.join(directory, "write-test"), hidden=True)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.remove(probe)
    except OSError as err:
        raise OutputPathError(f"{option}: cannot write to {directory} ({err.strerror or err})") from err
    if shutil.disk_usage(directory).free == 0:
        raise OutputPathError(f"{option}: cannot write to {directory} (no space left on device)")


def same_file(path: str, other: str) -> bool:
    """Whether both paths name one existing file (through links, '~' expanded); False for a URL, a missing file or
    None (a resumed run's option that was not given then: --resume with --init passed a traceback)."""
    if path is None or other is None:
        return False
    try:
        return os.path.samefile(os.path.expanduser(path), os.path.expanduser(other))
    except (OSError, ValueError):
        return False


def check_output_not_input(path: str, option: str, inputs) -> None:
    """OutputPathError when the output `path` is one of the `inputs`' files ((option, path) pairs; None skipped),
    which the output would replace: a slip such as fid.py calc --out=ref.npz replaced the reference with the JSON."""
    for input_option, input_path in inputs:
        if input_path is not None and same_file(path, input_path):
            raise OutputPathError(f"{option} {path} is the {input_option} file, which the results would replace; "
                                  f"choose another {option}")


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "wb"):
    """Write to a temporary file beside `path` and rename it into place on success; remove it on failure.

    The temporary name identifies this process (temp_path); stale temporary files of dead writers of the same
    `path` are removed first. An OSError while creating, writing or renaming becomes an OutputPathError naming
    `path` (e.g. 'cannot write out.json: No space left on device').
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"cannot write {path}: cannot create folder {directory} ({err.strerror or err})") \
            from err
    remove_stale_temp_files(directory, prefix=temp_prefix(path))
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if isinstance(err, OutputPathError) or err.filename not in (None, tmp):
            raise  # not an error of writing this file (e.g. reading another one inside the block)
        raise write_error(path, err) from err
    except RuntimeError as err:
        # torch.save into `f`: its zip writer, closed while a write error is raised, raises its own RuntimeError
        # ('unexpected pos 704 vs 598') over the OSError, which train.py then printed as a traceback.
        cause = err.__context__
        if not isinstance(cause, OSError) or cause.filename not in (None, tmp):
            raise
        raise write_error(path, cause) from err
    finally:
        try:
            os.remove(tmp)
        except OSError:
            pass  # renamed into place, or never created


def file_sha256(path_or_url: str) -> str | None:
    """sha256 of a local file or of a URL's cached download (provenance in result files); None when not local."""
    try:
        path = open_url(path_or_url, return_filename=True, verbose=False)
    except (OSError, ValueError):
        return None
    if not os.path.isfile(path):
        return None
    return _hash_file(path, "sha256")
