"""Samplers for the flow-matching decoder.

Every sampler takes `velocity_fn(x, t_scaled) -> v`, a network already bound to its conditions; t_scaled has
shape (1,): all samples of a batch are at the same time, so the network can compute the time embedding and
modulation once. Under classifier-free guidance (cfg != 1) the caller binds a doubled condition batch
(conditional half first, unconditional half second) and the sampler feeds the doubled state `cat([x, x])`:
one network call per step.

The time grid is computed in float64 on the host once and sent to the device in one transfer; step
coefficients are host floats, so the loop has no host syncs, no per-sample Python loops and no `.item()`.
The state keeps the dtype of the initial noise (float32 in practice), whatever autocast the network runs
under.
"""
import math

import torch

from diffusion.flow import TIME_SCALE

SAMPLERS = ("maruyama", "euler", "heun")


# per-sample generators draw the noise of this many steps at once (a fixed number, so a sample's draws do not
# depend on the batch it is in)
NOISE_STEPS_PER_DRAW = 16


class _NoiseSource:
    """The injected noise of the steps of one sampler run, (B, ...) per step.

    With one generator (or none) every step draws the whole batch at once. With one generator per sample,
    each sample's noise is drawn `NOISE_STEPS_PER_DRAW` steps at a time (one call per sample and chunk,
    not per sample and step); each generator still yields the same stream whatever the batch."""

    def __init__(self, x, generator, num_draws):
        self.x, self.generator, self.left = x, generator, num_draws
        self.per_sample = isinstance(generator, (list, tuple))
        if self.per_sample and len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]} samples")
        self.chunk, self.pos = None, 0

    def next(self):
        x = self.x
        if not self.per_sample:
            return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        if self.chunk is None or self.pos == self.chunk.shape[1]:
            n = min(NOISE_STEPS_PER_DRAW, self.left)
            self.left -= n
            if self.chunk is None or self.chunk.shape[1] != n:
                self.chunk = x.new_empty((x.shape[0], n, *x.shape[1:]))
            for row, g in zip(self.chunk, self.generator):  # each row (n, ...) is contiguous: drawn in place
                torch.randn(row.shape, generator=g, out=row)
            self.pos = 0
        self.pos += 1
        return self.chunk[:, self.pos - 1]


def _time_tensor(ts, device):
    """The time grid (host float64) on the network's 0..1000 scale, on the device in one transfer: step i
    passes the (1,) slice ts[i:i+1], the same time for the whole batch, without a host sync."""
    return (torch.tensor(ts, dtype=torch.float64) * TIME_SCALE).to(device=device, dtype=torch.float32)


def _velocity(velocity_fn, x, t_in, cfg):
    """Guided velocity u + cfg (c - u) at one time t_in (1,); one network call on the doubled batch under CFG."""
    if cfg == 1.0:
        return velocity_fn(x, t_in).to(x.dtype)
    cond, uncond = velocity_fn(torch.cat([x, x]), t_in).to(x.dtype).chunk(2)
    return torch.lerp(uncond, cond, cfg)


def maruyama_time_grid(num_steps, t_min=0.04):
    """The released grid: linspace(1, t_min, N) then 0 (N network evaluations)."""
    if num_steps < 2:
        raise ValueError(f"the Euler-Maruyama sampler needs at least 2 steps, got {num_steps}")
    return [1.0 + (t_min - 1.0) * i / (num_steps - 1) for i in range(num_steps)] + [0.0]


@torch.no_grad()
def euler_maruyama(velocity_fn, noise, num_steps, cfg=1.0, scale_0=1.0, scale_1=1.0, t_min=0.04, generator=None):
    """Euler-Maruyama on the reverse SDE of the linear path, as released with TransDiff.

    Drift d = v - 1/2 g^2 score with g^2 = 2t and score = ((t - 1) v - x) / t, i.e. d = (2 - t) v + x; guidance
    acts on the drift, which is linear in v, so it is applied to v. `scale_0` scales the mean update and
    `scale_1` the injected noise, for all intervals but the last (t_min -> 0), which is a plain Euler step
    without noise. Step coefficients are host floats (float64 grid), so the loop never syncs.
    """
    ts = maruyama_time_grid(num_steps, t_min)
    t_dev = _time_tensor(ts[:-1], noise.device)
    noisy = scale_1 != 0.0
    source = _NoiseSource(noise, generator, num_steps - 1) if noisy else None
    x = noise
    for i in range(num_steps):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = t_next - t_cur
        v = _velocity(velocity_fn, x, t_dev[i:i + 1], cfg)
        a = (scale_0 if i < num_steps - 1 else 1.0) * dt
        # x + a * ((2 - t) v + x), written as x (1 + a) + a (2 - t) v; x is our own after the first step
        x = torch.add(x * (1.0 + a), v, alpha=a * (2.0 - t_cur)) if i == 0 else \
            x.mul_(1.0 + a).add_(v, alpha=a * (2.0 - t_cur))
        if noisy and i < num_steps - 1:
            x.add_(source.next(), alpha=scale_1 * math.sqrt(2.0 * t_cur) * math.sqrt(abs(dt)))
    return x


@torch.no_grad()
def ode(velocity_fn, noise, num_steps, cfg=1.0, method="euler"):
    """Deterministic probability-flow ODE dx/dt = v from t=1 to t=0 on a uniform grid.

    method 'euler' uses `num_steps` evaluations; 'heun' corrects every step but the last (2N-1 evaluations).
    """
    if num_steps < 1:
        raise ValueError(f"the ODE sampler needs at least 1 step, got {num_steps}")
    ts = [1.0 - i / num_steps for i in range(num_steps + 1)]
    t_dev = _time_tensor(ts, noise.device)
    x = noise
    for i in range(num_steps):
        t_next = ts[i + 1]
        dt = t_next - ts[i]
        v = _velocity(velocity_fn, x, t_dev[i:i + 1], cfg)
        x_next = torch.add(x, v, alpha=dt)
        if method == "heun" and t_next > 0:
            v_next = _velocity(velocity_fn, x_next, t_dev[i + 1:i + 2], cfg)
            x_next = torch.add(x, v.add_(v_next), alpha=0.5 * dt)
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
