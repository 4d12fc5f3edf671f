"""Every command line's --help names its values the same way (issue 19): INT, FLOAT, PATH, DIR, NAME, LIST, DEVICE,
... given as metavars, never click's defaults for a type (INTEGER, INTEGER RANGE, FLOAT RANGE, TEXT, BOOLEAN, FILE,
DIRECTORY), which read inconsistently beside ours."""

import importlib
import re

import click
import pytest
from click.testing import CliRunner

CLIS = ("train", "generate", "fid", "ld3", "dataset_tool", "train_dg", "phema", "report", "quickstart")
CLICK_DEFAULT_METAVARS = re.compile(r"\b(INTEGER RANGE|FLOAT RANGE|INTEGER|TEXT|BOOLEAN|FILENAME|FILE|DIRECTORY|"
                                    r"UUID)\b")


def _main(module: str) -> click.Command:
    """The command a script runs: its click group, else its one click command."""
    commands = [value for value in vars(importlib.import_module(module)).values() if isinstance(value, click.Command)]
    groups = [command for command in commands if isinstance(command, click.Group)]
    assert len(groups) == 1 or (not groups and len(commands) == 1), (module, commands)
    return (groups or commands)[0]


def _commands():
    """(module, argument path, command) for every command and subcommand of the CLIs."""
    found = []
    for name in CLIS:
        main = _main(name)
        stack = [([], main)]
        while stack:
            path, command = stack.pop()
            found.append((name, path, command))
            if isinstance(command, click.Group):
                stack += [([*path, sub], command.commands[sub]) for sub in sorted(command.commands)]
    return found


COMMANDS = _commands()


@pytest.mark.parametrize(("module", "path", "command"), COMMANDS,
                         ids=[" ".join([module, *path]) for module, path, _ in COMMANDS])
def test_help_uses_our_metavars(module, path, command):
    ctx = click.Context(command, info_name=module)
    columns = [option.get_help_record(ctx) for option in command.params
               if isinstance(option, click.Option) and not option.hidden]
    offenders = [record[0] for record in columns if record and CLICK_DEFAULT_METAVARS.search(record[0])]
    assert not offenders, f"{module} {' '.join(path)}: give these options a metavar: {offenders}"
    # ... and the rendered --help (what a user reads) has none either.
    result = CliRunner().invoke(_main(module), [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    options_text = result.output.split("Options:", 1)[-1]
    assert not CLICK_DEFAULT_METAVARS.search(options_text), CLICK_DEFAULT_METAVARS.findall(options_text)


def test_the_check_catches_click_defaults():
    """The pattern rejects what click writes for an option without a metavar (a check that cannot fail is none)."""
    @click.command()
    @click.option("--n", type=click.IntRange(min=1))
    @click.option("--x", type=float)
    @click.option("--s", type=str)
    @click.option("--k", type=int, metavar="INT")
    def command(n, x, s, k):
        pass

    ctx = click.Context(command)
    columns = [option.get_help_record(ctx)[0] for option in command.params]
    assert [bool(CLICK_DEFAULT_METAVARS.search(column)) for column in columns] == [True, False, True, False]


@pytest.mark.parametrize("module, args", [("train_dg", ["train", "--real", "r", "--fake", "f", "--outdir", "o"]),
                                          ("ld3", ["evaluate", "--schedule", "s.json", "--data", "d.pt"])])
def test_single_process_tools_refuse_several_torchrun_processes(module, args, monkeypatch):
    """train_dg.py and ld3.py do not split their work over ranks: under torchrun with 2 processes every rank trained
    everything and both appended to the same stats.jsonl. They stop with one line instead."""
    cli = importlib.import_module(module)
    group = getattr(cli, "main", None) or cli.cli
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = CliRunner().invoke(group, args)
    assert result.exit_code in (1, 2)  # click's usage (ld3.py) or error (train_dg.py) exit
    assert f"{module}.py runs as one process (it does not split its work over ranks), but torchrun started 2" in \
        result.output


def test_dataset_tool_help_does_not_import_torch():
    """`dataset_tool.py --help` and its usage errors answer without importing torch (seconds; the tool needs it only
    to convert)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    probe = ("import sys, dataset_tool\n"
             "try:\n"
             "    dataset_tool.main(sys.argv[1:], standalone_mode=False)\n"
             "except BaseException as exc:\n"
             "    print(type(exc).__name__)\n"
             "print('torch' in sys.modules)\n")
    for args in (["--help"], ["--source", "x"]):  # the second: a usage error (no --dest)
        result = subprocess.run([sys.executable, "-c", probe, *args], cwd=root, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "False", (args, result.stdout)
    result = subprocess.run([sys.executable, "-c", probe, "--source", "x", "--dest", "y.zip", "--resolution", "32x32"],
                            cwd=root, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "True", result.stdout  # converting does import it
