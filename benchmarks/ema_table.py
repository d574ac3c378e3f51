"""EMA against raw weights of the digits preset at several lengths (docs/ema.md).

    python benchmarks/ema_table.py --label warmup                      # the preset as it is
    python benchmarks/ema_table.py --label released -- --no-ema_warmup  # the released EMA (no warm-up)
    python benchmarks/ema_table.py --table                              # both into one JSON and a Markdown table

One run per label, grown in segments: `main.py --preset digits --epochs E` for each E of --epochs into the same
run folder. With the preset's constant learning rate after its one warm-up epoch, a run resumed to E epochs holds
the weights of a run of E epochs from the start (resume is exact), so one 120-epoch run gives every length. After
each segment the preset's report is read twice: on the EMA weights (the report the command writes) and on the
raw weights (the same command with --eval_wo_ema, which trains nothing more). The raw weights do not depend on
the EMA, so the raw columns of both labels agree. Every label shares one data folder, hence one judge.
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
from util.checkpoint import save_json  # noqa: E402

WORK = os.path.join("output", "ema_table")
RESULT = os.path.join("benchmarks", "results", "ema_table.json")
LENGTHS = (3, 10, 30, 120)


def report_path(label, which, epochs):
    return os.path.join(ROOT, WORK, label, "reports", f"{which}-{epochs}.json")


def run_label(label, lengths, raw_at, extra):
    """Grow the run of `label` to each length in turn; a call after an interruption goes on where it stopped (a
    length whose reports exist is skipped), but never reports a run that is already past a length as that length."""
    run_dir, data = os.path.join(WORK, label, "run"), os.path.join(WORK, "data")
    os.makedirs(os.path.dirname(report_path(label, "ema", 0)), exist_ok=True)
    for epochs in lengths:
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


def table(labels, lengths):
    out = {"command": "python benchmarks/ema_table.py --label LABEL [-- main.py flags]", "lengths": list(lengths),
           "labels": {}}
    lines = ["| epochs | raw weights: accuracy / FD | " + " | ".join(f"EMA, {lab}: accuracy / FD" for lab in labels)
             + " |", "|---" * (2 + len(labels)) + "|"]
    cells = {epochs: [str(epochs)] for epochs in lengths}
    for lab in labels:
        out["labels"][lab] = {}
        for epochs in lengths:
            got = {w: digits_report(report_path(lab, w, epochs)) for w in ("ema", "raw")}
            entry = out["labels"][lab][epochs] = {w: row(r) for w, r in got.items() if r}
            for r in got.values():
                if r:  # every report of one data folder has the same judge and floor
                    out["floor"], out["judge_real_accuracy"] = r["diversity"]["real_floor"], r["judge"]["real_accuracy"]
                    entry.update(steps=r["training"]["steps"], train_seconds=r["training"]["train_seconds"])
    for epochs in lengths:
        raws = [out["labels"][lab][epochs]["raw"] for lab in labels if "raw" in out["labels"][lab][epochs]]
        if any(r != raws[0] for r in raws):
            raise SystemExit(f"the raw weights' reports at {epochs} epochs differ between labels: {raws}")
        cells[epochs].append(cell(raws[0] if raws else None))
        cells[epochs] += [cell(out["labels"][lab][epochs].get("ema")) for lab in labels]
    lines += ["| " + " | ".join(c) + " |" for c in cells.values()]
    out["markdown"] = "\n".join(lines)
    save_json(os.path.join(ROOT, RESULT), out)
    print(out["markdown"])
    print(f"floor FD {out['floor']['fd']}; wrote {RESULT}")


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
    p.add_argument("--table", nargs="*", default=None, metavar="LABEL",
                   help="combine the reports of these labels (default: warmup released)")
    p.add_argument("--figure", type=int, default=None, metavar="EPOCHS",
                   help="with --table: docs/ema_<EPOCHS>epochs.png, raw and EMA digits side by side")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more main.py flags")
    args = p.parse_args(argv)
    if args.table is not None:
        labels = args.table or ["released", "warmup"]
        if args.figure:
            figure(args.figure, labels, os.path.join("docs", f"ema_{args.figure}epochs.png"))
        return table(labels, args.epochs)
    if not args.label:
        p.error("give --label NAME (or --table)")
    raw_at = set(args.epochs if args.raw_at is None else args.raw_at)
    run_label(args.label, sorted(args.epochs), raw_at, args.extra[1:] if args.extra[:1] == ["--"] else args.extra)


if __name__ == "__main__":
    main()
