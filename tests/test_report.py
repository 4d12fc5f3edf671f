"""report.py: a run directory's statistics as one PNG with the expected panels (issue 17)."""

import json

import numpy as np
import PIL.Image
import PIL.ImageFont
from click.testing import CliRunner

import report
from training import report as report_lib
from training.report import COLORS, MARGIN, PANEL_SIZE, build_panels


def _stats_line(kimg, loss, nonfinite, lr):
    line = {'Progress/kimg': {'num': 1, 'mean': kimg, 'std': 0}, 'Loss/loss': {'num': 64, 'mean': loss, 'std': 0.1},
            'Loss/nonfinite': {'num': 10, 'mean': nonfinite, 'std': 0}, 'Progress/lr': {'num': 1, 'mean': lr, 'std': 0}}
    for index, name in enumerate(['Loss/sigma<0.05', 'Loss/sigma0.05-0.2', 'Loss/sigma>20']):
        line[name] = {'num': 8, 'mean': loss * (index + 1), 'std': 0}
    return line


def test_report_draws_every_panel(tmp_path):
    with open(tmp_path / 'stats.jsonl', 'w') as f:
        for tick in range(6):
            f.write(json.dumps(_stats_line(tick * 1.5, 1 / (tick + 1), 0.2 if tick == 3 else 0.0,
                                           1e-3 * min(tick / 3, 1))) + '\n')
        f.write('{"cut short by a kil')  # a killed run's last line is skipped
    for kimg, fid in [(2, 40.0), (6, 25.0)]:
        (tmp_path / f'fid-{kimg}.json').write_text(json.dumps({
            'results': {'fid': fid}, 'source': {'network': f'run/network-snapshot-{kimg:06d}.pkl'}}))
    panels = build_panels(str(tmp_path))
    assert [p.title.split(' (')[0] for p in panels] == ['training loss', 'loss by noise level', 'learning rate',
                                                         'non-finite steps per tick', 'FID']
    assert panels[3].lines[0][2] == [0, 0, 0, 2, 0, 0]  # fraction x steps -> counts per tick
    assert panels[4].lines == [('fid', [2, 6], [40.0, 25.0])]

    result = CliRunner().invoke(report.main, ['--run', str(tmp_path)])
    assert result.exit_code == 0, result.output
    image = np.asarray(PIL.Image.open(tmp_path / 'report.png').convert('RGB')).astype(int)
    assert image.shape == (3 * PANEL_SIZE[1], 2 * PANEL_SIZE[0], 3)
    for index in range(5):
        row, col = divmod(index, 2)
        top, left = row * PANEL_SIZE[1] + MARGIN['top'], col * PANEL_SIZE[0] + MARGIN['left']
        plot = image[top + 2:(row + 1) * PANEL_SIZE[1] - MARGIN['bottom'] - 2,
                     left + 2:(col + 1) * PANEL_SIZE[0] - MARGIN['right'] - 2]
        first_series = (np.abs(plot - np.array(COLORS[0])).sum(axis=2) < 30).sum()
        assert first_series > 20, f'panel {index} has no data drawn'
    # The empty sixth cell stays blank.
    assert (image[2 * PANEL_SIZE[1]:, PANEL_SIZE[0]:] == 255).all()


def test_report_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(report.main, ['--run', str(tmp_path)])
    assert result.exit_code == 1 and 'no stats.jsonl' in result.output
    (tmp_path / 'stats.jsonl').write_text('')
    result = CliRunner().invoke(report.main, ['--run', str(tmp_path)])
    assert result.exit_code == 1 and 'no statistics to plot yet' in result.output


def test_loss_by_noise_level_leaves_out_ticks_without_samples_in_a_bin(tmp_path):
    # stats.jsonl repeats a name's last statistics through ticks without observations: the bin '>20' had samples in
    # tick 0 only, and its later lines are that tick's again. A bin observed every tick keeps all its points, even
    # a value equal to the last one's with another count.
    lines = [_stats_line(kimg, 1.0 / (1 + kimg), 0.0, 1e-3) for kimg in (0.0, 1.0, 2.0)]
    for line in lines:
        line['Loss/sigma>20'] = {'num': 1, 'mean': 5.0, 'std': 0}
    lines[2]['Loss/sigma<0.05'] = {'num': 9, 'mean': 0.5, 'std': 0}
    with open(tmp_path / 'stats.jsonl', 'w') as f:
        f.writelines(json.dumps(line) + '\n' for line in lines)
    by_sigma = {label: (xs, ys) for label, xs, ys in build_panels(str(tmp_path))[1].lines}
    assert by_sigma['sigma >20'] == ([0.0], [5.0])
    assert by_sigma['sigma <0.05'] == ([0.0, 1.0, 2.0], [1.0, 0.5, 0.5])


def test_metrics_of_generated_folders_and_phema_reconstructions_find_their_kimg(tmp_path):
    # fid.py calc --images=FOLDER keeps the network that generation.json names; a post-hoc EMA reconstruction is a
    # series of its own; a result without a network kimg is named, not silently dropped.
    with open(tmp_path / 'stats.jsonl', 'w') as f:
        f.write(json.dumps(_stats_line(1.0, 0.5, 0.0, 1e-3)) + '\n')
    records = {'fid-images.json': {'images': 'fid-tmp', 'num': 16, 'seed': None,
                                   'network': '/runs/00000-x/network-snapshot-000004.pkl'},
               'fid-net.json': {'network': 'network-snapshot-000002.pkl'},
               'fid-phema.json': {'network': '/runs/00000-x/network-phema-000004-0.100.pkl'},
               'fid-unknown.json': {'images': 'somewhere', 'num': 16, 'seed': None}}
    for index, (name, source) in enumerate(records.items()):
        (tmp_path / name).write_text(json.dumps({'results': {'fid': 10.0 + index}, 'source': source}))
    metrics = {label: (xs, ys) for label, xs, ys in build_panels(str(tmp_path))[-1].lines}
    assert metrics == {'fid': ([2, 4], [11.0, 10.0]), 'fid (phema 0.100)': ([4], [12.0])}
    result = CliRunner().invoke(report.main, ['--run', str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f'Note: {tmp_path / "fid-unknown.json"} is left out of the metrics panel' in result.output
    assert 'fid-images.json is left' not in result.output


def test_metrics_are_found_in_a_run_folder_named_with_glob_characters(tmp_path):
    # A run under a sweep's --outdir=runs[lr=2e-4]: the folder is a path, not a glob pattern.
    run = tmp_path / 'sweep [lr=2e-4]'
    run.mkdir()
    with open(run / 'stats.jsonl', 'w') as f:
        f.write(json.dumps(_stats_line(1.0, 0.5, 0.0, 1e-3)) + '\n')
    (run / 'fid.json').write_text(json.dumps({'results': {'fid': 10.0},
                                              'source': {'network': 'network-snapshot-000002.pkl'}}))
    metrics = {label: (xs, ys) for label, xs, ys in build_panels(str(run))[-1].lines}
    assert metrics == {'fid': ([2], [10.0])}


def test_lines_that_are_not_statistics_are_skipped(tmp_path):
    # Valid JSON that is not a tick's object (or a stat that is not a dict) is skipped like a cut-short line; the
    # non-finite counts pair each tick's fraction with its own step count even when a tick has no steps (mean NaN).
    lines = [_stats_line(kimg, 1.0, 0.5, 1e-3) for kimg in (0.0, 1.0, 2.0)]
    lines[1]['Loss/nonfinite'] = {'num': 0, 'mean': float('nan'), 'std': float('nan')}
    lines[2]['Loss/nonfinite'] = {'num': 14, 'mean': 0.5, 'std': 0}
    with open(tmp_path / 'stats.jsonl', 'w') as f:
        f.writelines(json.dumps(line) + '\n' for line in lines)
        f.write('[1, 2]\nnull\n7\n{"Loss/loss": 5, "Progress/kimg": {"mean": 3.0}}\n')
    panels = {p.title.split(' (')[0]: p for p in build_panels(str(tmp_path))}
    assert panels['non-finite steps per tick'].lines == [('steps', [0.0, 2.0], [5, 7])]
    assert panels['training loss'].lines == [('loss', [0.0, 1.0, 2.0], [1.0, 1.0, 1.0])]


def test_a_run_before_its_first_tick_is_said_so(tmp_path):
    (tmp_path / 'training_options.json').write_text('{}')
    result = CliRunner().invoke(report.main, ['--run', str(tmp_path)])
    assert result.exit_code == 1
    assert 'no stats.jsonl yet (a run writes it at the end of its first tick)' in result.output


def test_a_resumed_run_reports_the_runs_it_continues(tmp_path, monkeypatch):
    # Each resume writes a new run directory: the report of the last one showed only the ticks since its resume.
    # A: kimg 0-4 (killed after its kimg-2 state), B resumed from A's kimg-2 state (2.5-5), C from B's (5.5-6).
    runs = {name: tmp_path / name for name in 'ABC'}
    for name, kimgs, resumed_from in (('A', [0, 1, 2, 3, 4], None), ('B', [2.5, 3.5, 4.5, 5], ('A', 2)),
                                      ('C', [5.5, 6], ('B', 5))):
        runs[name].mkdir()
        with open(runs[name] / 'stats.jsonl', 'w') as f:
            for kimg in kimgs:
                f.write(json.dumps(_stats_line(kimg, 1.0, 0.0, 1e-3)) + '\n')
        if resumed_from is not None:
            state = runs[resumed_from[0]] / f'training-state-{resumed_from[1]:06d}.pt'
            (runs[name] / 'training_options.json').write_text(json.dumps({'resume_state_dump': str(state)}))
    panels = build_panels(str(runs['C']))
    assert panels[2].lines[0][1] == [0, 1, 2, 2.5, 3.5, 4.5, 5, 5.5, 6]  # A's ticks to 2, B's to 5, then C's
    assert build_panels(str(runs['A']))[2].lines[0][1] == [0, 1, 2, 3, 4]
    monkeypatch.setenv('HOME', str(tmp_path))
    result = CliRunner().invoke(report.main, ['--run=~/C'])
    assert result.exit_code == 0 and (runs['C'] / 'report.png').is_file(), result.output
    # D resumed from C's kimg-6 state and was stopped before its first tick: no stats.jsonl of its own yet.
    runs['D'] = tmp_path / 'D'
    runs['D'].mkdir()
    (runs['D'] / 'training_options.json').write_text(json.dumps({'resume_state_dump': str(runs['C'] /
                                                                                        'training-state-000006.pt')}))
    assert build_panels(str(runs['D']))[2].lines[0][1] == [0, 1, 2, 2.5, 3.5, 4.5, 5, 5.5, 6]
    result = CliRunner().invoke(report.main, ['--run', str(runs['D'])])
    assert result.exit_code == 0 and (runs['D'] / 'report.png').is_file(), result.output
    # Real ticks: E trained on past its kimg-2 state (2.048 kimg, the tick that wrote it) to 4.096 before it was
    # killed; F resumed from that state, its first tick ending at 3.136. E's 3.072 is not F's history (it was drawn
    # before F's first tick, a kink at every resume).
    for name, kimgs, resumed_from in (('E', [1.024, 2.048, 3.072, 4.096], None), ('F', [3.136, 4.16], 'E')):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        (runs[name] / 'stats.jsonl').write_text(''.join(json.dumps(_stats_line(k, 1.0, 0.0, 1e-3)) + '\n'
                                                        for k in kimgs))
        if resumed_from:
            (runs[name] / 'training_options.json').write_text(json.dumps(
                {'resume_state_dump': str(runs[resumed_from] / 'training-state-000002.pt')}))
    assert build_panels(str(runs['F']))[2].lines[0][1] == [1.024, 2.048, 3.136, 4.16]


def test_a_constant_series_gets_a_narrow_axis_and_bars_stay_in_the_box(monkeypatch):
    import PIL.ImageDraw
    import PIL.ImageFont

    from training.report import Panel
    font = PIL.ImageFont.load_default()
    y_labels = []
    text = PIL.ImageDraw.ImageDraw.text

    def recording_text(self, xy, label, *args, **kwargs):
        if kwargs.get('anchor') == 'rm':  # the y axis' tick labels
            y_labels.append(float(label))
        return text(self, xy, label, *args, **kwargs)
    monkeypatch.setattr(PIL.ImageDraw.ImageDraw, 'text', recording_text)
    panel = Panel('learning rate')
    panel.add('lr', [0, 1, 2], [1e-3, 1e-3, 1e-3])
    panel.draw(PIL.Image.new('RGB', PANEL_SIZE, 'white'), (0, 0), font)
    assert len(y_labels) == 5 and 0.00085 < min(y_labels) < 0.001 < max(y_labels) < 0.00115, y_labels  # -0.549..0.551

    bars = Panel('non-finite steps per tick', bars=True)
    bars.add('steps', [0, 1, 2], [3, 1, 2])
    image = PIL.Image.new('RGB', PANEL_SIZE, 'white')
    bars.draw(image, (0, 0), font)
    colored = np.abs(np.asarray(image).astype(int) - np.array(COLORS[0])).sum(axis=2) < 30
    x0, x1 = MARGIN['left'], PANEL_SIZE[0] - MARGIN['right']
    assert colored[:, :x0].sum() == 0 and colored[:, x1 + 1:x1 + 10].sum() == 0 and colored.sum() > 100


def test_each_kind_of_metric_gets_a_panel_and_each_measurement_a_series(tmp_path):
    """FID, IS, precision/recall and KID have different scales (they shared one axis), and fid10k and fid1k at one
    kimg, or two samplers, are different measurements (they were joined into one line)."""
    def result(name, kimg, results, labels, sampler=None):
        source = {'network': f'/r/network-snapshot-{kimg:06d}.pkl', **({'sampler': sampler} if sampler else {})}
        (tmp_path / name).write_text(json.dumps({'results': results, 'labels': labels, 'source': source}))

    heun, euler = 'solver=heun() schedule=edm steps=18; 35 NFE per image', 'solver=euler() steps=3; 3 NFE per image'
    result('a.json', 2, {'fid': 30.0, 'is_mean': 5.0, 'is_std': 0.1, 'precision': 0.5, 'recall': 0.4, 'kid': 0.02,
                         'kid_std': 0.001}, {'fid': 'fid10k_full', 'is': 'is10k', 'pr': 'pr10k3_full',
                                             'kid': 'kid10k_full'}, heun)
    result('b.json', 4, {'fid': 20.0}, {'fid': 'fid10k_full'}, heun)
    result('c.json', 4, {'fid': 60.0}, {'fid': 'fid1k_full'}, heun)
    result('d.json', 4, {'fid': 90.0}, {'fid': 'fid10k_full'}, euler)
    panels = report_lib.metric_panels(str(tmp_path))
    assert [p.title for p in panels] == ['FID (fid.py result files)', 'Inception Score (fid.py result files)',
                                         'precision / recall (fid.py result files)', 'KID (fid.py result files)']
    assert panels[0].lines == [('fid10k_full [solver=euler() steps=3]', [4], [90.0]),
                               ('fid10k_full [solver=heun() schedule=edm steps=18]', [2, 4], [30.0, 20.0]),
                               ('fid1k_full [solver=heun() schedule=edm steps=18]', [4], [60.0])]
    assert [name for name, _, _ in panels[2].lines] == ['pr10k3_full precision [solver=heun() schedule=edm steps=18]',
                                                        'pr10k3_full recall [solver=heun() schedule=edm steps=18]']
    assert panels[1].lines == [('is10k [solver=heun() schedule=edm steps=18]', [2], [5.0])]  # no is_std series
    (tmp_path / 'd.json').unlink()  # one sampler: not named
    assert [name for name, _, _ in report_lib.metric_panels(str(tmp_path))[0].lines] == ['fid10k_full', 'fid1k_full']


def test_several_runs_are_drawn_on_shared_axes(tmp_path):
    """--run A --run B --out PNG: one chart per title, each series named by its run's number, from that run's data;
    without --out it is a usage error; a run without statistics is named."""
    runs = [tmp_path / '00003-cifar10-edm', tmp_path / '00004-cifar10-stf']
    for run, scale in zip(runs, (1.0, 2.0)):
        run.mkdir()
        with open(run / 'stats.jsonl', 'w') as f:
            for tick in range(4):
                f.write(json.dumps(_stats_line(tick, scale / (tick + 1), 0.0, 1e-3)) + '\n')
    (runs[1] / 'fid-2.json').write_text(json.dumps({'results': {'fid': 9.5}, 'labels': {'fid': 'fid10k_full'},
                                                   'source': {'network': 'network-snapshot-000002.pkl'}}))
    panels = report_lib.compare_panels([str(run) for run in runs])
    assert [p.title.split(' (')[0] for p in panels] == ['training loss', 'loss by noise level', 'learning rate',
                                                         'non-finite steps per tick', 'FID']
    assert panels[0].lines == [('00003 loss', [0, 1, 2, 3], [1.0, 1 / 2, 1 / 3, 1 / 4]),
                               ('00004 loss', [0, 1, 2, 3], [2.0, 1.0, 2 / 3, 1 / 2])]
    assert [name for name, _, _ in panels[1].lines] == [f'{run} sigma {bin}' for run in ('00003', '00004')
                                                        for bin in ('<0.05', '0.05-0.2', '>20')]
    assert panels[4].lines == [('00004 fid10k_full', [2], [9.5])] and panels[0].log_y and panels[3].bars
    result = CliRunner().invoke(report.main, ['--run', str(runs[0]), '--run', str(runs[1]), '--out',
                                              str(tmp_path / 'compare.png')])
    assert result.exit_code == 0, result.output
    image = np.asarray(PIL.Image.open(tmp_path / 'compare.png').convert('RGB')).astype(int)
    assert image.shape == (3 * PANEL_SIZE[1], 2 * PANEL_SIZE[0], 3)
    plot = image[MARGIN['top'] + 2:PANEL_SIZE[1] - MARGIN['bottom'] - 2, MARGIN['left'] + 2:-MARGIN['right'] - 2]
    for color in COLORS[:2]:  # both runs' loss drawn in the first chart
        assert (np.abs(plot[:, :PANEL_SIZE[0] - MARGIN['left'] - MARGIN['right'] - 4] - np.array(color)).sum(2)
                < 30).sum() > 20
    result = CliRunner().invoke(report.main, ['--run', str(runs[0]), '--run', str(runs[1])])
    assert result.exit_code == 2 and '--out: comparing 2 runs, name the PNG to write' in result.output
    (tmp_path / 'empty').mkdir()
    result = CliRunner().invoke(report.main, ['--run', str(runs[0]), '--run', str(tmp_path / 'empty'), '--out',
                                              str(tmp_path / 'x.png')])
    assert result.exit_code == 1 and f'{tmp_path / "empty"}: no stats.jsonl' in result.output
    assert not (tmp_path / 'x.png').exists()
    # Runs whose numbers collide (two outdirs) are named by their folders.
    assert report_lib.run_labels(['a/00003-x', 'b/00003-y/']) == ['00003-x', '00003-y']
    assert report_lib.run_labels(['a/00003-x', 'b/mine']) == ['00003', 'mine']


def test_a_legend_too_long_for_its_column_ends_with_how_many_more(monkeypatch):
    import PIL.ImageDraw
    import PIL.ImageFont

    from training.report import Panel
    panel = Panel('many')
    for index in range(20):
        panel.add(f'series {index}', [0, 1], [index, index + 1])
    texts = []
    original = PIL.ImageDraw.ImageDraw.text

    def record(self, xy, text, *args, **kwargs):
        texts.append(text)
        return original(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(PIL.ImageDraw.ImageDraw, 'text', record)
    image = PIL.Image.new('RGB', PANEL_SIZE, (255, 255, 255))
    panel.draw(image, (0, 0), PIL.ImageFont.load_default())
    room = PANEL_SIZE[1] - MARGIN['top'] - MARGIN['bottom'] - 4
    rows = room // max(report_lib.LEGEND_MIN_ROW, room // 20)  # rows closer together before the legend is cut
    assert rows - 1 > room // report_lib.LEGEND_ROW
    assert [t for t in texts if t.startswith('series ')] == [f'series {i}' for i in range(rows - 1)]
    assert f'+{20 - (rows - 1)} more' in texts
    # Two runs' eight noise-level bins (16 lines) all get a legend entry; a long label is cut in its middle.
    texts.clear()
    panel.lines = panel.lines[:15] + [('training-runs/00003-cifar10-32x32-cond-ddpmpp-edm sigma 5-20', [0, 1], [1, 2])]
    panel.draw(image, (0, 0), PIL.ImageFont.load_default())
    assert not any(t.endswith(' more') for t in texts) and len([t for t in texts if 'series' in t]) == 15
    assert [t for t in texts if '...' in t][0].endswith('sigma 5-20')


def test_a_resumed_runs_metrics_include_those_of_the_runs_it_continues(tmp_path):
    # A measured at kimg 1, 2 and 3; B resumed from A's kimg-2 state and measured at 3 and 4: B's FID panel is A's
    # points up to 2, then B's (A's kimg-3 point belongs to the part B replaced), as its loss panel already was.
    runs = {name: tmp_path / name for name in 'AB'}
    for name, kimgs, fids in (('A', [0, 1, 2, 3], {1: 50.0, 2: 40.0, 3: 99.0}), ('B', [2.5, 3.5, 4], {3: 30.0,
                                                                                                    4: 20.0})):
        runs[name].mkdir()
        with open(runs[name] / 'stats.jsonl', 'w') as f:
            f.writelines(json.dumps(_stats_line(kimg, 1.0, 0.0, 1e-3)) + '\n' for kimg in kimgs)
        for kimg, fid in fids.items():
            (runs[name] / f'network-snapshot-{kimg:06d}-fid10_full.json').write_text(json.dumps({
                'results': {'fid': fid}, 'labels': {'fid': 'fid10_full'},
                'source': {'network': str(runs[name] / f'network-snapshot-{kimg:06d}.pkl')}}))
    (runs['B'] / 'training_options.json').write_text(json.dumps({'resume_state_dump': str(runs['A'] /
                                                                                        'training-state-000002.pt')}))
    assert report_lib.metric_series(str(runs['B'])) == {'fid10_full': ([1, 2, 3, 4], [50.0, 40.0, 30.0, 20.0])}
    assert report_lib.metric_series(str(runs['A'])) == {'fid10_full': ([1, 2, 3], [50.0, 40.0, 99.0])}
    fid_panel = [p for p in build_panels(str(runs['B'])) if p.title.startswith('FID')][0]
    assert fid_panel.lines == [('fid10_full', [1, 2, 3, 4], [50.0, 40.0, 30.0, 20.0])]
    # Two measurements of one snapshot in one run (another --out, other seeds): both drawn, none dropped.
    (runs['B'] / 'seeds-10-19.json').write_text(json.dumps({
        'results': {'fid': 31.0}, 'labels': {'fid': 'fid10_full'},
        'source': {'network': str(runs['B'] / 'network-snapshot-000003.pkl')}}))
    assert report_lib.metric_series(str(runs['B'])) == {'fid10_full': ([1, 2, 3, 3, 4], [50.0, 40.0, 30.0, 31.0,
                                                                                         20.0])}


def test_compared_runs_keep_their_colours_and_names_apart(tmp_path):
    """The same folder name in two --outdir is told apart by its parent; a chart with one series per run draws
    each run in its own colour (a run without metrics does not hand its colour to the next one's FID); bars of
    several runs at the same kimg stand side by side."""
    runs = [tmp_path / 'runs' / '00000-cifar10', tmp_path / 'runs-stf' / '00000-cifar10']
    for run, nonfinite in zip(runs, (0.5, 0.8)):
        run.mkdir(parents=True)
        with open(run / 'stats.jsonl', 'w') as f:
            f.writelines(json.dumps(_stats_line(tick, 1.0, nonfinite if tick == 0 else 0.0, 1e-3)) + '\n'
                         for tick in range(3))
    (runs[1] / 'fid.json').write_text(json.dumps({'results': {'fid': 9.5}, 'labels': {'fid': 'fid10k_full'},
                                                 'source': {'network': 'network-snapshot-000002.pkl'}}))
    assert report_lib.run_labels([str(run) for run in runs]) == ['runs/00000', 'runs-stf/00000']
    assert report_lib.run_labels(['.', str(runs[0])]) != ['.', '00000']  # '.' is named by its folder
    panels = report_lib.compare_panels([str(run) for run in runs])
    fid = [p for p in panels if p.title.startswith('FID')][0]
    assert fid.lines[0][0] == 'runs-stf/00000 fid10k_full' and fid.colors == {0: COLORS[1]}
    nonfinite = [p for p in panels if p.bars][0]
    image = PIL.Image.new('RGB', PANEL_SIZE, (255, 255, 255))
    nonfinite.draw(image, (0, 0), PIL.ImageFont.load_default())
    plot = np.asarray(image).astype(int)[MARGIN['top'] + 2:PANEL_SIZE[1] - MARGIN['bottom'] - 2,
                                         MARGIN['left'] + 1:PANEL_SIZE[0] - MARGIN['right'] - 1]
    for color in COLORS[:2]:  # both runs' kimg-0 bars visible (5 and 8 steps: the taller one hid the other)
        assert (np.abs(plot - np.array(color)).sum(2) < 30).sum() > 50


def test_a_chain_is_followed_after_the_outdir_was_moved(tmp_path):
    """Absolute paths recorded on another machine or disk: the predecessor is found beside the run (runs copied
    from a cluster to draw their reports)."""
    from training.run_chain import run_chain
    old, new = tmp_path / 'cluster' / 'runs', tmp_path / 'laptop' / 'runs'
    for name in ('00000-a', '00001-a'):
        (new / name).mkdir(parents=True)
    (new / '00001-a' / 'training_options.json').write_text(json.dumps(
        {'resume_state_dump': str(old / '00000-a' / 'training-state-000002.pt')}))
    assert run_chain(str(new / '00001-a')) == [(str(new / '00000-a'), 2), (str(new / '00001-a'), None)]


def test_a_nosubdir_run_resumed_in_its_own_folder_keeps_the_run_it_continued(tmp_path):
    """W -> X (--nosubdir, resumed from W at kimg 1) -> X again from its own kimg-2 state: train.py rewrites X's
    training_options.json (the state it names is in X); continued_state_dump keeps W in the chain."""
    from training.run_chain import run_chain
    for name in 'WX':
        (tmp_path / name).mkdir()
    (tmp_path / 'X' / 'training_options.json').write_text(json.dumps({
        'resume_state_dump': str(tmp_path / 'X' / 'training-state-000002.pt'),
        'continued_state_dump': str(tmp_path / 'W' / 'training-state-000001.pt')}))
    assert run_chain(str(tmp_path / 'X')) == [(str(tmp_path / 'W'), 1), (str(tmp_path / 'X'), None)]
