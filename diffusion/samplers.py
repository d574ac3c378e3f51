"""Samplers for the flow-matching decoder.

Every sampler takes `velocity_fn(x, t_scaled) -> v`, a network already bound to its conditions. Under
classifier-free guidance (cfg != 1) the caller binds a doubled condition batch (conditional half first,
unconditional half second) and the sampler feeds the doubled state `cat([x, x])`: one network call per step.

The time grid is computed in float64 on the host once, so the loop has no host syncs; the state keeps
the dtype of the initial noise (float32 in practice), whatever autocast the network runs under.
"""
import math

import torch

from diffusion.flow import TIME_SCALE

SAMPLERS = ("maruyama", "euler", "heun")


def _randn(x, generator):
    """Gaussian noise shaped like x. `generator` may be a list with one generator per sample, which makes
    each sample's draws independent of the batch it is in (used for world-size-invariant evaluation)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]} samples")
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _guided(velocity_fn, x, t, cfg):
    """Network output at time t (python float); returns (v, x_in) with the CFG-doubled input."""
    guided = cfg != 1.0
    x_in = torch.cat([x, x]) if guided else x
    t_in = torch.full((x_in.shape[0],), t * TIME_SCALE, device=x.device, dtype=torch.float32)
    return velocity_fn(x_in, t_in).to(x.dtype), x_in


def _combine(out, cfg):
    if cfg == 1.0:
        return out
    cond, uncond = out.chunk(2)
    return uncond + cfg * (cond - uncond)


def maruyama_time_grid(num_steps, t_min=0.04):
    """The released grid: linspace(1, t_min, N) then 0 (N network evaluations)."""
    if num_steps < 2:
        raise ValueError(f"the Euler-Maruyama sampler needs at least 2 steps, got {num_steps}")
    return [1.0 + (t_min - 1.0) * i / (num_steps - 1) for i in range(num_steps)] + [0.0]


@torch.no_grad()
def euler_maruyama(velocity_fn, noise, num_steps, cfg=1.0, scale_0=1.0, scale_1=1.0, t_min=0.04, generator=None):
    """Euler-Maruyama on the reverse SDE of the linear path, as released with TransDiff.

    Drift d = v - 1/2 g^2 score with g^2 = 2t and score = ((t - 1) v - x) / t; guidance acts on the drift.
    `scale_0` scales the mean update and `scale_1` the injected noise, for all intervals but the last
    (t_min -> 0), which is a plain Euler step without noise.
    """
    ts = maruyama_time_grid(num_steps, t_min)
    x = noise
    for i in range(num_steps):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = t_next - t_cur
        v, x_in = _guided(velocity_fn, x, t_cur, cfg)
        score = ((t_cur - 1.0) * v - x_in) / t_cur
        d = _combine(v - t_cur * score, cfg)
        if i < num_steps - 1:
            x = x + scale_0 * d * dt
            if scale_1 != 0.0:
                x = x + (scale_1 * math.sqrt(2.0 * t_cur) * math.sqrt(abs(dt))) * _randn(x, generator)
        else:
            x = x + d * dt
    return x


@torch.no_grad()
def ode(velocity_fn, noise, num_steps, cfg=1.0, method="euler"):
    """Deterministic probability-flow ODE dx/dt = v from t=1 to t=0 on a uniform grid.

    method 'euler' uses `num_steps` evaluations; 'heun' corrects every step but the last (2N-1 evaluations).
    """
    if num_steps < 1:
        raise ValueError(f"the ODE sampler needs at least 1 step, got {num_steps}")
    ts = [1.0 - i / num_steps for i in range(num_steps + 1)]
    x = noise
    for i in range(num_steps):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = t_next - t_cur
        v = _combine(_guided(velocity_fn, x, t_cur, cfg)[0], cfg)
        x_next = x + v * dt
        if method == "heun" and t_next > 0:
            v_next = _combine(_guided(velocity_fn, x_next, t_next, cfg)[0], cfg)
            x_next = x + 0.5 * (v + v_next) * dt
        x = x_next
    return x


def sample(velocity_fn, noise, num_steps, cfg=1.0, sampler="maruyama", scale_0=1.0, scale_1=1.0, generator=None):
    """Dispatch by sampler name. The ODE samplers are deterministic and take no scale_0/scale_1."""
    if sampler == "maruyama":
        return euler_maruyama(velocity_fn, noise, num_steps, cfg, scale_0, scale_1, generator=generator)
    if sampler in ("euler", "heun"):
        if (scale_0, scale_1) != (1.0, 1.0):
            raise ValueError(f"scale_0/scale_1 apply to the 'maruyama' sampler only; the deterministic "
                             f"'{sampler}' sampler takes neither (got scale_0={scale_0}, scale_1={scale_1})")
        return ode(velocity_fn, noise, num_steps, cfg, method=sampler)
    raise ValueError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
