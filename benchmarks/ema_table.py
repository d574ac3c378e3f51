"""EMA against raw weights of the digits preset at several lengths (docs/ema.md).

    python benchmarks/ema_table.py --label preset                      # the preset as it is
    python benchmarks/ema_table.py --label released -- --no-ema_warmup --lr_cooldown 0   # the released recipe
    python benchmarks/ema_table.py --table preset --out benchmarks/results/ema_table_preset.json

`main.py --preset digits --epochs E` for each E of --epochs. Where the learning rate does not depend on the
planned length (a constant rate after the warm-up: --lr_cooldown 0), one run is grown in segments into the same
folder: a run resumed to E epochs then holds the weights of a run of E epochs from the start (resume is exact).
Where it does (the preset's cool-down over the last part of the run, or a cosine schedule), each length is a run of
its own. After each length the preset's report is read twice: on the EMA weights (the report the command writes)
and on the raw weights (the same command with --eval_wo_ema, which trains nothing more). Every label shares one
data folder, hence one judge.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import digits_preset as digits  # noqa: E402
import main as train_main  # noqa: E402
from util.checkpoint import save_json  # noqa: E402

WORK = os.path.join("output", "ema_table")
RESULT = os.path.join("benchmarks", "results", "ema_table.json")
LENGTHS = (3, 10, 30, 120)


def report_path(label, which, epochs):
    return os.path.join(ROOT, WORK, label, "reports", f"{which}-{epochs}.json")


def length_dependent(extra):
    """Whether the learning rate of `main.py --preset digits <extra>` depends on --epochs."""
    args = train_main.parse_args(train_main.get_args_parser(), ["--preset", "digits", *extra])
    return args.lr_cooldown > 0 or args.lr_schedule != "constant"


def run_label(label, lengths, raw_at, extra):
    """Train and report each length in turn; a call after an interruption goes on where it stopped (a length
    whose reports exist is skipped), but never reports a run that is already past a length as that length."""
    separate, data = length_dependent(extra), os.path.join(WORK, "data")
    os.makedirs(os.path.dirname(report_path(label, "ema", 0)), exist_ok=True)
    for epochs in lengths:
        run_dir = os.path.join(WORK, label, f"run-{epochs}" if separate else "run")
        for which, flags in (("ema", []), ("raw", ["--eval_wo_ema"])):
            if os.path.isfile(report_path(label, which, epochs)) or (which == "raw" and epochs not in raw_at):
                continue  # done by an earlier, interrupted call; or a raw report that another label has
            done = os.path.join(ROOT, run_dir, "checkpoint-last.pth")
            if os.path.isfile(done) and torch.load(done, weights_only=False)["train_state"]["epoch"] > epochs:
                raise SystemExit(f"{run_dir} is past {epochs} epochs without its {which} report: start a new label")
            cmd = [sys.executable, "main.py", "--preset", "digits", "--epochs", str(epochs), "--data_path", data,
                   "--output_dir", run_dir, *flags, *extra]
            print(f"$ {' '.join(cmd)}", flush=True)
            t0 = time.time()
            subprocess.run(cmd, cwd=ROOT, check=True)
            print(f"{label} {which} {epochs} epochs: {time.time() - t0:.0f} s", flush=True)
            shutil.copyfile(os.path.join(ROOT, run_dir, digits.REPORT_NAME), report_path(label, which, epochs))


def cell(r):
    return "not run" if r is None else f"{r['accuracy']:.1%} / {r['fd']:.1f}"


def row(report):
    g = report["diversity"]["generated"]
    return {"accuracy": report["accuracy"], "fd": g["fd"], "precision": g["precision"], "recall": g["recall"]}


def table(labels, lengths, out_path):
    """One JSON and a Markdown table: per label its raw and EMA columns (a label without raw reports has none)."""
    out = {"command": "python benchmarks/ema_table.py --label LABEL [-- main.py flags]", "lengths": list(lengths),
           "labels": {}}
    for lab in labels:
        out["labels"][lab] = {}
        for epochs in lengths:
            got = {w: digits_report(report_path(lab, w, epochs)) for w in ("raw", "ema")}
            entry = out["labels"][lab][epochs] = {w: row(r) for w, r in got.items() if r}
            for r in got.values():
                if r:  # every report of one data folder has the same judge and floor
                    out["floor"], out["judge_real_accuracy"] = r["diversity"]["real_floor"], r["judge"]["real_accuracy"]
                    entry.update(steps=r["training"]["steps"], train_seconds=r["training"]["train_seconds"])
    columns = [(lab, w) for lab in labels for w in ("raw", "ema")
               if any(w in out["labels"][lab][e] for e in lengths)]
    lines = ["| epochs | " + " | ".join(f"{lab}, {'raw weights' if w == 'raw' else 'EMA'}: accuracy / FD"
                                        for lab, w in columns) + " |", "|---" * (1 + len(columns)) + "|"]
    for epochs in lengths:
        lines.append(f"| {epochs} | " + " | ".join(cell(out["labels"][lab][epochs].get(w)) for lab, w in columns)
                     + " |")
    out["markdown"] = "\n".join(lines)
    save_json(os.path.join(ROOT, out_path), out)
    print(out["markdown"])
    print(f"floor FD {out['floor']['fd']}; wrote {out_path}")


def digits_report(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def figure(epochs, labels, path, per_class=6):
    """Side by side: the first `per_class` report digits of every class, raw weights then each label's EMA."""
    from PIL import Image

    from util.evaluation import grid, image_path
    panels = []
    raw = next(r for r in (digits_report(report_path(lab, "raw", epochs)) for lab in labels) if r)
    for report in [raw] + [digits_report(report_path(lab, "ema", epochs)) for lab in labels]:
        folder = report["images"]
        n = len([f for f in os.listdir(folder) if f.endswith(".png")])
        images = [Image.open(image_path(folder, c * (n // 10) + k, n)).convert("L") for c in range(10)
                  for k in range(per_class)]
        panels.append(grid(np.stack([np.asarray(im)[..., None].repeat(3, -1) for im in images]), 10, per_class))
    gap = 8
    canvas = Image.new("L", (sum(p.width for p in panels) + gap * (len(panels) - 1), panels[0].height), 128)
    for i, p in enumerate(panels):
        canvas.paste(p, (i * (p.width + gap), 0))
    canvas.save(os.path.join(ROOT, path), optimize=True)
    print(f"wrote {path}: raw, then the EMA of {', '.join(labels)}, at {epochs} epochs")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", help="name of this run (its folder under output/ema_table)")
    p.add_argument("--epochs", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--raw_at", type=int, nargs="*", default=None,
                   help="lengths whose raw weights are reported (default: all; the raw weights are the same in "
                        "every label, so one label's are enough)")
    p.add_argument("--table", nargs="+", default=None, metavar="LABEL", help="combine the reports of these labels")
    p.add_argument("--out", default=RESULT, help="with --table: the JSON to write")
    p.add_argument("--figure", type=int, default=None, metavar="EPOCHS",
                   help="with --table: docs/ema_<EPOCHS>epochs.png, raw and EMA digits side by side")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more main.py flags")
    args = p.parse_args(argv)
    if args.table is not None:
        if args.figure:
            figure(args.figure, args.table, os.path.join("docs", f"ema_{args.figure}epochs.png"))
        return table(args.table, args.epochs, args.out)
    if not args.label:
        p.error("give --label NAME (or --table)")
    raw_at = set(args.epochs if args.raw_at is None else args.raw_at)
    run_label(args.label, sorted(args.epochs), raw_at, args.extra[1:] if args.extra[:1] == ["--"] else args.extra)


if __name__ == "__main__":
    main()
