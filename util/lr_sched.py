"""Learning rate per optimizer step: linear warm-up, then constant (released recipe), constant with a linear
cool-down over the last part of the run, or half-cosine."""
import math


def lr_at(epoch, args):
    """Learning rate at fractional epoch `epoch` (epochs completed, counted in images / epoch size)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    min_lr = args.min_lr or 0.0
    if args.lr_schedule == "constant":
        # warmup-stable-decay: the cool-down starts where the planned run has `lr_cooldown` of its epochs left
        cooldown = getattr(args, "lr_cooldown", 0.0) * args.epochs
        left = args.epochs - epoch
        if cooldown <= 0 or left >= cooldown:
            return args.lr
        return min_lr + (args.lr - min_lr) * max(left, 0.0) / cooldown
    span = max(args.epochs - args.warmup_epochs, 1e-8)
    progress = min((epoch - args.warmup_epochs) / span, 1.0)
    return min_lr + (args.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer, epoch, args):
    lr = lr_at(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
