"""The sampler's command-line options, shared by generate.py, fid.py (calc --network) and ld3.py, and their
conversion to a SamplerConfig.

A solver's options come from its registry entry: `--solver-opt NAME=VALUE` sets any option of the chosen solver,
typed from the solver's signature (repeatable; several pairs may be joined by commas). The older flags (--order,
--variant, --lower-order-final, --exact-third-order, --S_churn, --S_min, --S_max, --S_noise) stay as aliases: each
sets the option of its name, or the solver's alias of it (--order is iPNDM's max_order).

EDM's generate.py options are accepted as aliases: --disc=vp|ve|iddpm|edm is --schedule of the same
name, --schedule=linear and --scaling=none are what every solver here integrates, --solver=euler|heun are EDM's
ablation-sampler solvers on that ODE; EDM's VP/VE ODE schedules and VP scaling (beside --disc or --scaling) select
the same solvers stepping in EDM's time t (samplers/edm_time.py: euler_time, heun_time). `--preset=NAME` fills the
sampler options of a published configuration that the command line did not give (the CLI passes its table,
training.presets.SAMPLER_PRESETS; apply_preset).
"""

import collections
import contextlib
import inspect
import os
import re

import click
import torch

import losses
from samplers import END_CONVENTIONS, SCHEDULES, SOLVERS, make_grid
from samplers.accelerated import PRECISIONS
from samplers.fourier import SOLVERS as FOURIER_SOLVERS
from samplers.generation import SamplerConfig, parse_int_list
from samplers.guidance import GUIDANCE

# --lower-order-final's words -> the solvers' lower_order_final (original DPM-Solver: only below 10 steps).
LOWER_ORDER_FINAL = {"always": True, "never": False, "below10": 10}


def _flag(option: str) -> str:
    """The older flag that sets `option`: EDM's spelling for the S_ options, hyphens otherwise."""
    return "--" + (option if option.startswith("S_") else option.replace("_", "-"))


def _join(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_device(device: str | None, local_rank: int = 0) -> torch.device | None:
    """--device: None stays None (the CLI's default); 'cuda' without an index is this rank's GPU. A name torch does
    not know, or CUDA on a machine without it, is a usage error naming --device."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise click.BadParameter(str(err), param_hint="--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def check_cuda_graph(cuda_graph: bool, device) -> None:
    """--cuda-graph needs a CUDA device: refused by name before anything runs (it failed in the first batch)."""
    if cuda_graph and torch.device(device).type != "cuda":
        raise click.BadParameter(f"CUDA graphs need a CUDA device, not {torch.device(device)} (--device)",
                                 param_hint="--cuda-graph")


def check_class(net, class_idx: int | None) -> None:
    """--class against the network's label_dim (a usage error naming --class)."""
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    if class_idx is not None and not label_dim:
        raise click.BadParameter(f"the network is unconditional (label_dim = 0); --class {class_idx} cannot apply",
                                 param_hint="--class")
    if class_idx is not None and class_idx >= label_dim:
        raise click.BadParameter(f"{class_idx} is out of range for label_dim = {label_dim}", param_hint="--class")


def seed_list(ctx, param, value):
    """click callback: EDM's seed syntax ('1,2,5-10') -> a non-empty list of ints; None (not given) stays None."""
    if value is None:
        return None
    try:
        seeds = parse_int_list(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    if not seeds:
        raise click.BadParameter("no seeds given")
    if max(seeds) >= 1 << 32:  # the per-seed generators take seed mod 2^32 (EDM): a larger seed repeats a smaller one
        raise click.BadParameter(f"seeds must be below 2^32 = {1 << 32}, got {max(seeds)}")
    if len(set(seeds)) != len(seeds):  # one image per seed: a repeat would be counted twice by the metrics
        repeated = sorted(seed for seed, count in collections.Counter(seeds).items() if count > 1)
        raise click.BadParameter(f"seed {_join(map(str, repeated[:5]))}{' ...' if len(repeated) > 5 else ''} "
                                 f"given more than once; expected each seed once")
    return seeds


def _check_solver(ctx, param, value):
    if value is not None and value not in SOLVERS:
        raise click.BadParameter(f"unknown solver {value!r}: expected one of {', '.join(sorted(SOLVERS))}")
    return value


def _lower_order_final(ctx, param, value):
    return None if value is None else LOWER_ORDER_FINAL[value]


def _apply(options, fn):
    for option in reversed(options):
        fn = option(fn)
    return fn


# The older per-option flags, by the name of the option each sets (see solver_option_flags).
OPTION_FLAGS = ("order", "variant", "lower_order_final", "exact_third_order", "S_churn", "S_min", "S_max", "S_noise")


def solver_option_flags(help_prefix: str = ""):
    """Decorator: --solver-opt and the older per-option flags (OPTION_FLAGS)."""
    def option(*names, help, **kwargs):
        return click.option(*names, help=help_prefix + help, default=None, show_default=False, **kwargs)

    options = [
        click.option("--solver-opt", "solver_opt", multiple=True, metavar="NAME=VALUE[,...]",
                     help=help_prefix + "A solver option, typed from the solver's signature (repeatable), e.g. "
                     "order=3,variant=bh2; the flags below are aliases"),
        option("--order", help="UniPC order / iPNDM max order  [default: 3 / 4]", metavar="INT",
               type=click.IntRange(min=1)),
        option("--variant", help="UniPC: bh1|bh2  [default: bh1]; DPM-Solver++: dpmsolver|taylor  [default: "
               "dpmsolver]", metavar="NAME", type=str),
        option("--lower-order-final", "lower_order_final", help="Lower-order final steps (DPM-Solver++, UniPC): "
               "always, never, or only below 10 steps (original DPM-Solver)  [default: always]",
               type=click.Choice(list(LOWER_ORDER_FINAL)), callback=_lower_order_final),
        option("--exact-third-order/--reference-third-order", "exact_third_order",
               help="DPM-Solver++(3M): truly third-order step instead of the reference codes' update  "
               "[default: reference]"),
        option("--S_churn", "S_churn", help="Stochasticity strength (heun)  [default: 0]", metavar="FLOAT",
               type=click.FloatRange(min=0)),
        option("--S_min", "S_min", help="Stoch. min noise level (heun)  [default: 0]", metavar="FLOAT",
               type=click.FloatRange(min=0)),
        option("--S_max", "S_max", help="Stoch. max noise level (heun)  [default: inf]", metavar="FLOAT",
               type=click.FloatRange(min=0)),
        option("--S_noise", "S_noise", help="Stoch. noise inflation (heun)  [default: 1]", metavar="FLOAT",
               type=float),
    ]
    return lambda fn: _apply(options, fn)


def solver_option(help_prefix: str = "", default: str | None = None, required: bool = False, deferred: bool = False):
    """Decorator: --solver, checked against the registry when the command runs (so a solver registered after import
    is accepted too). deferred: checked later by `sampler_config` against the registry of the snapshot's process
    (a process that is not sampled over a sigma grid, such as SPD, brings its own solvers)."""
    default_text = f"  [default: {default}]" if default else "  [default: heun, or the schedule file's]"
    names = ", ".join(SOLVERS)
    if deferred and default is None:  # generate.py, fid.py: a snapshot's process may bring its own solvers
        names += f"; SPD/DDPM snapshots: {', '.join(FOURIER_SOLVERS)}"
        default_text = ("  [default: heun, or the schedule file's; SPD/DDPM: ancestral, or dpmpp_2m when --steps "
                        "< T]")
    return click.option("--solver", help=f"{help_prefix}ODE solver: {names}{'' if required else default_text}",
                        metavar="NAME", default=default, required=required, show_default=False,
                        callback=None if deferred else _check_solver)


def speed_options(help_prefix: str = ""):
    """Decorator: --precision, --compile, --cuda-graph (samplers/accelerated.py; the defaults are EDM's exact call)."""
    options = [
        click.option("--precision", help=help_prefix + "Denoiser precision: fp32 (EDM) or bf16 autocast (GPUs; images "
                     "move by about a uint8 level)", type=click.Choice(list(PRECISIONS)), default="fp32",
                     show_default=True),
        click.option("--compile", "compile", help=help_prefix + "torch.compile the denoiser (the first batch compiles)",
                     is_flag=True),
        click.option("--cuda-graph", "cuda_graph", help=help_prefix + "Replay the fixed-shape denoiser call from CUDA "
                     "graphs (CUDA only)", is_flag=True),
    ]
    return lambda fn: _apply(options, fn)


def end_option(help_prefix: str = ""):
    zero = "/".join(name for name, entry in SOLVERS.items() if entry.default_end == "zero")
    return click.option("--end", help=help_prefix + "Grid end: append sigma=0 and denoise, or stop at sigma_min  "
                        f"[default: the solver's convention: zero for {zero}, sigma_min otherwise]",
                        type=click.Choice(list(END_CONVENTIONS)), default=None, show_default=False)


_GUIDANCE_PREFIX = "guidance__"  # parameter names of the guidance flags: guidance__NAME, guidance__NAME__OPTION
_CLICK_TYPES = {float: click.FLOAT, int: click.INT, str: click.STRING}


def guidance_options(help_prefix: str = ""):
    """Decorator: the flags of every guidance in samplers.guidance.GUIDANCE (its enabling flag and its options)."""
    options = []
    for name, entry in GUIDANCE.items():
        options.append(click.option(entry.flag, f"{_GUIDANCE_PREFIX}{name}", metavar=entry.metavar, type=str,
                                    default=None, help=help_prefix + entry.help))
        for opt in entry.options:
            dest = f"{_GUIDANCE_PREFIX}{name}__{opt.key}"
            text = f"{help_prefix}{opt.help}  [default: {opt.default}; needs {entry.flag}]"
            if opt.type is bool:
                options.append(click.option(opt.flag, dest, is_flag=True, default=None, help=text))
            else:
                options.append(click.option(opt.flag, dest, type=_CLICK_TYPES[opt.type], metavar=opt.metavar,
                                            default=None, show_default=False, help=text))
    return lambda fn: _apply(options, fn)


def guidance_from_cli(option_flags: dict) -> dict:
    """Take the guidance flags out of `option_flags` (removed from it) -> SamplerConfig.guidance. An option given
    without its guidance's enabling flag is an error, as are values the guidance refuses."""
    given = {key: option_flags.pop(key) for key in list(option_flags) if key.startswith(_GUIDANCE_PREFIX)}
    guidance = {}
    for name, entry in GUIDANCE.items():
        value = given.get(f"{_GUIDANCE_PREFIX}{name}")
        options = {opt.key: given.get(f"{_GUIDANCE_PREFIX}{name}__{opt.key}") for opt in entry.options}
        options = {key: v for key, v in options.items() if v is not None and v is not False}
        if value is None:
            if options:
                flags = ", ".join(entry.option(key).flag for key in options)
                raise click.UsageError(f"{flags} {'needs' if len(options) == 1 else 'need'} {entry.flag}")
            continue
        try:
            entry.build(value, **options)  # checks the values now, with the flag's name
        except ValueError as err:
            raise click.UsageError(str(err)) from None
        guidance[name] = dict(value=value, **options)
    return guidance


# ---------------------------------------------------------------------------------------------------------------------
# EDM's generate.py options (NVlabs/edm's ablation_sampler) as aliases.

EDM_DISCRETIZATIONS = ("vp", "ve", "iddpm", "edm")  # --disc: our schedules of the same names (samplers/schedules.py)
EDM_SCALINGS = ("vp", "none")
_EDM_ODE_SCHEDULES = {"vp": "sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)", "ve": "sigma(t) = sqrt(t)"}


def resolve_edm_aliases(schedule: str | None, disc: str | None,
                        scaling: str | None) -> tuple[str, dict, list[str]]:
    """EDM's --disc / --schedule / --scaling -> (our --schedule, the time-ODE options of euler_time / heun_time, or
    {} for the ODE in sigma, notes to print)."""
    notes, ode = [], {}
    edm_style = disc is not None or scaling is not None
    if scaling == "vp":  # EDM's s(t) = 1/sqrt(1 + sigma(t)^2)
        ode["ode_scaling"] = "vp"
    if schedule == "linear":  # EDM's sigma(t) = t: the ODE integrated here; the grid comes from --disc (EDM: edm)
        schedule = None
    elif schedule in _EDM_ODE_SCHEDULES and edm_style:
        # EDM's sigma(t) of its ablation ODE, stepped in that time; the time steps come from --disc (EDM: edm).
        ode["ode_schedule"] = schedule
        schedule = None
    elif schedule in _EDM_ODE_SCHEDULES:
        notes.append(f"--schedule={schedule} is the {schedule.upper()} time discretisation here (EDM's "
                     f"--disc={schedule}), integrated in sigma; EDM's --schedule={schedule} (its ODE in "
                     f"{schedule.upper()} time, on EDM's default time steps) is --disc=edm --schedule={schedule}")
    if disc is not None:
        if schedule is not None and schedule != disc:
            raise click.UsageError(f"--disc={disc} and --schedule={schedule} both choose the time steps; give one "
                                   f"(--disc={disc} is --schedule={disc} here)")
        schedule = disc
    return ("edm" if schedule is None else schedule), ode, notes


# ---------------------------------------------------------------------------------------------------------------------
# --preset: a published configuration's sampler options (the CLI passes the table: training.presets.SAMPLER_PRESETS).


def _print_presets(presets: dict, sources: dict) -> None:
    for name, options in presets.items():
        flags = " ".join(f"--{key}={value}" for key, value in options.items())
        click.echo(f"{name}  ({sources.get(name, '')})\n  {flags}")


def preset_option(presets: dict, sources: dict, help_prefix: str = ""):
    """Decorator: --preset=NAME|list. `list` prints every preset with its source and options, then exits (before
    the required options are checked)."""
    def list_presets(ctx, param, value):
        if value == "list" and not ctx.resilient_parsing:
            _print_presets(presets, sources)
            ctx.exit(0)
        return value

    return click.option("--preset", help=help_prefix + f"A published sampler configuration ({', '.join(presets)}): "
                        "its options, under the ones given explicitly; --preset=list prints them with their sources",
                        metavar="NAME|list", type=str, default=None, is_eager=True, callback=list_presets)


def _preset_param(ctx, key: str):
    for param in ctx.command.params:
        if isinstance(param, click.Option) and (f"--{key}" in param.opts or f"--{key.replace('_', '-')}" in param.opts):
            return param
    raise ValueError(f"a preset sets {key!r}, which is no option of {ctx.command.name}")


def _flag_text(param, value) -> str:
    return f"{param.opts[0]}={value}"


def apply_preset(name: str | None, sampler_cli: dict, presets: dict, sources: dict | None = None,
                 ctx: click.Context | None = None) -> list[str]:
    """Fill `sampler_cli` (the command's sampler parameters, changed in place) with preset `name`'s options that the
    command line did not give; returns the lines to print (the preset, its source, and each explicit option that
    replaced a preset value). A preset's solver options go with its solver: an explicit --solver of another name drops
    them, and a --solver-opt of the same option replaces them."""
    if name is None:
        return []
    if name not in presets:
        raise click.BadParameter(f"unknown preset {name!r}: expected one of {', '.join(presets)} (--preset=list "
                                 f"shows their sources)", param_hint="--preset")
    ctx = ctx or click.get_current_context()
    explicit = {param.name for param in ctx.command.params if ctx.get_parameter_source(param.name) in (
        click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)}
    preset = presets[name]
    solver = sampler_cli.get("solver") if "solver" in explicit else preset.get("solver")
    entry = SOLVERS.get(solver or "heun")
    given_opts = set()
    for text in sampler_cli.get("solver_opt") or ():
        for pair in re.split(r"[,\s]+", text.strip()):
            key = pair.partition("=")[0]
            given_opts.add(entry.option_name(key) if entry is not None and entry.option_name(key) else key)
    applied, replaced, dropped = [], [], []
    for key, value in preset.items():
        param = _preset_param(ctx, key)
        if param.name in explicit:
            replaced.append(f"{_flag_text(param, sampler_cli[param.name])} (preset: {value})")
            continue
        if key in OPTION_FLAGS:
            option = entry.option_name(key) if entry is not None else None
            if "solver" in explicit and sampler_cli.get("solver") != preset.get("solver", "heun"):
                dropped.append(f"{_flag_text(param, value)} (an option of {preset.get('solver', 'heun')})")
                continue
            if option in given_opts or key in given_opts:
                replaced.append(f"--solver-opt {option or key} (preset: {param.opts[0]}={value})")
                continue
        sampler_cli[param.name] = param.process_value(ctx, value)
        applied.append(_flag_text(param, value))
    lines = [f"Preset {name}" + (f" ({sources[name]})" if sources and name in sources else "") + ": "
             + " ".join(applied or ["(nothing left to set)"])]
    if replaced:
        lines.append(f"Preset {name}: explicit options win: {', '.join(replaced)}")
    if dropped:
        lines.append(f"Preset {name}: --solver={sampler_cli.get('solver')} drops the preset's solver options: "
                     f"{', '.join(dropped)}")
    return lines


@contextlib.contextmanager
def preset_in_errors(name: str | None, presets: dict, sampling=None, process_name: str = ""):
    """Around building the sampler config: a preset is refused for a process with samplers of its own (SPD: EDM's
    --preset=edm-cifar10 turned silently into DPM-Solver++(2M) at its 18 steps), and an option error says what the
    preset set (an --rho it gave was refused beside a schedule file as if typed)."""
    if name is not None and hasattr(sampling, "refuse_grid_flags"):
        raise click.UsageError(f"--preset={name} is a sigma-grid sampler configuration; this network's process "
                               f"{process_name!r} brings its own samplers: leave --preset out")
    try:
        yield
    except click.UsageError as err:
        if name is not None:
            given = " ".join(f"--{key}={value}" for key, value in presets[name].items())
            err.message = f"{err.message} (--preset={name} gives {given}; explicit options win over it)"
        raise


def snapshot_sampler(snapshot, sampler_cli: dict, preset: str | None, presets: dict):
    """How generate.py and fid.py calc --network sample a loaded snapshot: its process's sampling (the way it was
    trained), the config of the sampler flags and the one-line summary, as (config, summary, notes to print). Errors
    are one line (click.UsageError), naming the preset where it set the option."""
    sampling = snapshot.process.sampling
    notes = []
    with preset_in_errors(preset, presets, sampling, snapshot.process.name):
        config = sampler_config(**sampler_cli, sampling=sampling, notes=notes)  # its process may bring its own solvers
        try:
            summary = sampling.describe(snapshot.net, config)
            cautions = losses.stochastic_sampling_notes(snapshot.data.get("loss"))
            if cautions and getattr(sampling, "draws_noise", None) and sampling.draws_noise(snapshot.net, config):
                notes.extend(f"this snapshot {caution}; this sampler draws noise in its steps: sample with a "
                             f"deterministic one (--S_churn=0; SPD/DDPM snapshots: --solver ddim, heun or dpmpp_2m)"
                             for caution in cautions)
        except ValueError as err:
            raise click.UsageError(str(err)) from None
    return config, summary, notes


def sampler_options(help_prefix: str = "", solver_default: str | None = None, steps_default: int | None = None,
                    guidance: bool = True):
    """Decorator: every flag that decides how a seed becomes an image (besides the network and --device).
    guidance: also the flags of samplers.guidance.GUIDANCE (discriminator guidance)."""
    # steps_default: the steps of a named schedule when --steps is not given, applied by the command (the option's
    # default stays None: a schedule file brings its own count, and naming one the user never gave would mislead).
    steps_text = f"  [default: {steps_default or 18}, or the schedule file's]"
    if solver_default is None and steps_default is None:  # generate.py, fid.py: also SPD/DDPM snapshots
        steps_text = "  [default: 18, or the schedule file's; SPD/DDPM snapshots: all T (ancestral)]"
    options = [
        click.option("--class", "class_idx", help=help_prefix + "Class label  [default: random]", metavar="INT",
                     type=click.IntRange(min=0), default=None, show_default=False),
        click.option("--steps", "num_steps", help=help_prefix + "Number of sampling steps" + steps_text,
                     metavar="INT", type=click.IntRange(min=1), default=None, show_default=False),
        click.option("--sigma_min", help=help_prefix + "Lowest noise level  [default: varies]", metavar="FLOAT",
                     type=click.FloatRange(min=0, min_open=True)),
        click.option("--sigma_max", help=help_prefix + "Highest noise level  [default: varies]", metavar="FLOAT",
                     type=click.FloatRange(min=0, min_open=True)),
        click.option("--rho", help=help_prefix + "Time step exponent (schedules edm, vp_time_uniform)  [default: 7 "
                     "for edm]", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=None,
                     show_default=False),
        solver_option(help_prefix, default=solver_default, deferred=True),
        click.option("--schedule", help=help_prefix + f"Noise-level grid: {', '.join(SCHEDULES)}, or a schedule file "
                     "(.json, LD3 .pt); EDM's --schedule=linear is accepted (the ODE every solver here integrates); "
                     "beside --disc or --scaling, vp|ve are EDM's (its ODE in VP/VE time: euler_time / heun_time)  "
                     "[default: edm]", metavar="NAME|PATH", type=str, default=None, show_default=False),
        click.option("--disc", help=help_prefix + "EDM's --disc (ablation sampler's time steps): the --schedule of the "
                     "same name", type=click.Choice(list(EDM_DISCRETIZATIONS)), default=None),
        click.option("--scaling", help=help_prefix + "EDM's --scaling: none (what every solver here integrates); vp "
                     "steps EDM's scaled ODE (euler_time / heun_time)", type=click.Choice(list(EDM_SCALINGS)),
                     default=None),
        end_option(help_prefix),
        click.option("--denoise-to-zero", "denoise_to_zero", help=help_prefix + "After a grid ending at sigma_min, "
                     "output D(x; sigma_min) (+1 NFE)", is_flag=True),
        solver_option_flags(help_prefix),
        speed_options(help_prefix),
        *([guidance_options(help_prefix)] if guidance else []),
    ]
    return lambda fn: _apply(options, fn)


def resolve_solver(solver: str | None, schedule: str) -> str:
    """--solver, else the solver a schedule file was learned for, else EDM's heun."""
    if solver is not None:
        return solver
    if schedule in SCHEDULES:
        return "heun"
    try:
        file_solver = make_grid(schedule, None).solver
    except (ValueError, FileNotFoundError) as e:
        raise click.BadParameter(str(e), param_hint="--schedule") from None
    if file_solver is None:
        raise click.UsageError(f"{schedule!r} does not record the solver it was learned for (LD3 .pt); pass --solver")
    return file_solver


def solver_kwargs_from_cli(solver: str, solver_opt=(), solvers=None, **option_flags) -> dict:
    """The keyword options for `solver` from --solver-opt NAME=VALUE texts and the older flags (None: not given). An
    option given for a solver that does not take it is an error, never silently ignored. solvers: the registry the
    name belongs to (default samplers.SOLVERS; a process's sampling object may bring its own)."""
    registry = SOLVERS if solvers is None else solvers
    if solver not in registry:
        raise click.BadParameter(f"unknown solver {solver!r}: expected one of {', '.join(sorted(registry))}",
                                 param_hint="--solver")
    entry = registry[solver]
    kwargs, given_by = {}, {}

    def set_option(option, value, flag):
        if option in given_by:
            raise click.UsageError(f"{flag} and {given_by[option]} both set {solver}'s option {option!r}")
        kwargs[option], given_by[option] = value, flag

    for text in solver_opt:
        for pair in re.split(r"[,\s]+", text.strip()):
            name, sep, value = pair.partition("=")
            option = entry.option_name(name)
            if not sep or option is None:
                why = f"expects NAME=VALUE, got {pair!r}" if not sep else f"{name!r} is not an option of solver " \
                    f"{solver!r}"
                raise click.UsageError(f"--solver-opt {why}; {solver}'s options: {', '.join(entry.options())}")
            try:
                set_option(option, entry.parse_option(option, value), f"--solver-opt {name}")
            except ValueError as err:
                raise click.UsageError(f"--solver-opt {pair}: {err}") from None
    for name, value in option_flags.items():
        if value is None:
            continue
        option = entry.option_name(name)
        if option is None:
            takers = [other for other, e in registry.items() if e.option_name(name) is not None]
            if not takers:  # a process's own registry (SPD's) where no solver has the option: say so, not "only to"
                raise click.UsageError(f"{_flag(name)} does not apply to any solver of the snapshot's process (its "
                                       f"solvers: {', '.join(registry)}); {solver}'s options: "
                                       f"{', '.join(entry.options()) or 'none'} (--solver-opt NAME=VALUE)")
            raise click.UsageError(f"{_flag(name)} does not apply to solver {solver!r} (only to {', '.join(takers)})")
        choices = entry.choices(option)
        if choices is not None and value not in choices:
            raise click.UsageError(f"{_flag(name)} for solver {solver!r} must be one of "
                                   f"{', '.join(str(c) for c in choices)}")
        set_option(option, value, _flag(name))
    return kwargs


def sampler_config(solver, schedule, num_steps, sigma_min, sigma_max, rho, end, denoise_to_zero=False,
                   solver_opt=(), precision="fp32", compile=False, cuda_graph=False, disc=None, scaling=None,
                   notes: list | None = None, **option_flags) -> SamplerConfig:
    """Map the sampler flags to a SamplerConfig, with the errors a user can act on. The solver stays None when
    --solver is not given (heun, or a schedule file's), so that a config of defaults means "no sampler option given"
    (a one-step snapshot is then sampled in one step, samplers/onestep.py). disc, scaling: EDM's options
    (resolve_edm_aliases); notes: a list that receives the lines worth printing about them."""
    sampling = option_flags.get("sampling")
    if hasattr(sampling, "refuse_grid_flags"):
        # A process sampled over its own time steps (SPD) refuses the sigma-grid flags; checked here, where the
        # flags are still as typed (--disc=vp becomes --schedule=vp below). EDM's no-op spellings stay accepted.
        try:
            sampling.refuse_grid_flags({
                "--schedule": None if schedule in (None, "edm", "linear") else schedule,
                "--disc": None if disc in (None, "edm") else disc, "--scaling": scaling if scaling == "vp" else None,
                "--sigma_min": sigma_min, "--sigma_max": sigma_max, "--rho": rho, "--end": end,
                "--denoise-to-zero": denoise_to_zero})
        except ValueError as err:
            raise click.UsageError(str(err)) from None
    schedule, ode_options, alias_notes = resolve_edm_aliases(schedule, disc, scaling)
    if notes is not None:
        notes.extend(alias_notes)
    from_file = schedule not in SCHEDULES
    if from_file:
        schedule = os.path.expanduser(schedule)  # --schedule=~/x.json: the shell expands no ~ after "="
    if from_file and not os.path.isfile(schedule):
        raise click.BadParameter(f"{schedule!r} is neither a schedule name ({', '.join(SCHEDULES)}) nor an existing "
                                 f"schedule file", param_hint="--schedule")
    if from_file and any(v is not None for v in (sigma_min, sigma_max, rho)):
        raise click.UsageError("--sigma_min, --sigma_max and --rho do not apply to a schedule file (it holds its grid)")
    guidance = guidance_from_cli(option_flags)
    # sampling=: the loaded snapshot's sampling object, whose process may bring its own solvers (`solvers`) and
    # choose its default (`solver_for(solver, num_steps)`); without one, samplers.SOLVERS and heun.
    sampling = option_flags.pop("sampling", None)
    chosen = sampling.solver_for(solver, num_steps) if hasattr(sampling, "solver_for") else \
        resolve_solver(solver, schedule)
    if ode_options:
        # EDM's ablation ODE in VP/VE time or with VP scaling: its Euler or Heun, stepping in that time.
        flags = " ".join(f"--{'scaling' if key == 'ode_scaling' else 'schedule'}={value}"
                         for key, value in sorted(ode_options.items()))
        if chosen not in ("euler", "heun") or from_file:
            raise click.UsageError(f"{flags} (EDM's ablation ODE in another time variable) is stepped by EDM's "
                                   f"--solver=euler or heun on a named grid, not by {chosen}"
                                   f"{' on a schedule file' if from_file else ''}")
        chosen = solver = f"{chosen}_time"
    solver_kwargs = solver_kwargs_from_cli(chosen, solver_opt, solvers=getattr(sampling, "solvers", None),
                                           **option_flags)
    given = sorted(set(ode_options) & set(solver_kwargs))
    if given:
        raise click.UsageError(f"--solver-opt {', '.join(given)} and EDM's --schedule/--scaling both set the time "
                               f"ODE: give one")
    solver_kwargs.update(ode_options)
    schedule_kwargs = {}
    if rho is not None:
        takers = [name for name, fn in SCHEDULES.items() if "rho" in inspect.signature(fn).parameters]
        if schedule not in takers:
            raise click.UsageError(f"--rho applies to schedules {_join(takers)}, not {schedule!r}")
        schedule_kwargs["rho"] = rho
    return SamplerConfig(precision=precision, compile=compile, cuda_graph=cuda_graph, solver=solver,
                         schedule=schedule, num_steps=num_steps, sigma_min=sigma_min,
                         sigma_max=sigma_max, end=end, denoise_to_zero=denoise_to_zero, solver_kwargs=solver_kwargs,
                         schedule_kwargs=schedule_kwargs, guidance=guidance)
