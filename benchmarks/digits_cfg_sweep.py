"""Quality as papers measure it, at the quick start's scale (issue #13): a guidance sweep of both digits presets
and the paper's MRAR recipe (MRAR fine-tuned from the 1-Step model) against the 1-Step model trained on for the
same extra optimizer steps and against MRAR from scratch.

    pip install matplotlib                        # for the plot only
    python benchmarks/digits_cfg_sweep.py         # trains what is missing, sweeps, writes JSON and plot
    python benchmarks/digits_cfg_sweep.py --run output/x --cfgs 1.5 2 [--steps 60]   # one finished run

The runs (each trained by main.py unless its folder already holds a finished one; an interrupted one resumes):

    digits          output/digits          python main.py --preset digits
    digits_mrar     output/digits_mrar     python main.py --preset digits_mrar                   (MRAR from scratch)
    digits_mrar_ft  output/digits_mrar_ft  ... --preset digits_mrar --resume output/digits       (the paper's recipe)
    digits_more     output/digits_more     ... --preset digits --resume output/digits, trained on for as many
                                           optimizer steps as digits_mrar_ft took

Each (run, cfg) point is the digits report of digits_preset.py at that cfg (the run's other sampling settings, its
EMA weights): accuracy of the judge, FD / precision / recall in the judge's features against real training
digits, and the real-vs-real floor. A point whose report exists is read, not remade, so running the command
again resumes. Writes benchmarks/results/digits_cfg_sweep.json and docs/digits_cfg_sweep.png.
"""
import argparse
import math
import os
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

SWEEP_CFGS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the presets' curve
# The comparison runs are only swept where the presets' curves put the best point: MRAR sampling is the cost
COMPARE_CFGS = (1.5, 2.0, 3.0)
MIN_ACCURACY = 0.95  # the target: read as the class asked for at least as often as ...
MAX_FLOOR_RATIO = 2.0  # ... with FD within this factor of the real-vs-real floor
BASE = "output/digits"
RUNS = {  # name -> (what it is, main.py flags, cfgs swept)
    "digits": ("1-Step (preset)", ["--preset", "digits"], SWEEP_CFGS),
    "digits_mrar": ("MRAR from scratch (preset)", ["--preset", "digits_mrar"], SWEEP_CFGS),
    "digits_mrar_ft": ("MRAR fine-tuned from the 1-Step run",
                       ["--preset", "digits_mrar", "--resume", BASE, "--output_dir", "output/digits_mrar_ft"],
                       COMPARE_CFGS),
    "digits_more": ("1-Step trained on for the same extra steps",
                    ["--preset", "digits", "--resume", BASE, "--output_dir", "output/digits_more"], COMPARE_CFGS),
}


def run_dir(name):
    flags = RUNS[name][1]
    return os.path.join(ROOT, flags[flags.index("--output_dir") + 1] if "--output_dir" in flags else
                        digits.PRESETS[name]["output_dir"])


def trained_steps(folder):
    """Optimizer steps of a finished run (its report exists: main.py writes it after training), else None."""
    path = os.path.join(folder, digits.REPORT_NAME)
    return digits.read_report(folder)["training"]["steps"] if os.path.isfile(path) else None


def train(name, extra_steps=None):
    """Train the run unless finished; `extra_steps`: train on from BASE for that many more optimizer steps."""
    folder = run_dir(name)
    if trained_steps(folder) is not None:
        return {"seconds": 0.0, "trained_here": False}
    flags = list(RUNS[name][1])
    if extra_steps is not None:
        base = digits.read_report(os.path.join(ROOT, BASE))["training"]
        steps_per_epoch = base["steps"] // base["epochs"]
        total = base["steps"] + extra_steps
        flags += ["--max_train_steps", str(total), "--epochs", str(math.ceil(total / steps_per_epoch))]
    cmd = [sys.executable, "main.py", *flags]
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return {"seconds": round(time.time() - t0, 1), "trained_here": True}


def point(name, cfg, loaded, log, folder=None, out=None, steps=None):
    """The digits report of run `name` (or of the run in `folder`) at `cfg`, written to `out` (made unless it
    exists), with the run's other sampling settings or `steps` sampler steps; `loaded` caches the model."""
    folder = folder or run_dir(name)
    out = out or os.path.join(ROOT, "output", "cfg_sweep", name, f"cfg{cfg:g}")
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
    state = Namespace(**ckpt["train_state"])
    os.makedirs(out, exist_ok=True)
    with torch.no_grad():
        return digits.write_report(model, tokenizer, args, state, log=log)


def points_of_run(folder, cfgs, steps=None):
    """--run: any finished digits run at chosen cfgs; reports under <run>/cfg_points/cfg<c>[-steps<n>]/."""
    loaded = {}
    for cfg in cfgs:
        tag = f"cfg{cfg:g}" + (f"-steps{steps}" if steps is not None else "")
        p = summary(point(None, cfg, loaded, print, folder, os.path.join(folder, "cfg_points", tag), steps))
        print(f"{folder} {tag}: accuracy {p['accuracy']:.1%}, FD {p['fd']:.2f} ({p['fd_over_floor']}x floor), "
              f"precision {p['precision']:.3f}, recall {p['recall']:.3f}", flush=True)


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_cfg_sweep.json"))
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "digits_cfg_sweep.png"))
    p.add_argument("--run", help="instead of the sweep: report this finished run folder at --cfgs")
    p.add_argument("--cfgs", type=float, nargs="+", default=[1.5, 2.0])
    p.add_argument("--steps", type=int, help="with --run: sampler steps (default: the run's)")
    args = p.parse_args(argv)
    if args.run:
        return points_of_run(os.path.abspath(args.run), args.cfgs, args.steps)
    os.chdir(ROOT)  # the runs' stored paths (data/digits, output/...) are relative to the repository
    t0, load = time.time(), os.getloadavg()[0]
    runs, loaded = {}, {}
    for name in ("digits", "digits_mrar_ft", "digits_more", "digits_mrar"):
        extra = None
        if name == "digits_more":  # as many optimizer steps on top of the 1-Step run as the fine-tuning took
            extra = trained_steps(run_dir("digits_mrar_ft"))
        training = train(name, extra)
        t1 = time.time()
        reports = [point(name, cfg, loaded, print) for cfg in RUNS[name][2]]
        points = [summary(r) for r in reports]
        flags = RUNS[name][1]
        if extra is not None:
            flags = [*flags, "(+ --max_train_steps base + extra)"]
        runs[name] = {"what": RUNS[name][0], "command": " ".join(["python main.py", *flags]),
                      "mode": reports[0]["mode"], "training": {**reports[0]["training"], **training},
                      "extra_steps": extra, "sweep_seconds": round(time.time() - t1, 1),
                      "points": points, "best": best(points)}
        b = runs[name]["best"]
        print(f"{name}: best cfg {b['cfg']}: accuracy {b['accuracy']:.1%}, FD {b['fd']:.1f} ({b['fd_over_floor']}x "
              f"floor), precision {b['precision']:.2f}, recall {b['recall']:.2f}", flush=True)
    first = reports[0]["diversity"]
    result = {"cfgs": list(SWEEP_CFGS), "compare_cfgs": list(COMPARE_CFGS), "min_accuracy": MIN_ACCURACY,
              "max_floor_ratio": MAX_FLOOR_RATIO, "floor_fd": first["real_floor"]["fd"],
              "floor": first["real_floor"], "num_images": first["num_generated"],
              "features": first["features"], "runs": runs,
              "wall_seconds": round(time.time() - t0, 1), "load_average_before": load,
              "load_average_after": os.getloadavg()[0], "machine": machine(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_json(args.out, result)
    print(f"wrote {args.out}")
    plot(result, args.plot)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
