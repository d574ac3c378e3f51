"""Rectified-flow / flow-matching path and training loss.

Convention (as released): data at t=0, noise at t=1,
    x_t = (1 - t) * x0 + t * eps,      target velocity v = eps - x0.
Networks see time on the 0..1000 scale (`TIME_SCALE`).
"""
import torch

TIME_SCALE = 1000.0


def interpolate(x0, eps, t):
    """Point on the linear path at time t (shape (B,), broadcast over the rest of x0)."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - t) * x0 + t * eps


def sample_logit_normal(n, device, dtype=torch.float32, mean=0.0, std=1.0, generator=None):
    """t ~ sigmoid(N(mean, std)), drawn batched on `device` (no host round trip)."""
    return torch.sigmoid(mean + std * torch.randn(n, device=device, dtype=dtype, generator=generator))


def flow_matching_loss(velocity_fn, x0, generator=None):
    """Mean squared error between predicted and target velocity at a random t per sample.

    velocity_fn(x_t, t_scaled) -> v, with t_scaled = t * TIME_SCALE of shape (B,).
    """
    b = x0.shape[0]
    t = sample_logit_normal(b, x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = interpolate(x0, eps, t)
    v = velocity_fn(x_t, t * TIME_SCALE)
    return torch.mean((v.float() - (eps - x0).float()) ** 2)
