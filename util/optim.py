"""Released AdamW parameter grouping and an fp32 exponential moving average of the weights, with an optional
warm-up of its rate."""
import contextlib
import math

import numpy as np
import torch

# EMA warm-up with offset K: update n (from 0) uses min(rate, (1 + n) / (K + n)), so the first update keeps 1 / K of
# the random start and the average spans about n / (K - 1) recent steps until the set rate takes over. K = 10 is
# the schedule of several diffusion codebases (`warmup=True`); a larger K follows the raw weights more closely.
WARMUP_OFFSET = 10.0
# fewer steps than this many EMA horizons (1 / (1 - rate) steps) leave more than e^-3 (5%) of the start weights
MIN_HORIZONS = 3


def param_groups(model, weight_decay, exclude=(), no_decay_prefixes=("diffdecoder.",)):
    """Two AdamW groups in the released order (no decay first): biases, 1-D tensors and every decoder
    parameter get no weight decay. `exclude` names parameters to leave out (--only_train_diff); `z_proj`, frozen in
    1-Step only so that DDP needs no unused-parameter search, stays in so that the groups keep the
    released layout (a parameter without a gradient is skipped by AdamW)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name in exclude:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name.startswith(no_decay_prefixes):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_adamw(model, lr, weight_decay, exclude=(), betas=(0.9, 0.95)):
    return torch.optim.AdamW(param_groups(model, weight_decay, set(exclude)), lr=lr, betas=betas)


def warmup_offset(warmup):
    """K of a `warmup` given as False (none: 0), True (WARMUP_OFFSET) or K itself (> 1)."""
    if warmup is True:
        return WARMUP_OFFSET
    if not warmup:
        return 0.0
    if warmup <= 1:
        raise ValueError(f"an EMA warm-up offset must exceed 1, got {warmup}")
    return float(warmup)


def ema_rates(rate, warmup, first, count):
    """The rates of EMA updates first .. first + count - 1 (float64 array); `warmup` as in `warmup_offset`."""
    n = np.arange(first, first + count, dtype=np.float64)
    k = warmup_offset(warmup)
    return np.minimum(rate, (1.0 + n) / (k + n)) if k else np.full(count, float(rate))


def start_share(rate, warmup, steps):
    """The weight that the EMA still gives its starting point after `steps` updates from the start."""
    rates = ema_rates(rate, warmup, 0, int(steps))
    return 0.0 if rates.size and rates.min() <= 0 else float(np.exp(np.log(rates).sum()))


def short_run_warning(rate, warmup, steps):
    """None, or why the EMA of a run of `steps` optimizer steps would still be mostly its starting point."""
    share = start_share(rate, warmup, steps)
    if share <= math.exp(-MIN_HORIZONS):
        return None
    horizon = 1.0 / (1.0 - rate)
    fix = "lower --ema_rate" if warmup else "start a run with the EMA warm-up (--ema_warmup, the default) or " \
                                            "lower --ema_rate"
    return (f"the run plans {steps} optimizer steps, {steps / horizon:.1f} horizons of --ema_rate {rate} "
            f"({horizon:.0f} steps): its EMA weights (what sampling and evaluation use) will still hold "
            f"{share:.0%} of the starting weights; {fix}, or judge the raw weights (--eval_wo_ema)")


class EMA:
    """fp32 shadow of every parameter, updated after each optimizer step. `state_dict()` has the model's
    keys (buffers copied from the model), so it is the released `model_ema` entry. With `warmup` (True, or an
    offset K) the rate of update n is min(rate, (1 + n) / (K + n)); `updates` counts the updates made (a resumed
    run sets it to its optimizer step)."""

    def __init__(self, model, rate, warmup=False):
        self.rate, self.warmup, self.updates = rate, warmup, 0
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for _, p in model.named_parameters()]

    def current_rate(self):
        return float(ema_rates(self.rate, self.warmup, self.updates, 1)[0])

    @torch.no_grad()
    def update(self, model):
        params = [p.detach() for _, p in model.named_parameters()]
        if any(p.dtype != torch.float32 for p in params):
            params = [p.float() for p in params]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.current_rate())
        self.updates += 1

    def state_dict(self, model):
        shadow = dict(zip(self.names, self.shadow))
        return {k: shadow.get(k, v) for k, v in model.state_dict().items()}  # no copy: saved at once

    @torch.no_grad()
    def load_state_dict(self, sd):
        missing = [n for n in self.names if n not in sd]
        if missing:
            raise KeyError(f"EMA state lacks {', '.join(missing[:3])}")
        for n, s in zip(self.names, self.shadow):
            s.copy_(sd[n].float())

    @contextlib.contextmanager
    def swapped_in(self, model):
        """Model holds the EMA weights inside the block, its own weights again afterwards."""
        params = [p for _, p in model.named_parameters()]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
