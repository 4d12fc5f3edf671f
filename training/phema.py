"""Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR 2024, §3).

During training, EMAs with power-function profiles are tracked (`--phema=0.05,0.10`: their relative standard
deviations) and saved beside every snapshot; afterwards `phema.py --run DIR --std S --at KIMG` reconstructs the EMA of
any other length by least squares over the saved ones, without retraining.

A power-function EMA with exponent gamma averages the weights theta(tau) over training time tau in [0, t] with density
p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1). Its width relative to t is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))                       (EDM2, eq. 3)

Per optimisation step k = 1, 2, ...: ema <- beta ema + (1 - beta) theta_k with beta_k = (1 - 1/k)^(gamma + 1), which
gives theta_j the weight (j^(gamma+1) - (j-1)^(gamma+1)) / k^(gamma+1), i.e. exactly the profile's mass on step j's
interval [j - 1, j]: time is counted in steps. Reconstruction: with saved profiles p_i = p_{t_i,gamma_i} and the
wanted p_r, minimise || sum_i x_i p_i - p_r ||^2 in L2([0, inf)): solve A x = b with A_ij = <p_i, p_j>,
b_i = <p_i, p_r>, where for profiles of (t_a, g_a), (t_b, g_b)

    <p_a, p_b> = (g_a + 1)(g_b + 1) min(t_a, t_b)^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)),

and the reconstructed weights are sum_i x_i theta_i, with x scaled to sum to 1 as EDM2's solve_posthoc_coefficients
does (a combination of averages must leave constant weights unchanged; the least-squares x alone sums to 0.87-1.01
for widths 0.02-0.25 from stds 0.05 and 0.10 saved at five times). The parameters are linear in the EMAs, so the
result is exact up to how well the profiles span p_r: `reconstruction_misfit` is the relative L2 distance of the
combined profile from p_r, logged with every reconstruction and warned about above MISFIT_WARNING.

A resumed run writes into a new directory; its training_options.json names the state it resumed from, and the saved
EMAs of that earlier run up to the state's kimg are used too (`run_chain`), so a reconstruction sees the whole run.
"""

import copy
import glob
import os
import re
import warnings

import numpy as np
import torch

from training.run_chain import run_chain


def std_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of a power-function EMA of relative width sigma_rel (the real root of EDM2's cubic
    gamma^3 + 7 gamma^2 + (16 - 1/s^2) gamma + (12 - 1/s^2) = 0, from eq. 3)."""
    sigma_rel = float(sigma_rel)
    if not 0 < sigma_rel < 12 ** -0.5:  # gamma = 0 (a plain average) has the largest width, 1/sqrt(12)
        raise ValueError(f'a relative EMA width must be in (0, {12 ** -0.5:.4f}), got {sigma_rel}')
    c = 1 / sigma_rel ** 2
    roots = np.roots([1.0, 7.0, 16.0 - c, 12.0 - c])
    real = roots[np.abs(roots.imag) < 1e-9].real
    return float(real.max())


def gamma_to_std(gamma: float) -> float:
    """sigma_rel of a power-function EMA with exponent gamma (EDM2, eq. 3)."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def profile_inner_product(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> in L2 (broadcasting numpy arrays), in float64."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    t_min = np.minimum(t_a, t_b)
    # In logs: t^(gamma + 1) overflows float64 for gamma ~ 7 and t ~ 1e5 steps.
    log_value = (np.log(g_a + 1) + np.log(g_b + 1) + (g_a + g_b + 1) * np.log(t_min) - np.log(g_a + g_b + 1)
                 - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return np.exp(log_value)


def _normal_equations(t_saved, gamma_saved, t_target: float, gamma_target: float):
    """A_ij = <p_i, p_j> and b_i = <p_i, p_r> of the saved profiles p_i and the target p_r."""
    t_saved, gamma_saved = np.asarray(t_saved, np.float64), np.asarray(gamma_saved, np.float64)
    A = profile_inner_product(t_saved[:, None], gamma_saved[:, None], t_saved[None, :], gamma_saved[None, :])
    return A, profile_inner_product(t_saved, gamma_saved, t_target, gamma_target)


def reconstruction_weights(t_saved, gamma_saved, t_target: float, gamma_target: float) -> np.ndarray:
    """Coefficients x of the saved EMAs whose combination best matches the target profile (least squares)."""
    x, *_ = np.linalg.lstsq(*_normal_equations(t_saved, gamma_saved, t_target, gamma_target), rcond=None)
    return x / x.sum()


MISFIT_WARNING = 0.10


def reconstruction_misfit(t_saved, gamma_saved, weights, t_target: float, gamma_target: float) -> float:
    """|| sum_i x_i p_i - p_r || / || p_r || in L2, from the profiles' inner products (0: the target exactly)."""
    x = np.asarray(weights, np.float64)
    A, b = _normal_equations(t_saved, gamma_saved, t_target, gamma_target)
    target = profile_inner_product(t_target, gamma_target, t_target, gamma_target)
    return float(np.sqrt(max(target - 2 * x @ b + x @ A @ x, 0.0) / target))


class PowerEMA:
    """The power-function EMAs of one network, one copy per relative width (float32, same device as the net)."""

    def __init__(self, net: torch.nn.Module, stds):
        self.stds = tuple(float(s) for s in stds)
        self.gammas = {std: std_to_gamma(std) for std in self.stds}
        self.emas = {std: copy.deepcopy(net).eval().requires_grad_(False) for std in self.stds}

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        """After optimisation step `step` (1, 2, ...): ema <- lerp(ema, net, 1 - beta), beta = (1 - 1/step)^(g+1)."""
        net_params = [p.detach() for p in net.parameters()]
        for std, ema in self.emas.items():
            beta = (1 - 1 / step) ** (self.gammas[std] + 1)
            ema_params = list(ema.parameters())
            if ema_params:
                torch._foreach_lerp_(ema_params, net_params, 1.0 - beta)
            for b_ema, b_net in zip(ema.buffers(), net.buffers()):
                b_ema.copy_(b_net)

    def state_dict(self) -> dict:
        return {f'{std:g}': ema.state_dict() for std, ema in self.emas.items()}

    def load_state_dict(self, state: dict) -> None:
        for std, ema in self.emas.items():
            ema.load_state_dict(state[f'{std:g}'])


def phema_file_name(kimg: int, std: float) -> str:
    return f'phema-{kimg:06d}-{std:.3f}.pkl'


_NAME_RE = re.compile(r'phema-(\d{6,})-(\d+\.\d+)\.pkl$')  # 7 digits from 1,000,000 kimg on


def saved_emas(run_dir: str, at_kimg: int | None = None) -> list[dict]:
    """The phema files of a run and of the runs it resumed from (run_chain): [{'path', 'kimg', 'std'}], up to
    `at_kimg`, by kimg then std; where two runs saved the same kimg and width, the later run's file."""
    found = {}
    for directory, limit in run_chain(run_dir, 'saved EMAs'):
        for path in glob.glob(os.path.join(glob.escape(directory), 'phema-*.pkl')):
            match = _NAME_RE.search(os.path.basename(path))
            if not match:
                continue
            kimg, std = int(match.group(1)), float(match.group(2))
            if (at_kimg is None or kimg <= at_kimg) and (limit is None or kimg <= limit):
                found[kimg, std] = dict(path=path, kimg=kimg, std=std)
    return [found[key] for key in sorted(found)]


@torch.no_grad()
def reconstruct(run_dir: str, std: float, at_kimg: int | None = None, log=print):
    """The post-hoc EMA of relative width `std` at the latest saved time <= at_kimg, from the run's phema files.

    Returns (snapshot data dict of the latest file with 'ema' replaced, info). The files are read one at a time
    (memory: two networks) through the safe importer.
    """
    from training import snapshots

    gamma = std_to_gamma(std)  # a width out of range (or nan) before any file is read
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f'{run_dir}: no such run directory')
    entries = saved_emas(run_dir, at_kimg)
    if not entries:
        available = saved_emas(run_dir)
        if not available:
            raise FileNotFoundError(f'{run_dir}: no phema-*.pkl files (train with --phema=0.05,0.10)')
        raise FileNotFoundError(f'{run_dir}: no phema-*.pkl files up to kimg {at_kimg}; the saved EMAs are at kimg '
                                f'{available[0]["kimg"]}-{available[-1]["kimg"]}')
    headers = []
    for entry in entries:
        data = snapshots.read_snapshot(entry['path']).data
        info = data.get('phema')
        try:
            step, saved_gamma = int(info['step']), float(info['gamma'])
            if step < 1 or not saved_gamma > -1:  # a profile needs time behind it and a finite mass (gamma > -1)
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise ValueError(f'{entry["path"]}: not a saved post-hoc EMA (expected a phema record with its step >= 1 '
                             f'and gamma > -1, as train.py --phema writes)') from None
        headers.append((entry, step, saved_gamma))
    target_kimg = entries[-1]['kimg']
    target_step = max(step for entry, step, _ in headers if entry['kimg'] == target_kimg)
    steps, gammas = [s for _, s, _ in headers], [g for _, _, g in headers]
    weights = reconstruction_weights(steps, gammas, target_step, gamma)
    misfit = reconstruction_misfit(steps, gammas, weights, target_step, gamma)
    total, template, latest = None, None, None
    for (entry, _, _), weight in zip(headers, weights):
        data = snapshots.read_snapshot(entry['path']).data
        state = data['ema'].state_dict()
        if total is None:
            total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items() if v.is_floating_point()}
            template = data['ema']
        for name in total:
            total[name].add_(state[name].to(torch.float64), alpha=float(weight))
        if entry['kimg'] == target_kimg:
            latest = data
    state = template.state_dict()
    state.update({name: value.to(state[name].dtype) for name, value in total.items()})
    template.load_state_dict(state)
    latest = dict(latest, ema=template, phema=dict(std=float(std), gamma=gamma, step=target_step,
                                                   kimg=target_kimg, reconstructed_from=len(entries),
                                                   misfit=misfit))
    directories = sorted({os.path.dirname(e['path']) for e in entries})
    log(f'Reconstructed the EMA of std {std} at kimg {target_kimg} (step {target_step}) from {len(entries)} saved EMAs '
        f'(stds {sorted({e["std"] for e in entries})}, kimg {entries[0]["kimg"]}-{target_kimg}'
        f'{f", {len(directories)} run directories" if len(directories) > 1 else ""}); profile misfit '
        f'{100 * misfit:.1f}% (relative L2), largest coefficient {np.abs(weights).max():.3g}')
    if misfit > MISFIT_WARNING:  # stacklevel 3: past torch.no_grad's wrapper, to the caller
        warnings.warn(f'the combined profile differs from the EMA profile of std {std} by {100 * misfit:.1f}% '
                      f'(relative L2): the result is not that EMA. Reconstruct a width between or near the saved '
                      f'ones ({", ".join(f"{w:g}" for w in sorted({e["std"] for e in entries}))}), or with more '
                      f'saved times (--snap)', stacklevel=3)
    return latest, dict(weights=weights.tolist(), files=[e['path'] for e in entries], misfit=misfit)
