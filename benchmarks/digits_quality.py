"""The quick start's quality check: run each digits preset of main.py from nothing, as a newcomer
would, and check that a classifier trained on held-out real digits reads at least --min_accuracy of the
generated digits as the class asked for, at the preset's sampling settings.

    python benchmarks/digits_quality.py               # both presets, each from nothing (~15 min)
    python benchmarks/digits_quality.py --in_place --nproc 2   # the README's command as it is (output/digits...)
    python benchmarks/digits_quality.py --reuse digits=output/digits --reuse digits_mrar=output/digits_mrar

By default each preset runs in its own work folder (data preparation and the judge's training are part of its
wall time), as `python main.py --preset NAME --data_path WORK/data --output_dir WORK/run` (with --nproc N:
`torchrun --nproc_per_node N main.py ...`, the same recipe in less time). --in_place runs `main.py --preset NAME`
into the preset's own folders, which must not hold a run yet. --reuse reads the
report of a finished run folder instead. Writes benchmarks/results/digits_quality.json; exits 1 when an
accuracy is short. Not a test: it takes the minutes that the quick start takes.
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import digits_preset as digits  # noqa: E402
from util.checkpoint import save_json  # noqa: E402
from util.cli import HelpFormatter, shown_path  # noqa: E402

TIME_LIMIT_S = 600  # what the quick start may take on a 2-core CPU: ten minutes


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def run_preset(name, work, extra, nproc=1):
    """Run the preset in `work` (None: in its own folders); returns (run folder, timing)."""
    run_dir = os.path.join(ROOT, digits.PRESETS[name]["output_dir"]) if work is None else os.path.join(work, "run")
    where = [] if work is None else ["--data_path", os.path.join(work, "data"), "--output_dir", run_dir]
    if os.path.exists(os.path.join(run_dir, "checkpoint-last.pth")):
        raise SystemExit(f"{run_dir} already holds a run: the command would resume it, not time it; pass "
                         f"--reuse {name}={run_dir}, or remove the folder")
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launch, "main.py", "--preset", name, *where, *extra]
    shown = (["torchrun", *launch[2:]] if nproc > 1 else ["python"]) + cmd[1 + len(launch):]
    print(f"$ {' '.join(shown)}", flush=True)
    load = os.getloadavg()[0]
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return run_dir, {"command": " ".join(shown), "wall_seconds": round(time.time() - t0, 1),
                     "load_average_before": load, "load_average_after": os.getloadavg()[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    from_scratch = [n for n, preset in digits.PRESETS.items() if not preset.get("resume")]  # the fine-tuning
    # preset starts from another run: benchmarks/digits_cfg_sweep.py runs it after its base
    p.add_argument("--presets", nargs="+", default=from_scratch, choices=from_scratch, help="presets to run")
    p.add_argument("--reuse", action="append", default=[], metavar="PRESET=RUN_DIR",
                   help="read the report of this finished run instead of running the preset")
    p.add_argument("--work_dir", default=None, help="where fresh runs go (default: a new temporary folder)")
    p.add_argument("--in_place", action="store_true", help="run the README commands into the presets' folders")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun); 1: python main.py")
    p.add_argument("--min_accuracy", type=float, default=0.9, help="a preset passes at this classifier accuracy")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_quality.json"),
                   help="results JSON (default: benchmarks/results/digits_quality.json)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more main.py flags for fresh runs")
    args = p.parse_args(argv)
    reuse = dict(r.split("=", 1) for r in args.reuse)
    work_dir = None if args.in_place else args.work_dir or tempfile.mkdtemp(prefix="digits-quality-")
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra

    results, ok = {}, True
    for name in args.presets:
        if name in reuse:
            run_dir, timing = reuse[name], {"command": f"(reused {reuse[name]})", "wall_seconds": None}
        else:
            run_dir, timing = run_preset(name, work_dir and os.path.join(work_dir, name), extra, args.nproc)
        report = digits.read_report(run_dir)
        passed = report["accuracy"] is not None and report["accuracy"] >= args.min_accuracy
        ok &= passed
        wall = timing["wall_seconds"]
        train = report["training"]
        if train["train_seconds"]:
            timing["images_per_second"] = round(train["images_seen"] / train["train_seconds"], 1)
        results[name] = {**timing, "within_time_limit": None if wall is None else wall < TIME_LIMIT_S,
                         "passed": passed, "run_dir": shown_path(run_dir),
                         **{k: report[k] for k in ("mode", "accuracy", "per_class", "num_images", "judge",
                                                   "diversity", "sampling", "training", "generation_seconds")}}
        print(f"{name}: accuracy {report['accuracy']} ({'ok' if passed else 'BELOW ' + str(args.min_accuracy)}), "
              f"wall {wall} s", flush=True)
    out = {"min_accuracy": args.min_accuracy, "time_limit_seconds": TIME_LIMIT_S, "passed": ok, "presets": results,
           "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_json(args.out, out)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
