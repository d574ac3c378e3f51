"""PNG writing off the critical path: engine_eval.generate_images with the writer thread (and with two) against
writing each PNG in the generating thread, for a stand-in model whose sampling waits a fixed time per batch (as
the CPU does while a GPU samples) and decodes to 256 px images of natural-image-like content.

    python benchmarks/png_writer.py --images 128 --batch 16 --gpu_ms_per_image 27

Writes benchmarks/results/png_writer.json: images/s of both, and the time to encode one PNG.
"""
import argparse
import functools
import os
import sys
import tempfile
import time
from argparse import Namespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine_eval  # noqa: E402
import util.evaluation as ev  # noqa: E402
from util.checkpoint import save_json  # noqa: E402


class WaitingModel(torch.nn.Module):
    """Samples by waiting `seconds_per_image` per image, as the host does while the GPU samples."""

    mrar, class_num, img_size = False, 8, 256

    def __init__(self, seconds_per_image):
        super().__init__()
        self.seconds_per_image = seconds_per_image
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def samples(self, labels, generator=None, **_):
        time.sleep(self.seconds_per_image * len(labels))
        return torch.stack([torch.randn(16, 16, 16, generator=g) for g in generator])


class SmoothTokenizer:
    """Latents to 256 px RGB: bicubic upsampling (smooth regions) plus fine noise, so PNGs compress as photos do."""

    scale_factor = 1.0

    def decode(self, z):
        x = F.interpolate(z[:, :3], size=(256, 256), mode="bicubic", align_corners=False).tanh()
        return (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)


class InlineWriter:
    """The previous way: each PNG written by the generating thread before the next batch."""

    def __init__(self, max_pending, threads=1):
        pass

    def put(self, array, path):
        ev.save_png(array, path)

    def close(self):
        pass


def run(writer_cls, opts, folder):
    ev.PngWriter, saved = writer_cls, ev.PngWriter
    try:
        args = Namespace(num_images=opts.images, eval_bsz=opts.batch, class_num=8, img_size=256, model="stand-in",
                         resume=None)
        t0 = time.perf_counter()
        engine_eval.generate_images(WaitingModel(opts.gpu_ms_per_image / 1000), SmoothTokenizer(), args, folder,
                                    ev.SamplingSettings(num_sampling_steps=1, seed=0))
        return time.perf_counter() - t0
    finally:
        ev.PngWriter = saved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--gpu_ms_per_image", type=float, default=27.0, help="TransDiff-L at the bf16 peak of an H100")
    p.add_argument("--out", default="benchmarks/results/png_writer.json")
    opts = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        arr = ev.to_uint8(SmoothTokenizer().decode(torch.randn(1, 16, 16, 16)))[0]
        t0 = time.perf_counter()
        for i in range(16):
            ev.save_png(arr, os.path.join(tmp, f"probe{i}.png"))
        encode_ms = (time.perf_counter() - t0) / 16 * 1000
        png_bytes = os.path.getsize(os.path.join(tmp, "probe0.png"))
        two = functools.partial(ev.PngWriter, threads=2)
        for name, cls in (("inline", InlineWriter), ("writer_thread", ev.PngWriter), ("two_writer_threads", two),
                          ("inline_again", InlineWriter), ("writer_thread_again", ev.PngWriter),
                          ("two_writer_threads_again", two)):
            wall = run(cls, opts, os.path.join(tmp, name))
            rows[name] = {"wall_s": round(wall, 2), "images_per_s": round(opts.images / wall, 2)}
    result = {"command": "python benchmarks/png_writer.py " + " ".join(argv or sys.argv[1:]),
              "images": opts.images, "batch": opts.batch, "gpu_ms_per_image": opts.gpu_ms_per_image,
              "png_encode_ms_256px": round(encode_ms, 2), "png_bytes": png_bytes,
              "floor_images_per_s": round(1000 / opts.gpu_ms_per_image, 2), "runs": rows,
              "note": "2 shared CPU cores under load from other jobs"}
    save_json(opts.out, result)
    print(result)


if __name__ == "__main__":
    main()
