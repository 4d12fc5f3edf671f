"""A run directory at a glance: one PNG drawn from stats.jsonl (and any metric JSONs) with Pillow only.

Panels (those without data are left out): the training loss per tick; the loss by noise-level bin
('Loss/sigma...', what EDM2 looks at first when a run misbehaves); the learning rate; non-finite steps per tick; and
every metric found in `*.json` result files of fid.py (`fid.py calc --out`, or `calc --network=RUN_DIR`'s beside each
snapshot, with the snapshot's kimg in the network name, or in the generation.json of the images measured) over
kimg. `python report.py --run DIR` writes DIR/report.png; `--run A --run B --out compare.png` draws several runs on
shared axes. A resumed run's statistics and metrics begin with those of the runs it continued (training.run_chain).
"""

import glob
import json
import math
import os
import re

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from training.run_chain import run_chain

PANEL_SIZE = (560, 300)
MARGIN = dict(left=70, right=170, top=30, bottom=40)
# matplotlib's tab10, then tab20's light shades (runs compared side by side: two runs' noise-level bins are 16 lines)
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
          (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
          (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229)]
BACKGROUND, INK, GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)
LEGEND_ROW = 16  # pixels per legend line
LEGEND_MIN_ROW = 12  # ... when there are more lines than fit at LEGEND_ROW (the default font is 11 pixels tall)


def _fit_text(draw, text: str, font, room: float) -> str:
    """`text`, cut with '...' in the middle where it is wider than `room` pixels (its end names the series: 'sigma
    5-20', 'fid50k_full')."""
    if draw.textlength(text, font=font) <= room:
        return text
    head, tail = text[:len(text) // 2], text[len(text) // 2:]
    while (head or tail) and draw.textlength(head + '...' + tail, font=font) > room:
        head, tail = (head[:-1], tail) if len(head) >= len(tail) else (head, tail[1:])
    return head + '...' + tail


def read_stats(path: str) -> list[dict]:
    """The stats.jsonl lines; a line cut short by a killed run (or any line that is not a JSON object) is skipped."""
    lines = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):  # anything else is not a tick's statistics
                lines.append(record)
    return lines


def series(lines: list[dict], name: str, field: str = 'mean', fresh_only: bool = False) -> tuple[list[float],
                                                                                             list[float]]:
    """(kimg, value) of a stats name over the lines that have it (and a finite value). fresh_only: leave out a line
    that repeats the previous line's statistics of the name exactly: stats.jsonl carries a name's last values on
    through ticks without observations (EDM's collector), e.g. a noise-level bin no sample fell into."""
    xs, ys, previous = [], [], None
    for line in lines:
        if isinstance(line.get(name), dict) and isinstance(line.get('Progress/kimg'), dict):
            value = line[name].get(field)
            repeated, previous = fresh_only and line[name] == previous, line[name]
            if isinstance(value, (int, float)) and math.isfinite(value) and not repeated:
                xs.append(line['Progress/kimg']['mean'])
                ys.append(value)
    return xs, ys


_NETWORK_KIMG_RE = re.compile(r'network-(snapshot|phema)-(\d+)(?:-(\d+\.\d+))?\.pkl')


# fid.py's result keys -> (panel, the record's label key, the series' suffix); the spreads (is_std, kid_std) are not
# drawn. Each kind of metric gets its own panel: FID, IS, precision/recall and KID have different scales.
_METRIC_KEYS = {'fid': ('FID', 'fid', ''), 'is_mean': ('Inception Score', 'is', ''),
                'precision': ('precision / recall', 'pr', ' precision'),
                'recall': ('precision / recall', 'pr', ' recall'), 'kid': ('KID', 'kid', '')}
_SPREADS = ('is_std', 'kid_std')


def _metric_points(run_dir: str, skipped: list | None, chain: list | None = None) -> dict[tuple[str, str], list]:
    """{(panel title, series name): [(kimg, value), ...]} from fid.py result JSONs in the run directory, the kimg
    from the network's file name: `fid.py calc --network`'s, or for `calc --images` that of the generate.py run that
    made the images (its generation.json names the network, and fid.py's record keeps it). A series is one metric
    label (fid50k_full and fid10k_full are different measurements), one post-hoc EMA width (network-phema-KIMG-STD.pkl:
    'fid50k_full (phema 0.100)') and, when the run's results come from several samplers, one sampler. Result files
    with no network kimg are appended to `skipped`. A resumed run's points begin with those of the runs it continued
    (run_chain), each up to the kimg it was resumed from; at the same kimg the later run's points (within one run,
    every result file's: two measurements of one snapshot, e.g. with other seeds, are both drawn)."""
    records = []
    chain = run_chain(run_dir, 'statistics and results') if chain is None else chain
    paths = [(path, limit, position) for position, (directory, limit) in enumerate(chain)
             for path in sorted(glob.glob(os.path.join(glob.escape(directory), '*.json')))]
    for path, limit, position in paths:
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or not isinstance(record.get('results'), dict):
            continue
        match = _NETWORK_KIMG_RE.search(json.dumps(record.get('source', record)))
        if match is None:
            if skipped is not None:
                skipped.append(path)
            continue
        if limit is not None and int(match.group(2)) > limit:  # past the state the next run resumed from
            continue
        source = record.get('source')
        sampler = source.get('sampler') if isinstance(source, dict) and isinstance(source.get('sampler'), str) else None
        records.append((record, match, sampler, position))
    several_samplers = len({sampler for _, _, sampler, _ in records if sampler is not None}) > 1
    # {kimg: (position in the chain, [values])}: a later run's points replace an earlier one's
    points: dict[tuple[str, str], dict] = {}
    for record, match, sampler, position in records:
        labels = record.get('labels') if isinstance(record.get('labels'), dict) else {}
        suffix = f' (phema {match.group(3)})' if match.group(1) == 'phema' else ''
        if several_samplers and sampler is not None:
            suffix += f' [{sampler.split(";")[0][:48]}]'
        for key, value in record['results'].items():
            if key in _SPREADS or not (isinstance(value, (int, float)) and math.isfinite(value)):
                continue
            title, label_key, what = _METRIC_KEYS.get(key, ('metrics', key, ''))
            name = str(labels.get(label_key, label_key if key in _METRIC_KEYS else key)) + what + suffix
            at_kimg = points.setdefault((title, name), {})
            kimg = int(match.group(2))
            if kimg not in at_kimg or at_kimg[kimg][0] < position:
                at_kimg[kimg] = (position, [])
            at_kimg[kimg][1].append(float(value))
    return {key: [(kimg, value) for kimg, (_, values) in sorted(at_kimg.items()) for value in values]
            for key, at_kimg in points.items()}


def metric_series(run_dir: str, skipped: list | None = None) -> dict[str, tuple[list[float], list[float]]]:
    """{series name: (kimg, value)} of `_metric_points`, the panels left out."""
    return {name: ([k for k, _ in sorted(p)], [v for _, v in sorted(p)])
            for (_, name), p in _metric_points(run_dir, skipped).items()}


def metric_panels(run_dir: str, skipped: list | None = None, chain: list | None = None) -> list['Panel']:
    """One panel per kind of metric (FID, IS, precision/recall, KID), in that order."""
    panels: dict[str, Panel] = {}
    for (title, name), p in sorted(_metric_points(run_dir, skipped, chain).items(),
                                   key=lambda item: (list(_PANEL_ORDER).index(item[0][0])
                                                     if item[0][0] in _PANEL_ORDER else 99, item[0][1])):
        panel = panels.setdefault(title, Panel(f'{title} (fid.py result files)'))
        panel.add(name, [k for k, _ in sorted(p)], [v for _, v in sorted(p)])
    return list(panels.values())


_PANEL_ORDER = ('FID', 'Inception Score', 'precision / recall', 'KID', 'metrics')


class Panel:
    """One chart: axes with a few ticks, polylines (or bars), a legend on the right."""

    def __init__(self, title: str, log_y: bool = False, bars: bool = False):
        self.title, self.log_y, self.bars = title, log_y, bars
        self.lines: list[tuple[str, list[float], list[float]]] = []
        self.colors: dict[int, tuple] = {}  # a line's colour where it is not COLORS[its index] (compare_panels)

    def add(self, label: str, xs, ys) -> None:
        points = [(x, y) for x, y in zip(xs, ys) if not self.log_y or y > 0]
        if points:
            self.lines.append((label, [p[0] for p in points], [p[1] for p in points]))

    def draw(self, image: PIL.Image.Image, origin: tuple[int, int], font) -> None:
        draw = PIL.ImageDraw.Draw(image)
        x0, y0 = origin[0] + MARGIN['left'], origin[1] + MARGIN['top']
        x1, y1 = origin[0] + PANEL_SIZE[0] - MARGIN['right'], origin[1] + PANEL_SIZE[1] - MARGIN['bottom']
        draw.text((x0, origin[1] + 8), self.title, fill=INK, font=font)
        all_x = [x for _, xs, _ in self.lines for x in xs]
        all_y = [self._y(y) for _, _, ys in self.lines for y in ys]
        xmin, xmax = min(all_x), max(all_x)
        ymin, ymax = min(all_y), max(all_y)
        if self.bars:  # counts: from zero, and at least one unit tall
            ymin, ymax = 0.0, max(ymax, 1.0)
        if xmax == xmin:
            xmin, xmax = xmin - 0.5, xmax + 0.5
        if ymax == ymin:  # a constant (a learning rate after its ramp): +-10% around it, not +-0.5
            half = abs(ymin) * 0.1 or 0.5
            ymin, ymax = ymin - half, ymax + half
        pad = (ymax - ymin) * 0.05
        ymin, ymax = ymin if self.bars or (ymin >= 0 > ymin - pad) else ymin - pad, ymax + pad

        def to_pixel(x, y):
            return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (self._y(y) - ymin) / (ymax - ymin) * (y1 - y0))

        for i in range(5):  # grid and tick labels
            fy = ymin + (ymax - ymin) * i / 4
            py = y1 - (y1 - y0) * i / 4
            draw.line([(x0, py), (x1, py)], fill=GRID)
            label = f'{10 ** fy:.3g}' if self.log_y else f'{fy:.3g}'
            draw.text((x0 - 6, py), label, fill=INK, font=font, anchor='rm')
            fx = xmin + (xmax - xmin) * i / 4
            px = x0 + (x1 - x0) * i / 4
            draw.line([(px, y0), (px, y1)], fill=GRID)
            draw.text((px, y1 + 6), f'{fx:.4g}', fill=INK, font=font, anchor='mt')
        draw.text(((x0 + x1) / 2, y1 + 22), 'kimg', fill=INK, font=font, anchor='mt')
        draw.rectangle([x0, y0, x1, y1], outline=INK)
        # Rows of the legend that fit beside the axes (one kept for "+N more" when there are more lines); closer rows
        # before that, down to LEGEND_MIN_ROW (two runs' noise-level bins are 16 lines).
        row_height = LEGEND_ROW if len(self.lines) * LEGEND_ROW <= y1 - y0 - 4 else max(
            LEGEND_MIN_ROW, (y1 - y0 - 4) // max(len(self.lines), 1))
        rows = int((y1 - y0 - 4) // row_height)
        legend_rows = len(self.lines) if len(self.lines) <= rows else rows - 1
        label_room = origin[0] + PANEL_SIZE[0] - (x1 + 36) - 4  # a longer label is cut, not drawn off the panel
        for index, (label, xs, ys) in enumerate(self.lines):
            color = self.colors.get(index, COLORS[index % len(COLORS)])
            points = [to_pixel(x, y) for x, y in zip(xs, ys)]
            if self.bars:
                # Several series (runs compared) side by side in each slot: drawn over each other, a taller bar
                # hid a shorter one of the same kimg.
                slot = max((x1 - x0) / max(len(points), 1) * 0.6, len(self.lines))
                width = slot / len(self.lines)
                base = to_pixel(xs[0], max(ymin, 0.0))[1] if not self.log_y else y1
                for px, py in points:  # inside the axes' box (the first and last slots sit on its edges)
                    left = min(max(px - slot / 2, x0), x1 - slot) + index * width
                    draw.rectangle([left, min(py, base), left + width, max(py, base)], fill=color)
            elif len(points) == 1:
                px, py = points[0]
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
            else:
                draw.line(points, fill=color, width=2)
            ly = y0 + 4 + index * row_height
            if index >= legend_rows:  # the legend's column is full: say how many more lines the chart has
                if index == legend_rows:
                    draw.text((x1 + 12, ly), f'+{len(self.lines) - legend_rows} more', fill=INK, font=font)
                continue
            draw.line([(x1 + 12, ly + 6), (x1 + 30, ly + 6)], fill=color, width=3)
            draw.text((x1 + 36, ly), _fit_text(draw, label, font, label_room), fill=INK, font=font)

    def _y(self, y: float) -> float:
        return math.log10(y) if self.log_y else y


def chain_stats(run_dir: str, chain: list | None = None) -> list[dict]:
    """The stats.jsonl lines of a run and of the runs it resumed from (training.run_chain), in training order: an
    earlier run's lines up to the state the next one resumed from, and before the next one's first line, so that a
    resumed run's report shows the whole training, not only the part since its last resume."""
    chain = run_chain(run_dir, 'statistics and results') if chain is None else chain
    own = os.path.join(run_dir, 'stats.jsonl')  # absent when resumed and stopped again before its first tick
    lines = read_stats(own) if os.path.isfile(own) else []
    for directory, limit in chain[-2::-1]:  # the predecessors, the latest first
        path = os.path.join(directory, 'stats.jsonl')
        if not os.path.isfile(path):
            continue
        start = min((_kimg(line) for line in lines if _kimg(line) is not None), default=math.inf)
        # training-state-N.pt holds the run at N <= kimg < N + 1, written at the end of the tick whose line is the
        # last one in that window (ticks are at least 1 kimg apart); the ticks the run trained after it, before it
        # stopped, are not the resumed run's history.
        end = start if limit is None else min(start, limit + 1)
        lines = [line for line in read_stats(path) if (_kimg(line) or 0) < end] + lines
    return lines


def _kimg(line: dict) -> float | None:
    value = line.get('Progress/kimg')
    value = value.get('mean') if isinstance(value, dict) else None
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def build_panels(run_dir: str, skipped: list | None = None) -> list[Panel]:
    chain = run_chain(run_dir, 'statistics and results')  # once: a missing predecessor is warned about once
    lines = chain_stats(run_dir, chain)
    panels = []
    loss = Panel('training loss (per element, mean over the tick)', log_y=True)
    for name in sorted({n for line in lines for n in line if n.startswith('Loss/') and not n.startswith(
            ('Loss/sigma', 'Loss/nonfinite', 'Loss/fp16_overflow'))}):
        loss.add(name[len('Loss/'):], *series(lines, name))
    by_sigma = Panel('loss by noise level (sigma bins)', log_y=True)
    bins = sorted({n for line in lines for n in line if n.startswith('Loss/sigma')}, key=_bin_order)
    for name in bins:
        by_sigma.add('sigma ' + name[len('Loss/sigma'):], *series(lines, name, fresh_only=True))
    lr = Panel('learning rate')
    lr.add('lr', *series(lines, 'Progress/lr'))
    nonfinite = Panel('non-finite steps per tick', bars=True)
    counts = []  # the fraction and the number of steps of one line together
    for line in lines:
        stat, kimg = line.get('Loss/nonfinite'), line.get('Progress/kimg')
        if isinstance(stat, dict) and isinstance(kimg, dict) and all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in (stat.get('mean'), stat.get('num'))):
            counts.append((kimg['mean'], round(stat['mean'] * stat['num'])))
    nonfinite.add('steps', [k for k, _ in counts], [n for _, n in counts])
    panels += [loss, by_sigma, lr, nonfinite]
    panels += metric_panels(run_dir, skipped, chain)
    return [panel for panel in panels if panel.lines]


def _bin_order(name: str) -> float:
    numbers = re.findall(r'[0-9.]+(?:e[-+]?\d+)?', name)
    value = float(numbers[0]) if numbers else 0.0
    return value - 1e-9 if '<' in name else value + 1e-9 if '>' in name else value


def run_labels(run_dirs: list[str]) -> list[str]:
    """Short names of runs in a comparison's legends: EDM's run numbers (00003 of 00003-cifar10-32x32-...), else,
    or where two runs share one, the folders' names."""
    paths = [os.path.abspath(run_dir) for run_dir in run_dirs]  # '.', '..' and a trailing slash named by the folder
    names = [os.path.basename(path) for path in paths]
    numbers = [match.group(1) if (match := re.match(r'(\d{5,})-', name)) else name for name in names]
    for short in (numbers, names):
        if len(set(short)) == len(short):
            return short
    # The same folder name in two --outdir (training-runs/00000-cifar10-... and runs-stf/00000-cifar10-...): as many
    # trailing path components as tell them apart.
    for last in (numbers, names):
        for depth in range(1, max(len(path.split(os.sep)) for path in paths)):
            tails = [os.sep.join([*path.split(os.sep)[:-1][-depth:], name]) for path, name in zip(paths, last)]
            if len(set(tails)) == len(tails):
                return tails
    return names


def compare_panels(run_dirs: list[str], skipped: list | None = None) -> list[Panel]:
    """The panels of several runs on shared axes: one chart per title, each series named by its run (run_labels)
    and its own name, the charts in the order they first appear."""
    merged: dict[str, Panel] = {}
    runs_of: dict[str, list[int]] = {}  # each chart's lines' run indices
    for run_index, (run_dir, label) in enumerate(zip(run_dirs, run_labels(run_dirs))):
        for panel in build_panels(run_dir, skipped):
            chart = merged.setdefault(panel.title, Panel(panel.title, log_y=panel.log_y, bars=panel.bars))
            chart.lines += [(f'{label} {name}', xs, ys) for name, xs, ys in panel.lines]
            runs_of.setdefault(panel.title, []).extend([run_index] * len(panel.lines))
    # A chart with one series per run draws each run in the run's colour (that of its loss): a run without metrics
    # does not shift the others' colours in the FID chart.
    for title, chart in merged.items():
        if len(set(runs_of[title])) == len(runs_of[title]):
            chart.colors = {index: COLORS[run % len(COLORS)] for index, run in enumerate(runs_of[title])}
    return list(merged.values())


def _check_stats(run_dir: str) -> None:
    stats = os.path.join(run_dir, 'stats.jsonl')
    if not os.path.isfile(stats) and not any(os.path.isfile(os.path.join(directory, 'stats.jsonl'))
                                             for directory, _ in run_chain(run_dir, 'statistics')[:-1]):
        if os.path.isfile(os.path.join(run_dir, 'training_options.json')):
            raise FileNotFoundError(f'{run_dir}: no stats.jsonl yet (a run writes it at the end of its first tick)')
        raise FileNotFoundError(f'{run_dir}: no stats.jsonl (not a training run directory?)')


def write_report(run_dir: str | list[str], out_path: str | None = None, columns: int = 2, log=print) -> str:
    """Draw the run's panels into one PNG (atomically); returns its path. Several runs (a list): their panels on
    shared axes (compare_panels), written to `out_path`, which is then required. Result JSONs whose kimg is unknown
    are named through `log`."""
    import dnnlib

    run_dirs = [run_dir] if isinstance(run_dir, str) else list(run_dir)
    if len(run_dirs) > 1 and out_path is None:
        raise ValueError(f'comparing {len(run_dirs)} runs: name the PNG to write (--out)')
    for directory in run_dirs:
        _check_stats(directory)
    skipped = []
    panels = build_panels(run_dirs[0], skipped) if len(run_dirs) == 1 else compare_panels(run_dirs, skipped)
    for path in skipped:
        log(f'Note: {path} is left out of the metrics panel: its source names no network-snapshot-KIMG.pkl (nor '
            f'images whose generation.json does)')
    if not panels:
        where = os.path.join(run_dirs[0], 'stats.jsonl') if len(run_dirs) == 1 else ', '.join(run_dirs)
        raise ValueError(f'{where}: no statistics to plot yet')
    rows = math.ceil(len(panels) / columns)
    image = PIL.Image.new('RGB', (PANEL_SIZE[0] * min(columns, len(panels)), PANEL_SIZE[1] * rows), BACKGROUND)
    font = PIL.ImageFont.load_default()
    for index, panel in enumerate(panels):
        row, col = divmod(index, columns)
        panel.draw(image, (col * PANEL_SIZE[0], row * PANEL_SIZE[1]), font)
    out_path = out_path or os.path.join(run_dirs[0], 'report.png')
    with dnnlib.util.atomic_output(out_path, 'wb') as f:
        image.save(f, format='png')
    return out_path
