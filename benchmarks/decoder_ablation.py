"""Transformer decoder vs MAR-style per-token MLP head, on the digits quick-start preset, trained alike.

    python benchmarks/decoder_ablation.py [--preset digits] [--out benchmarks/results/decoder_ablation]

Trains the preset once per head (same data, steps, seed, sampling settings; only `--decoder` differs), then
writes `<out>/decoder_ablation.json` (classifier accuracy on generated digits, per class and overall, training
time, parameter counts) and `<out>/decoder_ablation_grid.png` (the two sample grids side by side). A finished
run folder is reused, so rerunning only rewrites the summary. Extra arguments go to main.py for both runs.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from util.cli import HelpFormatter  # noqa: E402

HEADS = ("transformer", "mlp")


def run_head(preset, head, out_dir, extra):
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--preset", preset, "--decoder", head,
           "--output_dir", out_dir, *extra]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(os.path.join(out_dir, "digits_quality.json")) as f:
        report = json.load(f)
    return report, time.time() - t0


def side_by_side(paths, labels, dest):
    grids = [Image.open(p).convert("RGB") for p in paths]
    pad, top = 8, 18
    width = sum(g.width for g in grids) + pad * (len(grids) + 1)
    canvas = Image.new("RGB", (width, max(g.height for g in grids) + top + pad), "white")
    draw, x = ImageDraw.Draw(canvas), pad
    for grid, label in zip(grids, labels):
        draw.text((x, 3), label, fill="black")
        canvas.paste(grid, (x, top))
        x += grid.width + pad
    canvas.save(dest)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="digits", choices=["digits", "digits_mrar"], help="main.py preset of both runs")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "decoder_ablation"),
                   help="folder of the two runs and the summary (default: benchmarks/results/decoder_ablation)")
    args, extra = p.parse_known_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for head in HEADS:
        run_dir = os.path.join(args.out, f"{args.preset}-{head}")
        report, wall = run_head(args.preset, head, run_dir, extra)
        results[head] = {"accuracy": report.get("accuracy"), "per_class": report.get("per_class"),
                         "wall_seconds_this_call": round(wall, 1), "run_dir": os.path.relpath(run_dir, ROOT),
                         "report": report}
    summary = {"preset": args.preset, "extra_args": extra, "heads": results,
               "note": "same preset (epochs, steps) and seed for both heads; only --decoder differs"}
    with open(os.path.join(args.out, "decoder_ablation.json"), "w") as f:
        json.dump(summary, f, indent=2)
    side_by_side([os.path.join(args.out, f"{args.preset}-{h}", "samples_grid.png") for h in HEADS],
                 [f"{h}: {results[h]['accuracy']:.1%}" for h in HEADS],
                 os.path.join(args.out, "decoder_ablation_grid.png"))
    for head in HEADS:
        print(f"{head:12s} accuracy {results[head]['accuracy']:.3f}")


if __name__ == "__main__":
    main()
