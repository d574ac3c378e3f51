"""Released AdamW parameter grouping and an fp32 exponential moving average of the weights."""
import contextlib

import torch


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


class EMA:
    """fp32 shadow of every parameter, updated after each optimizer step. `state_dict()` has the model's
    keys (buffers copied from the model), so it is the released `model_ema` entry."""

    def __init__(self, model, rate):
        self.rate = rate
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for _, p in model.named_parameters()]

    @torch.no_grad()
    def update(self, model):
        params = [p.detach() for _, p in model.named_parameters()]
        if any(p.dtype != torch.float32 for p in params):
            params = [p.float() for p in params]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.rate)

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
