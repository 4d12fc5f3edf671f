"""Every command in README.md runs as written, scaled down to CPU by the substitutions listed in this file.

The commands are read from README.md itself: every line of its ```bash blocks (continuation lines joined, comments
dropped) and every inline `python ...` / `torchrun ...` span. Inline fragments that start with a script name
(`fid.py calc --images=DIR|ZIP ...`) are parse-checked only. Then:

- every command, skipped or not, is parsed by its click command (`make_context`, resilient_parsing=False), and a
  torchrun line by torchrun's own argument parser, so a flag the CLI does not accept fails here
  (test_every_readme_command_parses);
- every inline span that starts with `--` (`--stf=1 --stf-refs=1024`) must be taken by some CLI, unless
  FLAG_SPAN_SKIP says why it is not an option list; an option named without its value (`--S_churn --S_min`) must
  exist, but one that needs a value followed by one given a value (`--stf --stf-refs=1024`) is wrong syntax;
- every command that is not in SKIP runs, in README order, and must exit 0 (test_readme_commands_run). A new README
  command therefore runs automatically; if it cannot run on CPU it must be added to SKIP with the reason, and a SKIP
  entry that matches no README command fails too, so the list cannot go stale.

How a command is scaled down (each table below is applied in this order; nothing else is changed):

1. TEXT_SUBSTITUTIONS rewrite the command line: URLs of EDM's files become local stand-ins, seed ranges keep their
   first 16 seeds, torchrun gets one process, the multi-node example's shell variables get values.
2. VALUE_PLACEHOLDERS and NAMED_PLACEHOLDERS fill in what the README leaves open (`--network=...`, `RUN_DIR`); a path
   with `...` in it, or a numbered output the scaled-down run does not reach (`network-snapshot-200000.pkl`), is the
   newest file of that name pattern (`network-snapshot-*.pkl`) in that folder; a lone `...` (options left out)
   becomes ELLIPSIS_OPTIONS.
3. scale_down() options are appended to the command (click keeps the last value of an option, so they win over the
   README's `--batch=512`, `--duration=200`, ...).
4. A network pickle the README names but no earlier command wrote (EDM's released pickles, `net.pkl`) is a tiny random
   8x8 RGB network of the preconditioning its name says; the detectors are stand-ins (metrics/detectors.py); the
   inputs are tiny fakes in their real formats at the README's paths (a 20-image CIFAR-10 tarball, a 12-image MNIST
   idx pair, an image folder), and dataset_tool.py writes them at 8x8 (scale_down).

Each ```bash block runs in a fresh folder that holds the README's inputs (downloads/, path/to/images, the stand-ins)
and the datasets built by earlier blocks (a dataset_tool.py command rebuilds its --dest); inline commands run in the
folder of the block before them. torchrun commands run their script in this process as one rank (torchrun's own
options are parse-checked), except those in REAL_TORCHRUN, which run under torchrun with CPU (gloo) processes;
tests/test_distributed.py, test_generate.py and test_fid_cli.py run the CLIs under a 2-process torchrun as well.
"""

import dataclasses
import gzip
import importlib
import io
import os
import pickle
import re
import shlex
import tarfile
import traceback

import click
import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# ---------------------------------------------------------------------------------------------------------------------
# The tables.

# script -> (module, click command). `python -m samplers.ld3` is ld3.py's command.
CLIS = {
    "train.py": ("train", "main"),
    "generate.py": ("generate", "main"),
    "fid.py": ("fid", "main"),
    "ld3.py": ("ld3", "cli"),
    "samplers.ld3": ("ld3", "cli"),
    "dataset_tool.py": ("dataset_tool", "main"),
    "train_dg.py": ("train_dg", "main"),
    "phema.py": ("phema", "main"),
    "report.py": ("report", "main"),
    "quickstart.py": ("quickstart", "main"),
}

# Commands that are parse-checked but not run: a substring of the command (as extracted) -> why.
SKIP = {
    "bash scripts/quickstart.sh": "builds .venv and trains for ~20 min; quickstart.py itself runs scaled down in "
                                  "tests/test_quickstart.py",
    "bash scripts/test.sh": "runs this test suite",
    "bash scripts/test_newest.sh": "builds a second environment and runs this test suite",
    "python -m pytest": "runs (part of) this test suite",
    "torchrun --nnodes=4": "multi-node: 4 machines",
    "--precision=bf16 --compile=regional": "torch.compile takes minutes on CPU; the speed options are tested on CUDA "
                                           "(tests/test_cuda.py)",
    "--compile --cuda-graph": "CUDA graphs need CUDA (tests/test_cuda.py)",
    "--encoder=adm --adm-classifier=32x32_classifier.pt": "needs DG's released 32x32_classifier.pt (Google Drive, "
                                                          "47.8M parameters); tests/test_dg.py uses a small one",
    "train_dg.py import": "needs DG's released 32x32_classifier.pt and discriminator_60.pt (Google Drive)",
    "python -m samplers.ld3 ...": "stands for any ld3.py command line (tests/test_ld3.py runs "
                                  "`python -m samplers.ld3`)",
    "python benchmarks/": "a benchmark, run by hand (minutes to hours on a CPU); numbers in benchmarks/results/",
}

# Inline spans that start with `--` but are not options to parse -> why. Every other one (`--stf=1 --stf-refs=1024`,
# `--loss-opt P_mean=... --loss-opt P_std=...`) must be taken by some CLI of CLIS, as written (`a|b`: a).
FLAG_SPAN_SKIP = {
    "--augment > 0": "a condition, not an option",
    "--edm-repo": "benchmarks/gpu_suite.py's option (argparse, not a CLI of CLIS)",
    "--sigma_min/max": "short for --sigma_min and --sigma_max",
    "--solver/--steps/...": "short for --solver, --steps and the other sampler options",
    "--precond=vp/ve": "short for --precond=vp and --precond=ve",
    "--outdir/": "a path under --outdir",
}

# (regex, replacement, why), applied to the command text in this order.
TEXT_SUBSTITUTIONS = [
    (r"https://nvlabs-fi-cdn\.nvidia\.com/edm/fid-refs/([\w.-]+\.npz)", r"tiny-refs/\1",
     "EDM's reference statistics: mu and sigma (no features, as EDM's) of 32 images under the stand-in Inception"),
    (r"https://nvlabs-fi-cdn\.nvidia\.com/edm/pretrained/([\w.-]+\.pkl)", r"\1",
     "EDM's released pickles: a tiny random network of the same preconditioning under the same file name"),
    (r"--seeds=(\d+)-\d+", lambda m: f"--seeds={m.group(1)}-{int(m.group(1)) + 15}",
     "16 seeds, the first of the README's range"),
    (r"--nproc_per_node=\d+", "--nproc_per_node=1", "one rank, run in this process"),
    (r"\$NODE_RANK", "0", "the multi-node example's shell variable"),
    (r"\$HEAD_NODE", "127.0.0.1", "the multi-node example's shell variable"),
]

# torchrun commands that do run under torchrun, with this many CPU processes (the others run in this process).
REAL_TORCHRUN = {
    "generate.py --outdir=fid-tmp": 2,
}

# An option whose value the README leaves open (`--ref=...`) -> what it is here ('NETWORK': the last network pickle an
# earlier command of the same block used, else net.pkl).
VALUE_PLACEHOLDERS = {
    "--network": "NETWORK",
    "--ref": "tiny-refs/full.npz",  # a reference with mu, sigma and the PR/KID features of the stand-ins
    "--real": "datasets/cifar10-32x32.zip",
    "--fake": "fakes",
    "--solver": "heun",
    "--schedule": "edm",
}

# Upper-case placeholders of inline commands and fragments -> values ('*': the newest match in the folder).
NAMED_PLACEHOLDERS = {
    "RUN_DIR": "training-runs/00000-*",
    "RUN_A": "training-runs/00000-*",  # report.py's comparison: the run against itself
    "RUN_B": "training-runs/00000-*",
    "KIMG": "1",
    "PKL": "dg-run/discriminator-*.pkl",
    "DATASET": "datasets/cifar10-32x32.zip",
    "DIR|ZIP": "fid-tmp",
    "NPZ|URL": "tiny-refs/full.npz",
    "N": "4",
    "K": "0",
    "NAME": "list",
    "FILE": "schedule.json",
}

# A lone `...` (the README's "and your other options") -> these options.
ELLIPSIS_OPTIONS = {
    "train.py": ["--outdir=training-runs", "--data=datasets/cifar10-32x32.zip"],
    "generate.py": ["--network=net.pkl", "--outdir=out-speed"],
}

TINY_NET = ["--cbase=8", "--cres=1", "--blocks=1"]
STANDIN_DETECTORS = ["--detector", "inception=tiny-detectors/inception.pt", "--detector",
                     "vgg16=tiny-detectors/vgg16.pt"]


def scale_down(script: str, sub: str | None, args: list[str]) -> list[str]:
    """The options appended to a command of `script` (subcommand `sub`) with README arguments `args`."""
    given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    if script == "train.py":
        # 1 kimg (64 steps), the shortest run train.py allows; fp32, as bf16 autocast is slower than fp32 on CPU
        extra = ["--batch=16", "--duration=0.001", "--tick=1", "--snap=1", "--dump=1", "--lr-rampup=1",
                 "--workers=0", "--precision=fp32"]
        if "--resume" in given and "--data" not in given:  # resume from the state alone: one more kimg
            return ["--duration=0.002", "--workers=0", "--precision=fp32"]
        if "--resume" in given:
            extra = [e.replace("0.001", "0.002") for e in extra]
        if "--init" not in given:  # --init takes the architecture from the pickle
            extra += TINY_NET
        loss = next((a.split("=", 1)[1] for a in args if a.startswith("--loss=")), None)
        if loss is None and "--dry-run" not in given:
            extra += ["--phema=0.05,0.10"]  # the README's post-hoc EMA example, so that phema.py has a run to read
        if loss == "gdd":  # the projected discriminator downloads VGG16-BN and EfficientNet backbones
            extra += ["--loss-opt", "discriminator=sn_cnn", "--loss-opt", "disc_channels=8"]
        if loss in ("spd", "ddpm"):  # 4000 ancestral steps per image otherwise
            extra += ["--loss-opt", "T=40"]
        return extra
    if script == "dataset_tool.py":  # 8x8 images: a training kimg takes seconds on one CPU thread
        return ["--resolution=8x8"]
    if script == "fid.py":
        extra = [*STANDIN_DETECTORS, "--workers=0", "--batch=16"]
        if sub == "calc" and "--seeds" not in given:
            extra += ["--num-images=16"]
        return extra
    if script in ("ld3.py", "samplers.ld3") and sub == "train":
        return ["--loss=l2", "--num-train=2", "--num-valid=2", "--rounds-v1=1", "--rounds-v2=1",
                "--candidates=edm_rho7,logsnr"]  # LPIPS downloads VGG16; 2 + 2 samples, 14 held out
    if script == "train_dg.py" and sub == "train":
        return ["--epochs=1", "--batch=8", "--width=32", "--depth=1", "--head-channels=32"]
    if script == "train_dg.py" and sub == "accuracy":
        return ["--sigmas=0.05,5"]
    return []


# ---------------------------------------------------------------------------------------------------------------------
# Extraction.


@dataclasses.dataclass
class Command:
    text: str        # as in the README, continuation lines joined, whitespace collapsed, comment dropped
    line: int        # README line where it starts
    block: int | None  # index of its ```bash block; None for inline spans
    fragment: bool = False  # an inline span naming a script without `python`: options only, parse-checked

    def __str__(self):
        return f"README.md:{self.line}: {self.text}"


def _strip_comment(line: str) -> str:
    out, quote = [], None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            break
        out.append(ch)
    return "".join(out).strip()


def inline_spans(text: str) -> list[tuple[str, int]]:
    """Every `code` span outside fenced blocks (whitespace collapsed) and its line."""
    lines, inside = text.split("\n"), False
    for k, line in enumerate(lines):
        if line.strip().startswith("```"):
            inside, lines[k] = not inside, ""
        elif inside:
            lines[k] = ""
    prose = "\n".join(lines)
    return [(" ".join(m.group(1).split()), prose.count("\n", 0, m.start()) + 1)
            for m in re.finditer(r"`([^`]+)`", prose)]


def extract_commands(text: str) -> list[Command]:
    commands, lines = [], text.split("\n")
    i, block = 0, -1
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```"):
            start, lang = i, fence[3:].strip()
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                i += 1
            if lang == "bash":
                block += 1
                pending, pending_line = "", None
                for j in range(start + 1, i):
                    code = _strip_comment(lines[j])
                    if not code and not pending:
                        continue
                    if pending_line is None:
                        pending_line = j + 1
                    if code.endswith("\\"):
                        pending += code[:-1] + " "
                        continue
                    pending += code
                    commands.append(Command(" ".join(pending.split()), pending_line, block))
                    pending, pending_line = "", None
                assert not pending, f"README.md:{pending_line}: a continuation line ends its block"
        i += 1
    for span, line in inline_spans(text):
        if re.match(r"(python|torchrun|bash) ", span):
            commands.append(Command(span, line, None))
        elif re.match(r"[a-z_]+\.py \S", span) and span.split()[0] in CLIS:
            commands.append(Command(span, line, None, fragment=True))
        elif span.startswith("--") and not any(span.startswith(key) for key in FLAG_SPAN_SKIP):
            commands.append(Command(span, line, None, fragment=True))
    commands.sort(key=lambda c: c.line)
    return commands


def skip_reason(command: Command) -> str | None:
    for key, reason in SKIP.items():
        if key in command.text:
            return reason
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Substitution and parsing.


@dataclasses.dataclass
class Resolved:
    script: str            # a CLIS key, or 'bash' / 'pytest' / 'benchmark' (benchmarks/*.py, run by hand)
    args: list[str]        # the CLI's arguments after every substitution
    torchrun: list[str] | None = None  # torchrun's own options, if launched with torchrun
    scaled: int = 0        # how many of args scale_down() appended


def _newest(pattern: str, folder: str | None) -> str | None:
    import glob
    if folder is None:
        return None
    matches = sorted(glob.glob(os.path.join(folder, pattern), recursive=True))
    return os.path.relpath(matches[-1], folder) if matches else None


def _resolve_path(value: str, folder: str | None) -> str:
    """A path with `...` or `*` in it, or a numbered output that does not exist: the newest existing match."""
    if value.startswith(("http://", "https://")):
        return value
    if "..." in value and "/" in value:  # `.../x.pkl`: x.pkl in any folder; `runs/00000-.../x.pkl`: one level
        pattern = value.replace("...", "**")
    elif "*" in value:
        pattern = value
    elif re.search(r"-\d{6}\.(pkl|pt)$", value) and folder is not None \
            and not os.path.exists(os.path.join(folder, value)):
        pattern = value
    else:
        return value
    pattern = re.sub(r"-\d{6}\.(pkl|pt)$", r"-*.\1", pattern)
    found = _newest(pattern, folder)
    return found if found is not None else value


def resolve(command: Command, folder: str | None = None, last_network: str | None = None) -> Resolved:
    """The command after the substitutions (paths resolved in `folder` when given; parse-only when None)."""
    text = command.text
    for pattern, replacement, _why in TEXT_SUBSTITUTIONS:
        text = re.sub(pattern, replacement, text)
    tokens = shlex.split(text)
    launcher = None
    if tokens[0] == "torchrun":
        from torch.distributed.run import get_args_parser
        try:
            parsed = get_args_parser().parse_args(tokens[1:])
        except SystemExit:
            raise AssertionError(f"{command}: torchrun's parser refuses this command line (see stderr)") from None
        script_args = list(parsed.training_script_args)
        position = len(tokens) - len(script_args) - 1
        assert tokens[position] == parsed.training_script, (command, tokens[position], parsed.training_script)
        launcher, tokens = tokens[1:position], [parsed.training_script, *script_args]
    elif tokens[0] == "python":
        tokens = tokens[2:] if tokens[1] == "-m" and tokens[2] != "pytest" else tokens[1:]
        if tokens[0] == "-m":
            return Resolved("pytest", tokens[2:])
    elif tokens[0] == "bash":
        return Resolved("bash", tokens[1:])
    elif tokens[0].startswith("--"):
        tokens = ["FLAGS", *tokens]
    script, args = tokens[0], tokens[1:]
    if script.startswith("benchmarks/"):  # run by hand; the script must exist and the command be in SKIP
        return Resolved("benchmark", [script, *args])
    if script not in CLIS and script != "FLAGS":
        raise AssertionError(f"{command}: {script} is not in CLIS (add it, or the command to SKIP with a reason)")

    out = []
    for arg in args:
        if arg == "...":
            out += ELLIPSIS_OPTIONS.get(script, [])
            continue
        key, eq, value = arg.partition("=")
        if eq and key.startswith("--"):
            if value == "..." and key in VALUE_PLACEHOLDERS:
                value = VALUE_PLACEHOLDERS[key]
            for name, replacement in NAMED_PLACEHOLDERS.items():
                if value == name or value.startswith(name + "/"):
                    value = replacement + value[len(name):]
            if value == "NETWORK":
                value = last_network or "net.pkl"
            if command.fragment and "|" in value:  # `--precision=fp32|bf16|fp16`: alternatives
                value = value.split("|")[0]
            out.append(f"{key}={_resolve_path(value, folder)}")
        elif arg in NAMED_PLACEHOLDERS:  # `--holdout N`
            out.append(_resolve_path(NAMED_PLACEHOLDERS[arg], folder))
        else:
            out.append(_resolve_path(arg, folder) if "/" in arg or "..." in arg else arg)
    sub = out[0] if out and script in CLIS and isinstance(_cli(script), click.Group) else None
    extra = [] if command.fragment else scale_down(script, sub, out)
    return Resolved(script, out + extra, launcher, len(extra))


def _cli(script: str) -> click.Command:
    module, name = CLIS[script]
    return getattr(importlib.import_module(module), name)


def parse_check(command: Command, resolved: Resolved) -> None:
    """click's own parsing of the arguments (types, choices, callbacks, required options); raises on a refusal. The
    README's arguments are checked alone (scale_down's later values would hide a bad one) and with scale_down's."""
    if resolved.scaled:
        parse_check(command, dataclasses.replace(resolved, args=resolved.args[:-resolved.scaled], scaled=0))
    if resolved.script in ("bash", "benchmark"):
        assert os.path.isfile(os.path.join(ROOT, resolved.args[0])), f"{command}: no such script"
        return
    if resolved.script == "pytest":
        return
    if resolved.script == "FLAGS":  # an inline `--opt=value ...` span: some CLI must take it
        errors = []
        for name, cli in _leaf_commands():
            try:
                return _parse(command, cli, name, list(resolved.args))
            except (click.ClickException, AssertionError) as err:
                errors.append(f"{name}: {err.format_message() if isinstance(err, click.ClickException) else err}")
        raise AssertionError(f"{command}: no CLI takes these options ({'; '.join(errors[:3])}; ...)")
    cli, args, name = _cli(resolved.script), list(resolved.args), resolved.script
    if isinstance(cli, click.Group) and not args and command.text.endswith(" ..."):
        return  # `python -m samplers.ld3 ...`: any command line of it
    if isinstance(cli, click.Group):
        assert [p.name for p in cli.params if p.name != "help"] == [], "a group with options of its own"
        assert args and args[0] in cli.commands, f"{command}: no subcommand {args[:1]} of {name}"
        cli, name, args = cli.commands[args[0]], f"{name} {args[0]}", args[1:]
    _parse(command, cli, name, args)


def _leaf_commands() -> list[tuple[str, click.Command]]:
    leaves = []
    for script in CLIS:
        cli = _cli(script)
        if isinstance(cli, click.Group):
            leaves += [(f"{script} {sub}", command) for sub, command in cli.commands.items()]
        else:
            leaves.append((script, cli))
    return leaves


def _parse(command: Command, cli: click.Command, name: str, args: list[str]) -> None:
    if command.fragment:
        # An option named, not set (`generate.py --grid`, `--S_churn --S_min`): only its name must exist. One that
        # needs a value followed by one given a value is not a name but wrong syntax (`--stf --stf-refs=1024`).
        options = {opt: param for param in cli.params for opt in [*param.opts, *param.secondary_opts]}
        for opt in cli.get_help_option_names(click.Context(cli)):  # --help
            options[opt] = click.Option([opt], is_flag=True)
        kept = []
        for k, arg in enumerate(args):
            if arg.startswith("--") and "=" not in arg and (
                    k + 1 == len(args) or (args[k + 1].startswith("--") and "=" not in args[k + 1])):
                assert arg in options, f"{command}: {name} has no option {arg}"
                if not getattr(options[arg], "is_flag", False):
                    continue
            kept.append(arg)
        args = kept
    try:
        with cli.make_context(name, args, resilient_parsing=False):
            pass
    except click.MissingParameter:
        if not command.fragment:  # a fragment names only some options
            raise
    except click.exceptions.Exit as exit_:  # --help, --preset=list (eager: print, then exit)
        assert exit_.exit_code == 0, f"{command}: exit {exit_.exit_code}"


# ---------------------------------------------------------------------------------------------------------------------
# Fast tests: the README's commands are known, and every flag in them parses.


@pytest.fixture(scope="module")
def commands():
    with open(README, encoding="utf-8") as f:
        found = extract_commands(f.read())
    assert len(found) >= 30, [str(c) for c in found]  # the extraction found the README's commands
    return found


def test_every_readme_command_is_known_and_every_skip_is_used(commands):
    for command in commands:
        resolved = resolve(command)
        if resolved.script in ("bash", "pytest", "benchmark"):
            assert skip_reason(command), f"{command}: not a CLI of this project and not in SKIP"
    for key in SKIP:
        assert any(key in c.text for c in commands), f"SKIP entry {key!r} matches no README command: remove it"
    with open(README, encoding="utf-8") as f:
        spans = [span for span, _ in inline_spans(f.read())]
    for key in FLAG_SPAN_SKIP:
        assert any(span.startswith(key) for span in spans), f"FLAG_SPAN_SKIP entry {key!r} is not in the README"


def test_every_readme_command_parses(commands):
    failures = []
    for command in commands:
        try:
            parse_check(command, resolve(command))
        except (click.ClickException, AssertionError) as err:
            message = err.format_message() if isinstance(err, click.ClickException) else str(err)
            failures.append(f"{command}\n    -> {message}")
    assert not failures, "README commands the CLIs refuse:\n" + "\n".join(failures)


@pytest.mark.parametrize("bad, message", [
    ("python train.py --outdir=x --data=y --stf --stf-refs=1024", "not a valid boolean"),
    ("python train.py --outdir=x --data=y --loss-opt P_mean=-1.0 P_std=1.4", "unexpected extra argument"),
    ("python generate.py --network=n.pkl --outdir=o --disc-typo=vp", "No such option"),
    ("python generate.py --network=n.pkl --outdir=o --steps=ten", "not a valid integer"),
    ("python fid.py calc --images=x --metrics=fid --num-images=ten", "not a valid integer"),
    ("python ld3.py train --data=t.pt --out=s.json --solver=ipndm --nfe=zero", "not a valid integer"),
])
def test_the_parse_check_refuses_wrong_flags(bad, message):
    command = Command(bad, 1, 0)
    with pytest.raises(click.ClickException) as err:
        parse_check(command, resolve(command))
    assert message.lower() in err.value.format_message().lower()


@pytest.mark.parametrize("span", ["--stf --stf-refs=1024", "--loss-opt P_mean=-1.0 P_std=1.4", "--rho=seven",
                                  "--loss=spd --dg-weight=2", "--S_churn --no-such-option"])
def test_the_parse_check_refuses_wrong_inline_flags(span):
    found = extract_commands(f"The issue's examples: `{span}`; fine: `--stf=1 --stf-refs=1024`.\n")
    assert [c.text for c in found] == [span, "--stf=1 --stf-refs=1024"] and all(c.fragment for c in found)
    with pytest.raises(AssertionError, match="no CLI takes these options"):
        parse_check(found[0], resolve(found[0]))
    parse_check(found[1], resolve(found[1]))


@pytest.mark.parametrize("option", ["--num=64", "--master=x"])
def test_the_parse_check_refuses_what_torchrun_takes_for_its_own(option):
    from torch.distributed.run import get_args_parser
    if option == "--num=64" and not any(a.dest == "numa_binding" for a in get_args_parser()._actions):
        pytest.skip("this torch's torchrun has no --numa-binding")  # torch < 2.8
    command = Command(f"torchrun --standalone --nproc_per_node=2 fid.py calc --images=x {option}", 1, 0)
    with pytest.raises(AssertionError, match="torchrun's parser refuses"):
        resolve(command)


def test_extraction_joins_continuations_and_finds_inline_commands():
    text = ("# T\n\n```bash\n# a comment\npython generate.py --network=a.pkl \\\n    --outdir=o   # trailing\n\n"
            "torchrun --standalone --nproc_per_node=8 fid.py calc --images=o\n```\n\n"
            "Run `python report.py --run=RUN_DIR` or `fid.py ref --data=DATASET`; not `train.py`.\n"
            "```\npython not-bash.py\n```\n")
    found = extract_commands(text)
    assert [(c.text, c.line, c.block, c.fragment) for c in found] == [
        ("python generate.py --network=a.pkl --outdir=o", 5, 0, False),
        ("torchrun --standalone --nproc_per_node=8 fid.py calc --images=o", 8, 0, False),
        ("python report.py --run=RUN_DIR", 11, None, False),
        ("fid.py ref --data=DATASET", 11, None, True)]
    resolved = resolve(found[1])
    assert resolved.script == "fid.py" and resolved.torchrun == ["--standalone", "--nproc_per_node=1"]
    assert resolved.args[:2] == ["calc", "--images=o"] and "--num-images=16" in resolved.args
    unknown = Command("python newtool.py --x=1", 3, 0)
    with pytest.raises(AssertionError, match="newtool.py is not in CLIS"):
        resolve(unknown)


# ---------------------------------------------------------------------------------------------------------------------
# The slow test: run them.


def _images(rng, num, height, width):
    return rng.integers(0, 256, size=(num, height, width, 3), dtype=np.uint8)


def _write_inputs(root: str) -> None:
    """The README's input files, tiny, in their real formats, and the stand-in detectors and references."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "downloads", "cifar10"))
    with tarfile.open(os.path.join(root, "downloads", "cifar10", "cifar-10-python.tar.gz"), "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
            payload = pickle.dumps({b"labels": rng.integers(0, 10, 4).tolist(), b"data": data}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    os.makedirs(os.path.join(root, "downloads", "mnist"))
    for name, array in [("train-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28))),
                        ("train-labels-idx1-ubyte.gz", rng.integers(0, 10, 12))]:
        header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
        with gzip.open(os.path.join(root, "downloads", "mnist", name), "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())
    for label in (0, 1):
        folder = os.path.join(root, "path", "to", "images", f"class{label}")
        os.makedirs(folder)
        for k, image in enumerate(_images(rng, 4, 40, 48)):
            PIL.Image.fromarray(image).save(os.path.join(folder, f"{k}.png"))

    from metrics import detectors as detectors_lib
    os.makedirs(os.path.join(root, "tiny-detectors"))
    detectors_lib.save_standin(detectors_lib.StandinInception(), os.path.join(root, "tiny-detectors", "inception.pt"))
    detectors_lib.save_standin(detectors_lib.StandinVGG16(), os.path.join(root, "tiny-detectors", "vgg16.pt"))
    refs = os.path.join(root, "tiny-refs")
    os.makedirs(os.path.join(refs, "images"))
    for k, image in enumerate(_images(rng, 32, 8, 8)):
        PIL.Image.fromarray(image).save(os.path.join(refs, "images", f"{k:06d}.png"))
    import fid
    for dest, metrics in [("cifar10-32x32.npz", "fid"), ("full.npz", "fid,pr,kid")]:
        args = ["ref", "--data", os.path.join(refs, "images"), "--dest", os.path.join(refs, dest), "--metrics",
                metrics, "--workers", "0", "--detector", f"inception={root}/tiny-detectors/inception.pt",
                "--detector", f"vgg16={root}/tiny-detectors/vgg16.pt"]
        result = CliRunner().invoke(fid.main, args)
        assert result.exit_code == 0, result.output


def _tiny_network(path: str) -> None:
    """A ~10k-parameter 8x8 RGB SongUNet with the preconditioning and conditioning the file name says (EDM's naming:
    baseline-*-vp/-ve are VP/VE preconditioned; edm-*-vp/-ve are EDM-preconditioned DDPM++/NCSN++ (config F), as the
    released pickles; -cond: 10 classes)."""
    import torch

    from torch_utils import persistence
    from training import preconditioning

    name = os.path.basename(path)
    kind = next((p for p in ("vp", "ve") if re.search(rf"-{p}\b", name)), None) if name.startswith("baseline") \
        else None
    precond = {"vp": preconditioning.VPPrecond, "ve": preconditioning.VEPrecond}.get(kind, preconditioning.EDMPrecond)
    torch.manual_seed(0)
    label_dim = 10 if re.search(r"(?<!un)cond\b", name) else 0
    net = precond(img_resolution=8, img_channels=3, label_dim=label_dim, model_type="SongUNet", model_channels=8,
                  channel_mult=[1], num_blocks=1, attn_resolutions=[])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    persistence.save_network_pickle(path, dict(ema=net))


def _prepare_block_folder(root: str, name: str) -> str:
    """A fresh folder with the README's inputs and every dataset built so far."""
    folder = os.path.join(root, name)
    os.makedirs(os.path.join(folder, "datasets"))
    for entry in ("downloads", "path", "tiny-detectors", "tiny-refs"):
        os.symlink(os.path.join(root, entry), os.path.join(folder, entry))
    for dataset in sorted(os.listdir(os.path.join(root, "datasets"))):
        os.symlink(os.path.join(root, "datasets", dataset), os.path.join(folder, "datasets", dataset))
    return folder


def _run_one(command: Command, resolved: Resolved, folder: str, root: str) -> str | None:
    """Run a resolved command in `folder` (this process); None on success, else what went wrong."""
    args = list(resolved.args)
    for arg in args:
        key, _, value = arg.partition("=")
        if key in ("--network", "--init", "--transfer") and value.endswith(".pkl") and "/" not in value \
                and not os.path.exists(os.path.join(folder, value)):
            _tiny_network(os.path.join(folder, value))
    dest = next((a.split("=", 1)[1] for a in args if a.startswith("--dest=")), None)
    if resolved.script == "dataset_tool.py" and dest and os.path.islink(os.path.join(folder, dest)):
        os.unlink(os.path.join(folder, dest))  # an earlier block's dataset: this command builds it anew
    nproc = next((n for key, n in REAL_TORCHRUN.items() if key in command.text), None)
    if resolved.torchrun is not None and nproc is not None:
        import subprocess
        import sys
        launcher = [re.sub(r"^--nproc_per_node=\d+$", f"--nproc_per_node={nproc}", a) for a in resolved.torchrun]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher,
                               os.path.join(ROOT, resolved.script), *args],
                              cwd=folder, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0:
            return None
        return (f"{command}\n    ran: torchrun {shlex.join(launcher)} {resolved.script} {shlex.join(args)}\n"
                f"    in: {folder}\n    exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(_cli(resolved.script), args, prog_name=resolved.script)
    finally:
        os.chdir(cwd)
    if resolved.script == "dataset_tool.py" and dest and result.exit_code == 0 and dest.startswith("datasets/"):
        shared = os.path.join(root, dest)  # later blocks see it
        if not os.path.exists(shared):
            os.symlink(os.path.join(folder, dest), shared)
    if result.exit_code == 0:
        return None
    trace = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info and not isinstance(
        result.exception, SystemExit) else ""
    return (f"{command}\n    ran: {resolved.script} {shlex.join(args)}\n    in: {folder}\n    exit {result.exit_code}:"
            f"\n{result.output[-3000:]}\n{trace[-3000:]}")


@pytest.mark.slow
@pytest.mark.distributed
def test_readme_commands_run(commands, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    root = str(tmp_path / "readme")
    os.makedirs(os.path.join(root, "datasets"))
    _write_inputs(root)
    folder, block, last_network, ran, skipped = _prepare_block_folder(root, "intro"), None, {}, [], []
    for command in commands:
        if command.fragment:
            continue
        if command.block is not None and command.block != block:
            block = command.block
            folder = _prepare_block_folder(root, f"block{block:02d}")
        resolved = resolve(command, folder, last_network.get(command.block))
        if skip_reason(command):
            skipped.append(command)
            continue
        failure = _run_one(command, resolved, folder, root)
        assert failure is None, failure
        for arg in resolved.args:  # what it was asked to write is there
            key, _, value = arg.partition("=")
            if key in ("--out", "--dest", "--outdir", "--grid") and "--dry-run" not in resolved.args:
                path = os.path.join(folder, value)
                assert os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)), (str(command), arg)
        network = next((a.split("=", 1)[1] for a in resolved.args if a.startswith("--network=")), None)
        if network is not None and command.block is not None:
            last_network[command.block] = network
        ran.append(f"{command}\n           as: {resolved.script} {shlex.join(resolved.args)}")
    print(f"README: {len(ran)} commands ran, {len(skipped)} parse-checked only:")
    print("\n".join(f"  ran      {c}" for c in ran) + "\n" + "\n".join(f"  skipped  {c}" for c in skipped))
    assert len(ran) >= 25, ran
