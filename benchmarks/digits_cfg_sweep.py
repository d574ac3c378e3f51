"""Quality as papers measure it, at the quick start's scale: a guidance sweep of both digits presets
and the paper's MRAR recipe (MRAR fine-tuned from the 1-Step model) against the 1-Step model trained on for the
same extra optimizer steps and against MRAR from scratch.

    pip install matplotlib                        # for the plot only
    python benchmarks/digits_cfg_sweep.py         # trains what is missing, sweeps, writes JSON and plot
    python benchmarks/digits_cfg_sweep.py --run output/x --cfgs 1.5 2 [--steps 60]   # one finished run

The runs (each trained by main.py unless its folder already holds a finished one; an interrupted one resumes):

    digits          output/digits          python main.py --preset digits                     (the quick start)
    digits_mrar     output/digits_mrar     python main.py --preset digits_mrar                (MRAR from scratch)
    digits_mrar_ft  output/digits_mrar_ft  python main.py --preset digits_mrar_ft             (the paper's recipe:
                                           MRAR fine-tuned from output/digits)
    digits_more     output/digits_more     python main.py --preset digits --resume output/digits
                                           --output_dir output/digits_more --max_train_steps N: the 1-Step run
                                           trained on for as many optimizer steps as digits_mrar_ft took

Each (run, cfg) point is the digits report of digits_preset.py at that cfg (the run's other sampling settings, its
EMA weights): accuracy of the judge, FD / precision / recall in the judge's features against real training
digits, and the real-vs-real floor; it is written to <run>/cfg_points/cfg<c>/. Training and sweeping run as
--jobs parallel processes of one thread each (these tiny models run no faster on two threads than on one, so two
cores do twice the work); each job logs to output/cfg_sweep_logs/<job>.log. A point or run that exists is read,
not remade, so running the command again resumes. Writes benchmarks/results/digits_cfg_sweep.json and
docs/digits_cfg_sweep.png.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import digits_preset as digits  # noqa: E402
from benchmarks.digits_quality import machine  # noqa: E402
from models.pretrained import checkpoint_args, load_tokenizer, load_transdiff  # noqa: E402
from util.checkpoint import save_json  # noqa: E402
from util.cli import HelpFormatter  # noqa: E402

SWEEP_CFGS = (1.0, 1.25, 1.5, 1.75, 2.0, 3.0, 4.0, 6.0)  # the presets' curve, finer where the best points lie
# The comparison runs are swept where the presets' curves put the best point
COMPARE_CFGS = (1.25, 1.5, 1.75, 2.0)
MIN_ACCURACY = 0.95  # the target: read as the class asked for at least as often as ...
MAX_FLOOR_RATIO = 2.0  # ... with FD within this factor of the real-vs-real floor
BASE = "digits"  # the 1-Step run that the fine-tuning and the trained-on run start from
POINTS_DIR = "cfg_points"
LOG_DIR = os.path.join("output", "cfg_sweep_logs")
# name -> (what it is, main.py flags, cfgs swept, runs it starts from)
RUNS = {
    "digits": ("1-Step (preset)", ["--preset", "digits"], SWEEP_CFGS, ()),
    "digits_mrar": ("MRAR from scratch (preset)", ["--preset", "digits_mrar"], SWEEP_CFGS, ()),
    "digits_mrar_ft": ("MRAR fine-tuned from the 1-Step run (preset)", ["--preset", "digits_mrar_ft"],
                       COMPARE_CFGS, (BASE,)),
    "digits_more": ("1-Step trained on for the same extra steps",
                    ["--preset", "digits", "--resume", digits.PRESETS[BASE]["output_dir"],
                     "--output_dir", "output/digits_more"], COMPARE_CFGS, (BASE, "digits_mrar_ft")),
}
ONE_THREAD = ["--threads", "1", "--num_workers", "0"]


def run_dir(name):
    flags = RUNS[name][1]
    out = flags[flags.index("--output_dir") + 1] if "--output_dir" in flags else digits.PRESETS[name]["output_dir"]
    return os.path.join(ROOT, out)


def trained_steps(folder):
    """Optimizer steps of a finished run (its report exists: main.py writes it after training), else None."""
    path = os.path.join(folder, digits.REPORT_NAME)
    return digits.read_report(folder)["training"]["steps"] if os.path.isfile(path) else None


def point_dir(folder, cfg, steps=None):
    return os.path.join(folder, POINTS_DIR, f"cfg{cfg:g}" + (f"-steps{steps}" if steps is not None else ""))


# ------------------------------------------------------------------ the jobs
def train_command(name):
    """main.py command line of run `name`; digits_more's number of steps comes from the finished fine-tuning."""
    flags = list(RUNS[name][1])
    if name == "digits_more":
        base = digits.read_report(run_dir(BASE))["training"]
        total = base["steps"] + trained_steps(run_dir("digits_mrar_ft"))
        steps_per_epoch = base["steps"] // base["epochs"]
        flags += ["--max_train_steps", str(total), "--epochs", str(-(-total // steps_per_epoch))]
    return [sys.executable, "main.py", *flags, *ONE_THREAD]


def sweep_command(name):
    return [sys.executable, os.path.join("benchmarks", "digits_cfg_sweep.py"), "--run", run_dir(name),
            "--cfgs", *map(str, RUNS[name][2]), "--threads", "1"]


def _die_with_parent():
    """Children stop when this process dies, however it dies (Linux), so that a rerun finds no run folder
    still held by an orphaned training."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# preset values that change neither what a run learns nor its points (each point sets its own cfg)
_HOW_NOT_WHAT = ("output_dir", "data_path", "threads", "num_workers", "resume", "eval_freq", "save_last_freq",
                 "log_freq", "eval_bsz", "cfg", "grid_per_class")


def check_finished_runs():
    """A finished run is reused only when it was trained with its preset as it is now (an older preset's run
    would put stale numbers in the results): else stop and say which folder to remove."""
    for name, (_, flags, _, _) in RUNS.items():
        path = os.path.join(run_dir(name), "args.json")
        if trained_steps(run_dir(name)) is None or not os.path.isfile(path):
            continue
        with open(path) as f:
            stored = json.load(f)
        preset = digits.PRESETS[flags[flags.index("--preset") + 1]]
        changed = [f"{k}={stored.get(k)!r} (now {v!r})" for k, v in preset.items()
                   if k not in _HOW_NOT_WHAT and stored.get(k) != v and not (name == "digits_more" and k == "epochs")]
        if changed:
            raise SystemExit(f"{run_dir(name)} was trained with another version of its preset: "
                             f"{', '.join(changed)}; remove that folder (its points are inside it) and run again")


def jobs():
    """(job name, done?, command maker, jobs it waits for), in the order they are started when ready: the
    trainings first, since the fine-tuning waits for its base."""
    names = ("digits", "digits_mrar", "digits_mrar_ft", "digits_more")
    trains = [(f"train {n}", lambda n=n: trained_steps(run_dir(n)) is not None, lambda n=n: train_command(n),
               [f"train {d}" for d in RUNS[n][3]]) for n in names]
    sweeps = [(f"sweep {n}", lambda n=n: all(os.path.isfile(os.path.join(point_dir(run_dir(n), c), digits.REPORT_NAME))
                                             for c in RUNS[n][2]), lambda n=n: sweep_command(n), [f"train {n}"])
              for n in names]
    return trains + sweeps


def run_jobs(job_list, parallel, log_dir=LOG_DIR):
    """Run the jobs of `job_list` (as `jobs()` gives them) not yet done, `parallel` at a time, each as soon as
    the jobs it waits for are done. Returns {job: seconds it took here}. Stops at the first failure (after the
    running ones end)."""
    os.makedirs(log_dir, exist_ok=True)
    pending = [j for j in job_list if not j[1]()]
    finished = {j[0] for j in job_list} - {j[0] for j in pending}
    running, seconds, failed = {}, {}, None
    try:
        while pending or running:
            for job in list(pending):
                name, _, command, deps = job
                if failed or len(running) >= parallel or not all(d in finished for d in deps):
                    continue
                log_path = os.path.join(log_dir, name.replace(" ", "_") + ".log")
                cmd = command()
                print(f"[{time.strftime('%H:%M:%S')}] start {name}: {' '.join(cmd[1:])} (log: {log_path})", flush=True)
                with open(log_path, "a") as log:
                    running[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                      env={**os.environ, "OMP_NUM_THREADS": "1"},
                                                      preexec_fn=_die_with_parent), time.time(), log_path)
                pending.remove(job)
            time.sleep(0.5)
            for name, (proc, t0, log_path) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                seconds[name] = round(time.time() - t0, 1)
                if proc.returncode:
                    failed = failed or f"{name} failed (exit {proc.returncode}); see {log_path}"
                    continue
                finished.add(name)
                print(f"[{time.strftime('%H:%M:%S')}] done  {name} in {seconds[name]:.0f}s", flush=True)
            if failed and not running:
                raise SystemExit(failed)
    finally:
        for proc, *_ in running.values():
            proc.terminate()
    return seconds


# ------------------------------------------------------------------ points
def point(folder, cfg, loaded, log, steps=None):
    """The digits report of the run in `folder` at `cfg` (with `steps` sampler steps, else the run's), made
    under <folder>/cfg_points/ unless it exists; `loaded` caches the model."""
    out = point_dir(folder, cfg, steps)
    if os.path.isfile(os.path.join(out, digits.REPORT_NAME)):
        return digits.read_report(out)
    if folder not in loaded:
        model, ckpt = load_transdiff(folder)
        loaded.clear()  # one model in memory at a time
        loaded[folder] = (model.eval(), load_tokenizer(ckpt), ckpt)
    model, tokenizer, ckpt = loaded[folder]
    args = Namespace(**{**checkpoint_args(ckpt), "cfg": cfg, "output_dir": out, "eval_wo_ema": False})
    if steps is not None:
        args.num_sampling_steps = steps
    os.makedirs(out, exist_ok=True)
    with torch.no_grad():
        return digits.write_report(model, tokenizer, args, Namespace(**ckpt["train_state"]), log=log)


def points_of_run(folder, cfgs, steps=None):
    """--run: any finished digits run at chosen cfgs."""
    loaded = {}
    for cfg in cfgs:
        p = summary(point(folder, cfg, loaded, print, steps))
        print(f"{folder} cfg {cfg:g}{f', {steps} steps' if steps else ''}: accuracy {p['accuracy']:.1%}, FD "
              f"{p['fd']:.2f} ({p['fd_over_floor']}x floor), precision {p['precision']:.3f}, recall "
              f"{p['recall']:.3f}", flush=True)


def summary(report):
    div = report["diversity"]
    g, f = div["generated"], div["real_floor"]
    return {"cfg": report["sampling"]["cfg"], "accuracy": report["accuracy"], "fd": g["fd"],
            "precision": g["precision"], "recall": g["recall"], "floor_fd": f["fd"],
            "fd_over_floor": round(g["fd"] / f["fd"], 2), "worst_class_accuracy": min(report["per_class"].values()),
            "generation_seconds": report["generation_seconds"]}


def best(points):
    """The lowest FD among the cfgs that reach MIN_ACCURACY, else the most accurate cfg."""
    ok = [p for p in points if p["accuracy"] >= MIN_ACCURACY]
    pick = min(ok, key=lambda p: p["fd"]) if ok else max(points, key=lambda p: p["accuracy"])
    return {**pick, "meets_target": bool(ok) and pick["fd_over_floor"] <= MAX_FLOOR_RATIO}


def plot(result, path):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install matplotlib (the JSON is written)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_fd) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, run in result["runs"].items():
        cfgs = [p["cfg"] for p in run["points"]]
        style = "-o" if name in ("digits", "digits_mrar") else "--s"
        ax_acc.plot(cfgs, [100 * p["accuracy"] for p in run["points"]], style, label=name)
        ax_fd.plot(cfgs, [p["fd"] for p in run["points"]], style, label=name)
    floor = result["floor_fd"]
    ax_fd.axhline(floor, color="grey", lw=1, label=f"real vs real ({floor:.1f})")
    ax_fd.axhline(MAX_FLOOR_RATIO * floor, color="grey", lw=1, ls=":", label=f"{MAX_FLOOR_RATIO:g}x floor")
    ax_acc.axhline(100 * MIN_ACCURACY, color="grey", lw=1, ls=":")
    ax_acc.set(xlabel="cfg", ylabel="judge accuracy (%)", title="read as the class asked for")
    ax_fd.set(xlabel="cfg", ylabel="FD (judge features)", title="distance to real training digits", yscale="log")
    ax_fd.legend(fontsize=7)
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def collect(seconds):
    """The result dict from the finished runs' reports and points."""
    runs = {}
    for name, (what, flags, cfgs, _) in RUNS.items():
        folder = run_dir(name)
        trained = digits.read_report(folder)
        points = [summary(digits.read_report(point_dir(folder, c))) for c in cfgs]
        command, extra = ["python main.py", *flags], None
        if name == "digits_more":
            command.append(f"--max_train_steps {trained['training']['steps']}")
            extra = trained["training"]["steps"] - trained_steps(run_dir(BASE))
        runs[name] = {"what": what, "command": " ".join(command), "mode": trained["mode"],
                      "training": trained["training"], "extra_steps": extra, "starts_from": list(RUNS[name][3])[:1],
                      "seconds_here": {k: v for k, v in seconds.items() if k.endswith(f" {name}")},
                      "points": points, "best": best(points)}
        b = runs[name]["best"]
        print(f"{name}: best cfg {b['cfg']:g}: accuracy {b['accuracy']:.1%}, FD {b['fd']:.1f} "
              f"({b['fd_over_floor']}x floor), precision {b['precision']:.2f}, recall {b['recall']:.2f}", flush=True)
    first = digits.read_report(point_dir(run_dir(BASE), SWEEP_CFGS[0]))["diversity"]
    return {"cfgs": list(SWEEP_CFGS), "compare_cfgs": list(COMPARE_CFGS), "min_accuracy": MIN_ACCURACY,
            "max_floor_ratio": MAX_FLOOR_RATIO, "floor_fd": first["real_floor"]["fd"], "floor": first["real_floor"],
            "num_images": first["num_generated"], "features": first["features"], "runs": runs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_cfg_sweep.json"),
                   help="results JSON (default: benchmarks/results/digits_cfg_sweep.json)")
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "digits_cfg_sweep.png"),
                   help="accuracy and FD against cfg (default: docs/digits_cfg_sweep.png; needs matplotlib)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs and sweeps at a time, one thread each (default: 2, or 1 on a 1-core machine)")
    p.add_argument("--run", help="instead of the sweep: report this finished run folder at --cfgs")
    p.add_argument("--cfgs", type=float, nargs="+", default=[1.5, 2.0], help="with --run: guidance scales to report")
    p.add_argument("--steps", type=int, help="with --run: sampler steps (default: the run's)")
    p.add_argument("--threads", type=int, default=None, help="with --run: torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.run:
        if args.threads:
            torch.set_num_threads(args.threads)
        return points_of_run(os.path.abspath(args.run), args.cfgs, args.steps)
    os.chdir(ROOT)  # the runs' stored paths (data/digits, output/...) are relative to the repository
    t0, load = time.time(), os.getloadavg()[0]
    check_finished_runs()
    seconds = run_jobs(jobs(), args.jobs)
    result = {**collect(seconds), "jobs": args.jobs, "wall_seconds": round(time.time() - t0, 1),
              "load_average_before": load, "load_average_after": os.getloadavg()[0], "machine": machine(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_json(args.out, result)
    print(f"wrote {args.out}")
    plot(result, args.plot)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
