"""Checkpoint save time and resume memory on CPU: how long engine.save takes to write checkpoint-last.pth (model,
EMA, AdamW state, as a run saves it when preempted), and the peak host memory of a resume's read + load with and
without mmap, each read in a fresh process.

    python benchmarks/checkpoint_io.py --depth 3 --out benchmarks/results/checkpoint_io.json

The model is transdiff_base with `--depth` encoder and decoder blocks (3: 73 M parameters, a 1.2 GB
checkpoint); the save rate is scaled to TransDiff-L and -H by their checkpoint sizes (4 copies of the weights
in fp32: model, EMA, Adam's two moments).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine_transdiff as engine  # noqa: E402
from models.pretrained import read_checkpoint  # noqa: E402
from models.transdiff import build_model  # noqa: E402
from util.checkpoint import LAST  # noqa: E402
from util.distributed import DistInfo  # noqa: E402
from util.optim import EMA, build_adamw  # noqa: E402

BYTES_PER_PARAM = 4 * 4  # fp32 model, EMA, exp_avg, exp_avg_sq


def build(depth):
    torch.manual_seed(0)
    model = build_model("transdiff_base", img_size=256, class_num=1000, encoder_depth=depth, decoder_depth=depth)
    optimizer = build_adamw(model, 1e-4, 0.02)
    for p in model.parameters():  # one step: the optimizer holds both moments, as in a real checkpoint
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, EMA(model, 0.9999), optimizer


def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def resume(path, depth, mmap):
    """One resume in this process: read, build, load model, EMA and optimizer; memory peaks in MiB."""
    peak = {"anon": 0}
    done = threading.Event()

    def sample():  # VmHWM counts mapped file pages too; the anonymous part is what each rank owns alone
        while not done.is_set():
            peak["anon"] = max(peak["anon"], status_kib("RssAnon"))
            time.sleep(0.005)

    watcher = threading.Thread(target=sample, daemon=True)
    baseline = status_kib("VmRSS")
    watcher.start()
    t = time.perf_counter()
    ckpt = read_checkpoint(path, mmap=mmap)
    model = build_model("transdiff_base", img_size=256, class_num=1000, encoder_depth=depth, decoder_depth=depth)
    ema, optimizer = EMA(model, 0.9999), build_adamw(model, 1e-4, 0.02)
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["model_ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    seconds = time.perf_counter() - t
    del ckpt
    done.set()
    watcher.join()
    mib = 1 / 1024
    return {"mmap": mmap, "seconds": seconds, "baseline_rss_mib": baseline * mib,
            "peak_rss_mib": status_kib("VmHWM") * mib, "peak_anon_mib": peak["anon"] * mib,
            "end_anon_mib": status_kib("RssAnon") * mib, "end_file_mib": status_kib("RssFile") * mib}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    p.add_argument("--out", default=None, help="JSON report (default: print only)")
    p.add_argument("--resume_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mmap", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.resume_child:
        print(json.dumps(resume(args.resume_child, args.depth, bool(args.mmap))))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        model, ema, optimizer = build(args.depth)
        n = sum(p.numel() for p in model.parameters())
        run = engine.Run(args=argparse.Namespace(output_dir=folder), dist=DistInfo(), model=model, raw=model, ema=ema,
                         optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False))
        saves = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            engine.save(run)
            saves.append(time.perf_counter() - t)
        path = os.path.join(folder, LAST)
        size = os.path.getsize(path)
        del run, model, ema, optimizer
        resumes = []
        for mmap in (0, 1):
            cmd = [sys.executable, os.path.abspath(__file__), "--depth", str(args.depth), "--resume_child", path,
                   "--mmap", str(mmap)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if done.returncode:
                raise RuntimeError(f"the resume process failed: {done.stderr[-2000:]}")
            out = done.stdout
            resumes.append(json.loads(out.strip().splitlines()[-1]))
    rate = size / min(saves)
    scaled = {}
    for name in ("transdiff_large", "transdiff_huge"):
        with torch.device("meta"):
            params = sum(p.numel() for p in build_model(name, img_size=256, class_num=1000).parameters())
        scaled[name] = {"parameters_m": params / 1e6, "checkpoint_gb": params * BYTES_PER_PARAM / 1e9,
                        "save_seconds_at_this_rate": params * BYTES_PER_PARAM / rate}
    report = {"command": " ".join(["python", "benchmarks/checkpoint_io.py", *(argv or sys.argv[1:])]),
              "model": f"transdiff_base, encoder and decoder depth {args.depth}",
              "parameters_m": n / 1e6, "checkpoint_mb": size / 1e6, "save_seconds": saves,
              "save_mb_per_s": rate / 1e6, "scaled": scaled, "resume": resumes,
              "torch": torch.__version__, "threads": 1}
    print(json.dumps(report, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
