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

and the reconstructed weights are sum_i x_i theta_i. The parameters are linear in the EMAs, so this is exact up to
how well the profiles span p_r.
"""

import copy
import glob
import os
import re

import numpy as np
import torch


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


def reconstruction_weights(t_saved, gamma_saved, t_target: float, gamma_target: float) -> np.ndarray:
    """Coefficients x of the saved EMAs whose combination best matches the target profile (least squares)."""
    t_saved, gamma_saved = np.asarray(t_saved, np.float64), np.asarray(gamma_saved, np.float64)
    A = profile_inner_product(t_saved[:, None], gamma_saved[:, None], t_saved[None, :], gamma_saved[None, :])
    b = profile_inner_product(t_saved, gamma_saved, t_target, gamma_target)
    x, *_ = np.linalg.lstsq(A, b, rcond=None)
    return x


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


_NAME_RE = re.compile(r'phema-(\d{6})-(\d+\.\d+)\.pkl$')


def saved_emas(run_dir: str, at_kimg: int | None = None) -> list[dict]:
    """The phema files of a run: [{'path', 'kimg', 'std'}], up to `at_kimg`, by kimg then std."""
    found = []
    for path in glob.glob(os.path.join(run_dir, 'phema-*.pkl')):
        match = _NAME_RE.search(os.path.basename(path))
        if match and (at_kimg is None or int(match.group(1)) <= at_kimg):
            found.append(dict(path=path, kimg=int(match.group(1)), std=float(match.group(2))))
    return sorted(found, key=lambda e: (e['kimg'], e['std']))


@torch.no_grad()
def reconstruct(run_dir: str, std: float, at_kimg: int | None = None, log=print):
    """The post-hoc EMA of relative width `std` at the latest saved time <= at_kimg, from the run's phema files.

    Returns (snapshot data dict of the latest file with 'ema' replaced, info). The files are read one at a time
    (memory: two networks) through the safe importer.
    """
    from training import snapshots

    entries = saved_emas(run_dir, at_kimg)
    if not entries:
        raise FileNotFoundError(f'{run_dir}: no phema-*.pkl files{f" up to kimg {at_kimg}" if at_kimg else ""} '
                                f'(train with --phema=0.05,0.10)')
    headers = []
    for entry in entries:
        data = snapshots.read_snapshot(entry['path']).data
        info = data.get('phema') or {}
        headers.append((entry, int(info['step']), float(info['gamma'])))
    target_kimg = entries[-1]['kimg']
    target_step = max(step for entry, step, _ in headers if entry['kimg'] == target_kimg)
    weights = reconstruction_weights([s for _, s, _ in headers], [g for _, _, g in headers], target_step,
                                     std_to_gamma(std))
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
    latest = dict(latest, ema=template, phema=dict(std=float(std), gamma=std_to_gamma(std), step=target_step,
                                                   kimg=target_kimg, reconstructed_from=len(entries)))
    log(f'Reconstructed the EMA of std {std} at kimg {target_kimg} (step {target_step}) from {len(entries)} saved EMAs '
        f'(stds {sorted({e["std"] for e in entries})}); largest coefficient {np.abs(weights).max():.3g}')
    return latest, dict(weights=weights.tolist(), files=[e['path'] for e in entries])
