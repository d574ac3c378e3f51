"""Run feedback: a rank-0 logger (stdout + <output_dir>/log.txt), per-step metrics as JSON lines, and
TensorBoard scalars. Other ranks only report warnings and errors, prefixed with their rank."""
import json
import logging
import os
import sys
import time

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
    resumed step are dropped, so that a rerun after a crash does not leave duplicate steps. The file is
    rewritten atomically (a kill during the rewrite leaves the old file), and a last line that a kill tore in
    half is dropped with a note."""

    def __init__(self, output_dir, resume_step=0):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if os.path.exists(self.path):
            from util.checkpoint import write_bytes  # torch: only when a run starts

            write_bytes(self.path, "".join(self._lines_up_to(resume_step)).encode())
        self.file = open(self.path, "a")

    def _lines_up_to(self, step):
        """The file's lines of steps <= `step`, each ending in a newline; a line that is no JSON row is kept
        (nothing is lost) unless it is the torn last one."""
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        keep = []
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:
                    get_logger().warning(f"{self.path}: dropped its torn last line (a run stopped while writing "
                                         f"it): {line.strip()[:80]!r}")
                    break
                get_logger().warning(f"{self.path}: line {i + 1} is no JSON row; kept as it is")
                row = {}
            if not isinstance(row, dict) or row.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        return keep

    def write(self, row):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def tensorboard_writer(log_dir):
    # imported here: tensorboard is slow to import and only rank 0 needs it
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=log_dir)


ARGS_HISTORY = "args_history.jsonl"


def record_start(output_dir, args, world_size, hosts):
    """Append this start of the run to <output_dir>/args_history.jsonl (args.json holds only the latest): its
    time, world size, hosts, command line and arguments, one line each, so that a run's history reads back."""
    from util.checkpoint import append_jsonl  # torch: only when a run starts

    append_jsonl(os.path.join(output_dir, ARGS_HISTORY),
                 {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": world_size,
                  "hosts": sorted(set(hosts)), "argv": sys.argv, "args": vars(args)})
