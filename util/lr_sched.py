"""Learning rate per optimizer step: linear warm-up, then constant or half-cosine (released recipe)."""
import math


def lr_at(epoch, args):
    """Learning rate at fractional epoch `epoch` (epochs completed, counted in images / epoch size)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    if args.lr_schedule == "constant":
        return args.lr
    min_lr = args.min_lr or 0.0
    span = max(args.epochs - args.warmup_epochs, 1e-8)
    progress = min((epoch - args.warmup_epochs) / span, 1.0)
    return min_lr + (args.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer, epoch, args):
    lr = lr_at(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
