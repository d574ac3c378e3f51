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
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import digits_preset as digits  # noqa: E402
from util.checkpoint import save_json  # noqa: E402

WORK = os.path.join("output", "ema_table")
RESULT = os.path.join("benchmarks", "results", "ema_table.json")
LENGTHS = (3, 10, 30, 120)


def report_path(label, which, epochs):
    return os.path.join(ROOT, WORK, label, "reports", f"{which}-{epochs}.json")


def run_label(label, lengths, extra):
    run_dir, data = os.path.join(WORK, label, "run"), os.path.join(WORK, "data")
    os.makedirs(os.path.dirname(report_path(label, "ema", 0)), exist_ok=True)
    for epochs in lengths:
        for which, flags in (("ema", []), ("raw", ["--eval_wo_ema"])):
            cmd = [sys.executable, "main.py", "--preset", "digits", "--epochs", str(epochs), "--data_path", data,
                   "--output_dir", run_dir, *flags, *extra]
            print(f"$ {' '.join(cmd)}", flush=True)
            t0 = time.time()
            subprocess.run(cmd, cwd=ROOT, check=True)
            print(f"{label} {which} {epochs} epochs: {time.time() - t0:.0f} s", flush=True)
            shutil.copyfile(os.path.join(ROOT, run_dir, digits.REPORT_NAME), report_path(label, which, epochs))


def row(report):
    g = report["diversity"]["generated"]
    return {"accuracy": report["accuracy"], "fd": g["fd"], "precision": g["precision"], "recall": g["recall"]}


def table(labels, lengths):
    out = {"command": "python benchmarks/ema_table.py --label LABEL [-- main.py flags]", "lengths": list(lengths),
           "labels": {}}
    lines = ["| epochs (steps) | " + " | ".join(f"{lab}: EMA acc / FD | {lab}: raw acc / FD" for lab in labels) + " |",
             "|---" * (1 + 2 * len(labels)) + "|"]
    cells = {}
    for lab in labels:
        out["labels"][lab] = {}
        for epochs in lengths:
            ema, raw = (digits_report(report_path(lab, w, epochs)) for w in ("ema", "raw"))
            out["labels"][lab][epochs] = {"steps": ema["training"]["steps"], "ema": row(ema), "raw": row(raw),
                                          "train_seconds": ema["training"]["train_seconds"],
                                          "ema_rate": ema.get("ema_rate")}
            out["floor"] = ema["diversity"]["real_floor"]
            out["judge_real_accuracy"] = ema["judge"]["real_accuracy"]
            cells.setdefault(epochs, [f"{epochs} ({ema['training']['steps']})"])
            cells[epochs] += [f"{r['accuracy']:.1%} / {r['fd']:.1f}" for r in (row(ema), row(raw))]
    lines += ["| " + " | ".join(c) + " |" for c in cells.values()]
    out["markdown"] = "\n".join(lines)
    save_json(os.path.join(ROOT, RESULT), out)
    print(out["markdown"])
    print(f"floor FD {out['floor']['fd']}; wrote {RESULT}")


def digits_report(path):
    import json
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", help="name of this run (its folder under output/ema_table)")
    p.add_argument("--epochs", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--table", nargs="*", default=None, metavar="LABEL",
                   help="combine the reports of these labels (default: warmup released)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more main.py flags")
    args = p.parse_args(argv)
    if args.table is not None:
        return table(args.table or ["released", "warmup"], args.epochs)
    if not args.label:
        p.error("give --label NAME (or --table)")
    run_label(args.label, sorted(args.epochs), args.extra[1:] if args.extra[:1] == ["--"] else args.extra)


if __name__ == "__main__":
    main()
