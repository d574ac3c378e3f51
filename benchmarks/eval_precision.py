"""What the sampling precision does to the generated images, on CPU (the CUDA default of util/evaluation.py).

    python benchmarks/eval_precision.py digits --run output/digits30 --raw    # accuracy / FD of a digits run
    python benchmarks/eval_precision.py large --steps 3 --batch 1            # a released-size model, random weights
    python benchmarks/eval_precision.py fingerprint                          # the weights' fingerprint at L size

`digits`: the run's digits report (digits_preset.write_report: the judge's accuracy, FD, precision, recall) in
fp32, bf16 and fp16 autocast with the same seeds, and how many pixel values of the images differ from fp32.
`large`: the same labels and noise through TransDiff-L with random weights (the zero-initialised parameters drawn
too, so that every layer acts) in fp32 and under bf16 / fp16 autocast: the largest latent difference from fp32.
`fingerprint`: wall and CPU time of util.evaluation.weights_fingerprint of that model, 3 times.
Writes JSON under benchmarks/results/.
"""
import argparse
import json
import os
import sys
import time
from argparse import Namespace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import digits_preset  # noqa: E402
from models.pretrained import checkpoint_args, load_tokenizer, load_transdiff  # noqa: E402
from models.transdiff import build_model  # noqa: E402
from util.amp import autocast, dtype_from_name  # noqa: E402
from util.checkpoint import save_json  # noqa: E402
from util.evaluation import SamplingSettings, image_seed, weights_fingerprint  # noqa: E402

DTYPES = ("fp32", "bf16", "fp16")
RESULTS = "benchmarks/results"


def digits(opts):
    model, ckpt = load_transdiff(opts.run, use_ema=not opts.raw)
    tokenizer = load_tokenizer(ckpt)
    args = checkpoint_args(ckpt)
    ts = ckpt.get("train_state") or {}
    state = Namespace(step=ts.get("step", 0), epoch=ts.get("epoch", 0), images_seen=ts.get("images_seen", 0),
                      train_seconds=ts.get("train_seconds", 0.0))
    rows, images = {}, {}
    for name in DTYPES:
        out = os.path.join(opts.scratch, name)
        run_args = Namespace(**{**args, "output_dir": out, "eval_wo_ema": opts.raw, "eval_dtype": name,
                                "report_per_class": opts.per_class})
        sampling = SamplingSettings.from_args(run_args)
        t0 = time.perf_counter()
        report = digits_preset.write_report(model, tokenizer, run_args, state, sampling=sampling)
        div = report["diversity"]["generated"]
        images[name] = digits_preset._read_pngs(report["images"], report["num_images"]).astype(np.int16)
        rows[name] = {"accuracy": report["accuracy"], "fd": div["fd"], "precision": div["precision"],
                      "recall": div["recall"], "seconds": round(time.perf_counter() - t0, 1)}
        if name != "fp32":
            diff = np.abs(images[name] - images["fp32"])
            rows[name].update(values_differing=int((diff > 0).sum()), values=int(diff.size),
                              images_differing=int((diff.reshape(len(diff), -1) > 0).any(1).sum()),
                              max_abs_diff_of_255=int(diff.max()))
    floor = report["diversity"]["real_floor"]
    return {"run": os.path.relpath(opts.run), "weights": "raw" if opts.raw else "ema", "training": report["training"],
            "num_images": report["num_images"], "sampling": {k: v for k, v in sampling.record().items()
                                                             if k != "eval_dtype"},
            "real_floor": {k: floor[k] for k in ("fd", "precision", "recall")}, "threads": torch.get_num_threads(),
            "by_dtype": rows}


def large_model(opts):
    torch.manual_seed(0)
    model = build_model("transdiff_large", img_size=256, class_num=1000).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # zero-initialised (adaLN gates, the output layer): drawn, or the decoder is silent
                p.copy_(torch.randn(p.shape, generator=g) * opts.init_std)
    return model


def fingerprint(opts):
    model = large_model(opts)
    rows = []
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        digest = weights_fingerprint(model)
        rows.append({"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)})
    return {"model": "transdiff_large", "parameters": sum(p.numel() for p in model.parameters()),
            "bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()), "fingerprint": digest,
            "runs": rows}


def large(opts):
    model = large_model(opts)
    labels = torch.arange(opts.batch) * 97 % 1000
    kw = dict(num_sampling_steps=opts.steps, cfg=1.3, scale_0=0.89, scale_1=0.95, sampler="maruyama")
    latents, rows = {}, {}
    for name in DTYPES:
        gens = [torch.Generator().manual_seed(image_seed(1, i)) for i in range(opts.batch)]
        t0 = time.perf_counter()
        with torch.no_grad(), autocast("cpu", dtype_from_name(name)):
            latents[name] = model.samples(labels, generator=gens, **kw).float()
        rows[name] = {"seconds": round(time.perf_counter() - t0, 1),
                      "nonfinite": int((~torch.isfinite(latents[name])).sum())}
        if name != "fp32":
            diff = (latents[name] - latents["fp32"]).abs()
            rows[name].update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()))
    rows["fp32"]["latent_std"] = float(latents["fp32"].std())
    return {"model": "transdiff_large", "parameters": sum(p.numel() for p in model.parameters()),
            "init_std_of_zero_initialised": opts.init_std, "batch": opts.batch, "sampling": kw,
            "threads": torch.get_num_threads(), "by_dtype": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["digits", "large", "fingerprint"])
    p.add_argument("--run", default="output/digits30")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--per_class", type=int, default=100)
    p.add_argument("--scratch", default="output/eval_precision")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--init_std", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    result = {"command": "python benchmarks/eval_precision.py " + " ".join(argv or sys.argv[1:]),
              "torch": torch.__version__,
              **{"digits": digits, "large": large, "fingerprint": fingerprint}[opts.what](opts)}
    out = opts.out or os.path.join(RESULTS, f"eval_precision_{opts.what}.json")
    save_json(out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
