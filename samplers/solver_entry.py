"""A solver's registry entry: the function, its conventional grid end, its NFE rule and the other names of its options.

A solver's options are its keyword-only parameters, less the inputs that `samplers.sample` fills in itself
(SAMPLE_INPUTS). Their types come from the signature (annotation, else the default's type), so a command line can set
any option of any solver as text (`--solver-opt order=3,variant=bh2`) without a table of flags. See docs/solvers.md.
"""

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping

# Keyword parameters a solver may declare that samplers.sample supplies, not the user: a grid's decoupled evaluation
# levels (LD3), the per-seed noise source of a stochastic solver, and the network's round_sigma.
SAMPLE_INPUTS = ("eval_sigmas", "randn_like", "round_sigma")

_BOOLEAN_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


def never_adds_noise(options: dict) -> bool:
    """A deterministic solver: its steps draw no noise beyond the starting latents."""
    return False


def always_adds_noise(options: dict) -> bool:
    """An ancestral solver: every step but the last draws fresh noise."""
    return True


def one_call_per_step(num_steps: int, end: str) -> int:
    """NFE of a solver that calls the denoiser once per step, whatever the grid's end (Euler, the multistep
    solvers)."""
    return num_steps


@dataclasses.dataclass(frozen=True)
class SolverEntry:
    """What callers need to know about a solver besides calling it.

    function: `solver(denoiser, x, sigmas, class_labels=None, **options) -> x`.
    default_end: the grid end the solver's reference code uses, 'zero' (EDM: sigma = 0 appended, the last step
        denoises) or 'sigma_min' (the output is returned at sigma_min).
    nfe: (num_steps, end) -> denoiser calls per sample, before an optional denoise_to_zero.
    aliases: other names of options, e.g. {'order': 'max_order'} lets `--order` set iPNDM's max_order.
    distinct_levels: the solver's coefficients divide by a step's length in log sigma (the multistep solvers in
        lambda), so a grid whose levels repeat (a network's round_sigma can snap neighbours onto one level) is
        refused rather than sampled into NaNs; Euler, Heun and iPNDM take a repeated level as a zero step, as EDM.
    adds_noise: (options with defaults filled) -> whether its steps draw fresh noise beyond the starting latents
        (Heun's churn, ancestral steps): what a network trained on paired noise (AOT) was not trained for.
    """

    function: Callable
    default_end: str
    nfe: Callable[[int, str], int] = one_call_per_step
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    distinct_levels: bool = False
    adds_noise: Callable[[dict], bool] = never_adds_noise

    @functools.cached_property
    def _keyword_parameters(self) -> dict[str, inspect.Parameter]:
        # Read once per entry: samplers.sample consults it on every call.
        signature = inspect.signature(self.function, eval_str=True)
        return {p.name: p for p in signature.parameters.values() if p.kind == inspect.Parameter.KEYWORD_ONLY}

    def options(self) -> dict[str, inspect.Parameter]:
        """The options a user may set, by name, in the signature's order."""
        return {name: p for name, p in self._keyword_parameters.items() if name not in SAMPLE_INPUTS}

    def defaults(self) -> dict:
        """The options that have a default, with it: what the solver runs with where an option is not given."""
        return {name: p.default for name, p in self.options().items() if p.default is not inspect.Parameter.empty}

    def takes_input(self, name: str) -> bool:
        """Whether the solver declares the sample input `name` (one of SAMPLE_INPUTS)."""
        return name in self._keyword_parameters

    def option_name(self, name: str) -> str | None:
        """The option that `name` sets for this solver (the option itself or through an alias), or None."""
        name = self.aliases.get(name, name)
        return name if name in self.options() else None

    def option_type(self, name: str):
        """The option's annotation, or the type of its default where it has none."""
        parameter = self.options()[name]
        if parameter.annotation is not inspect.Parameter.empty:
            return parameter.annotation
        return str if parameter.default in (inspect.Parameter.empty, None) else type(parameter.default)

    def choices(self, name: str) -> tuple | None:
        """The allowed values of an option annotated Literal[...], else None."""
        annotation = self.option_type(name)
        return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None

    def parse_option(self, name: str, text: str):
        """The value of option `name` written as text, typed from the signature; ValueError if it does not parse."""
        return parse_value(self.option_type(name), text)

    def check_options(self, options: Mapping, solver: str) -> None:
        """ValueError naming the options that `solver` (this entry's registry name) does not take."""
        accepted = list(self.options())
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"solver {solver!r} does not take option(s) {unknown}; it accepts {accepted}")


def parse_value(annotation, text: str):
    """Text -> a value of `annotation`: bool, int, float, str, Literal[...] or a union of them, tried in order."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"expected one of {', '.join(str(c) for c in choices)}, got {text!r}")
    if origin in (typing.Union, types.UnionType):
        problems = []
        for member in typing.get_args(annotation):
            try:
                return parse_value(member, text)
            except ValueError as err:
                problems.append(str(err))
        raise ValueError("; ".join(problems))
    if annotation is bool:
        if text.lower() not in _BOOLEAN_WORDS:
            raise ValueError(f"expected true or false, got {text!r}")
        return _BOOLEAN_WORDS[text.lower()]
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(f"expected {'an integer' if annotation is int else 'a number'}, got {text!r}") from None
    if annotation is str:
        return text
    raise ValueError(f"an option of type {annotation} cannot be given as text")
