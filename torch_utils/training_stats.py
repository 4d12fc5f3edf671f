"""Scalar statistics reported on every rank, reduced across ranks, written as stats.jsonl lines.

`report(name, value)` may be called from anywhere (losses, the loop) with a Python number or a tensor of any
shape; every element counts as one observation. It only accumulates [count, sum, sum of squares] in float64 on
the value's device: no host-device sync. `Collector.update()` (once per tick) moves the accumulators to the
reduction device, all-reduces them across ranks and exposes num/mean/std per name, as EDM does.

Names must be reported in the same set on every rank before `update()`: ranks exchange the list of names first,
so a name reported on only some ranks still reduces correctly (with zero counts elsewhere).
"""

import json
import os
import re
import threading
import time

import torch

import dnnlib.util

from . import distributed

_lock = threading.Lock()
_accumulators: dict[str, torch.Tensor] = {}  # name -> float64 [3] tensor: count, sum, sum of squares
_counters: dict[str, torch.Tensor] = {}  # cumulative totals, on CPU
_collectors: list["Collector"] = []


def report(name: str, value) -> object:
    """Accumulate the elements of `value` under `name`; returns `value` unchanged so it can be used inline."""
    if isinstance(value, torch.Tensor):
        elems = value.detach().flatten().to(torch.float64)
    else:
        elems = torch.as_tensor(value, dtype=torch.float64).flatten()
    if elems.numel() == 0:
        return value
    # The same three sums with one value-sized float64 temporary instead of three: the count is the element count
    # (exact in float64 below 2**53), filled on the device (no host-to-device copy), not the sum of an all-ones
    # tensor; the squares overwrite the float64 copy once its sum is taken (a copy whenever `value` is not float64).
    count = torch.full([], elems.numel(), dtype=torch.float64, device=elems.device)
    total = elems.sum()
    converted = isinstance(value, torch.Tensor) and value.dtype != torch.float64  # elems is then our own copy
    squares = elems.square_() if converted else elems.square()
    moments = torch.stack([count, total, squares.sum()])
    with _lock:
        acc = _accumulators.get(name)
        if acc is None:
            _accumulators[name] = moments
        elif acc.device == moments.device:
            acc.add_(moments)
        else:
            _accumulators[name] = acc.to(moments.device) + moments
    return value


def bin_names(prefix: str, edges) -> list[str]:
    """The names report_binned uses for the len(edges) + 1 bins of `edges`: '<prefix><e0', '<prefix>e0-e1', ...,
    '<prefix>>eN' (edges printed with %g)."""
    edges = [float(e) for e in edges]
    return ([f'{prefix}<{edges[0]:g}'] + [f'{prefix}{lo:g}-{hi:g}' for lo, hi in zip(edges[:-1], edges[1:])]
            + [f'{prefix}>{edges[-1]:g}'])


_BOUNDARIES: dict = {}


def _boundaries(edges: tuple, device: torch.device) -> torch.Tensor:
    """The edges as a float64 tensor on `device`, made once: a tensor built from Python numbers on a GPU is a
    blocking host-to-device copy, which every training step would otherwise make."""
    key = (edges, str(device))
    if key not in _BOUNDARIES:
        _BOUNDARIES[key] = torch.tensor(edges, dtype=torch.float64, device=device)
    return _BOUNDARIES[key]


def report_binned(prefix: str, values: torch.Tensor, keys: torch.Tensor, edges) -> None:
    """Accumulate each value under the name of the bin its key falls in (bins split at the increasing `edges`,
    a value equal to an edge goes to the bin above it). Every bin is reported, empty ones with no observations, so
    all ranks report the same names. No host sync: the bins are counted with one-hot sums on the values' device."""
    values = values.detach().flatten().to(torch.float64)
    keys = keys.detach().flatten().to(values.device, torch.float64)
    boundaries = _boundaries(tuple(float(e) for e in edges), values.device)
    one_hot = torch.nn.functional.one_hot(torch.bucketize(keys, boundaries, right=True),
                                          len(boundaries) + 1).to(torch.float64)  # [N, bins]
    moments = torch.stack([one_hot.sum(0), values @ one_hot, values.square() @ one_hot], dim=1)  # [bins, 3]
    with _lock:
        for name, bin_moments in zip(bin_names(prefix, edges), moments):
            acc = _accumulators.get(name)
            if acc is None:
                _accumulators[name] = bin_moments.clone()
            elif acc.device == bin_moments.device:
                acc.add_(bin_moments)
            else:
                _accumulators[name] = acc.to(bin_moments.device) + bin_moments


def report0(name: str, value) -> object:
    """report() on rank 0 only; other ranks register the name with no observations."""
    if distributed.get_rank() == 0:
        return report(name, value)
    with _lock:
        _accumulators.setdefault(name, torch.zeros(3, dtype=torch.float64))
    return value


def _reduction_device() -> torch.device:
    # NCCL reduces CUDA tensors; gloo and the single process use the CPU.
    if distributed.is_distributed() and torch.distributed.get_backend() == "nccl":
        return distributed.device()
    return torch.device("cpu")


def _flush_accumulators() -> None:
    """Move this rank's accumulators into the cumulative counters, summed over ranks."""
    with _lock:
        local = dict(_accumulators)
        _accumulators.clear()
    names = sorted(local)
    if distributed.get_world_size() > 1:
        gathered = [None] * distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, names)
        names = sorted(set().union(*gathered))
    if not names:
        return
    dev = _reduction_device()
    stacked = torch.stack([local[n].to(dev) if n in local else torch.zeros(3, dtype=torch.float64, device=dev)
                           for n in names])
    distributed.all_reduce_sum_(stacked)
    stacked = stacked.cpu()
    for name, moments in zip(names, stacked):
        if name not in _counters:
            _counters[name] = torch.zeros(3, dtype=torch.float64)
        _counters[name] += moments
        for c in _collectors:
            c._pending.setdefault(name, torch.zeros(3, dtype=torch.float64)).add_(moments)


class Collector:
    """Collects the statistics reported since the previous `update()`, across all ranks.

    regex: only names matching it are kept. keep_previous: report the last values for names with no new data.
    """

    def __init__(self, regex: str = ".*", keep_previous: bool = True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._pending: dict[str, torch.Tensor] = {}
        self._moments: dict[str, torch.Tensor] = {}
        _collectors.append(self)

    def names(self) -> list[str]:
        return sorted(self._moments)

    def update(self) -> None:
        """Collective: every rank must call it at the same point."""
        _flush_accumulators()
        new = {n: m for n, m in self._pending.items() if self._regex.fullmatch(n)}
        self._pending = {}
        if not self._keep_previous:
            self._moments = {}
        for name, m in new.items():
            if m[0] > 0 or name not in self._moments:
                self._moments[name] = m.clone()

    def num(self, name: str) -> int:
        m = self._moments.get(name)
        return int(m[0]) if m is not None else 0

    def mean(self, name: str) -> float:
        m = self._moments.get(name)
        if m is None or m[0] == 0:
            return float("nan")
        return float(m[1] / m[0])

    def std(self, name: str) -> float:
        m = self._moments.get(name)
        if m is None or m[0] == 0:
            return float("nan")
        mean = m[1] / m[0]
        return float(torch.sqrt(torch.clamp(m[2] / m[0] - mean.square(), min=0)))

    def as_dict(self) -> dict:
        """{name: {num, mean, std}} as in EDM's stats.jsonl."""
        return {n: dict(num=self.num(n), mean=self.mean(n), std=self.std(n)) for n in self.names()}

    def __getitem__(self, name: str) -> float:
        return self.mean(name)

    def close(self) -> None:
        if self in _collectors:
            _collectors.remove(self)


def cumulative(name: str) -> dict:
    """All observations of `name` since the process started, reduced across ranks at each update()."""
    m = _counters.get(name)
    if m is None or m[0] == 0:
        return dict(num=0, mean=float("nan"), std=float("nan"))
    mean = m[1] / m[0]
    return dict(num=int(m[0]), mean=float(mean), std=float(torch.sqrt(torch.clamp(m[2] / m[0] - mean**2, min=0))))


def write_jsonl_line(file, collector: Collector) -> None:
    """Append one stats.jsonl line: {name: {num, mean, std}, ..., "timestamp": t}. A failed write (a full disk) raises
    an OutputPathError naming the file; the line it cut short is one that filter_jsonl's callers drop."""
    line = collector.as_dict()
    line["timestamp"] = time.time()
    try:
        file.write(json.dumps(line) + "\n")
        file.flush()
    except OSError as err:
        raise dnnlib.util.write_error(file.name, err) from err


def filter_jsonl(path: str, keep) -> int:
    """Rewrite the JSON-lines file `path` atomically with the lines whose record `keep(record, number, is_last)`
    accepts (what a resume does to the stats of the steps it repeats). `record` is None for a line that does not parse
    as an object, e.g. the line being written when a run was killed; `keep` may raise to refuse the file. Returns how
    many lines were dropped (0: the file is left as it is, also when it does not exist)."""
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        lines = [line for line in f.read().split(b"\n") if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if keep(record if isinstance(record, dict) else None, number, number == len(lines)):
            kept.append(line)
    if len(kept) != len(lines):
        with dnnlib.util.atomic_output(path, "wb") as f:
            f.write(b"".join(line + b"\n" for line in kept))
    return len(lines) - len(kept)


def reset() -> None:
    """Forget everything (tests)."""
    with _lock:
        _accumulators.clear()
    _counters.clear()
    for c in list(_collectors):
        c._pending = {}
        c._moments = {}


default_collector = Collector()
