"""Run feedback: a rank-0 logger (stdout + <output_dir>/log.txt), per-step metrics as JSON lines, and
TensorBoard scalars. Other ranks only report warnings and errors, prefixed with their rank."""
import json
import logging
import os
import sys

LOGGER_NAME = "transdiff"


def setup_logger(output_dir=None, rank=0, name=LOGGER_NAME):
    logger = logging.getLogger(name)
    for h in list(logger.handlers):  # a second run in the same process (tests) starts clean
        logger.removeHandler(h)
        h.close()
    logger.propagate = False
    if rank == 0:
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers = [logging.StreamHandler(sys.stdout)]
        if output_dir:
            handlers.append(logging.FileHandler(os.path.join(output_dir, "log.txt"), mode="a"))
    else:
        logger.setLevel(logging.WARNING)
        fmt = logging.Formatter(f"[rank {rank}] %(levelname)s: %(message)s")
        handlers = [logging.StreamHandler(sys.stderr)]
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


def get_logger():
    return logging.getLogger(LOGGER_NAME)


class MetricsLog:
    """metrics.jsonl in the run folder, one line per logged optimizer step. On resume the lines past the
    resumed step are dropped, so that a rerun after a crash does not leave duplicate steps."""

    def __init__(self, output_dir, resume_step=0):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if os.path.exists(self.path):
            with open(self.path) as f:
                keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        self.file = open(self.path, "a")

    def write(self, row):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def tensorboard_writer(log_dir):
    # imported here: tensorboard is slow to import and only rank 0 needs it
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=log_dir)
