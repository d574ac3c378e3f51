"""Speed work (issue #6) keeps the numbers: the per-image K/V cache, the in-place inference path, the fused
CPU linear layers, the shared-time path, the sampler's rewritten arithmetic, mixed precision and
torch.compile all agree with the plain computation; the sampler never syncs with the host; the benchmark
runs end to end and counts FLOPs right."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.benchmark import decoder_flops
from diffusion import samplers
from models import fused
from models.diffdecoder import DecoderNet, DiffDecoder
from models.transdiff import build_model, compile_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_net(seed=0, width=64, depth=2, seq_len=16, cond_dim=32):
    torch.manual_seed(seed)
    net = DecoderNet(16, cond_dim, width, depth, 4, seq_len).eval()
    # the released init zeroes the output layer; give it weights so the tests see the whole network
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.05)
    torch.nn.init.normal_(net.final_layer.linear.bias, std=0.05)
    return net


def inputs(b=3, seq_len=16, n=8, cond_dim=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, seq_len, 16, generator=g), torch.randn(b, n, cond_dim, generator=g),
            torch.rand(b, generator=g) * 1000)


def reference_velocity(net, x, c, t):
    """The plain computation: autograd on, so every block takes its out-of-place path and F.linear."""
    with torch.enable_grad():
        return net(x, c, t).detach()


def test_kv_cache_gives_the_same_velocity_and_samples():
    net = small_net()
    x, c, t = inputs()
    with torch.no_grad():
        recomputed = net(x, c, t)
        cached = net(x, None, t, cond_kv=net.condition_kv(c))
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=0)
    dec = DiffDecoder(net)
    noise, cond = x[:2], torch.cat([c[:2], c[1:]])  # cfg: conditional then unconditional conditions
    kw = dict(num_steps=6, cfg=1.4, scale_0=0.9, scale_1=0.9)
    a = dec.sample(cond, noise, generator=torch.Generator().manual_seed(3), cache_kv=True, **kw)
    b = dec.sample(cond, noise, generator=torch.Generator().manual_seed(3), cache_kv=False, **kw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("onednn", [True, False])
def test_inference_path_matches_plain_path(onednn, monkeypatch):
    monkeypatch.setattr(fused, "ONEDNN_LINEAR", onednn and fused.ONEDNN_LINEAR)
    net = small_net()
    x, c, t = inputs()
    ref = reference_velocity(net, x, c, t)
    with torch.no_grad():
        fast = net(x, c, t)  # eval + no grad: in-place path, per-sample modulation
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    # one time for the whole batch (what the samplers pass): modulation folded into the LayerNorms
    t1 = t[:1]
    ref1 = reference_velocity(net, x, c, t1.expand(3))
    with torch.no_grad():
        torch.testing.assert_close(net(x, c, t1), ref1, atol=1e-5, rtol=0)
        torch.testing.assert_close(net(x, c, t1[0]), ref1, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one time or one per sample"):
        net(x, c, t[:2])


def test_onednn_linear_matches_f_linear():
    if not fused.ONEDNN_LINEAR:
        pytest.skip("no oneDNN linear in this build")
    lin = torch.nn.Linear(48, 80)
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        torch.testing.assert_close(fused.linear(x, lin), torch.nn.functional.linear(x, lin.weight, lin.bias),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(fused.linear(x, lin, gelu=True), torch.nn.functional.gelu(lin(x)),
                                   atol=1e-5, rtol=0)
    # the packed copy of the weight follows in-place updates and loads
    with torch.no_grad():
        lin.weight.mul_(2)
        torch.testing.assert_close(fused.linear(x, lin), lin(x), atol=1e-5, rtol=0)
        lin.load_state_dict({"weight": torch.randn(80, 48), "bias": torch.randn(80)})
        torch.testing.assert_close(fused.linear(x, lin), lin(x), atol=1e-5, rtol=0)
        lin.weight = torch.nn.Parameter(torch.randn(80, 48))
        torch.testing.assert_close(fused.linear(x, lin), lin(x), atol=1e-5, rtol=0)
    y = fused.linear(x, lin)  # with autograd: F.linear, so gradients flow
    y.sum().backward()
    assert lin.weight.grad is not None


def reference_maruyama(velocity_fn, noise, num_steps, cfg, scale_0, scale_1, generator, t_min=0.04):
    """The released update, written out plainly (score, drift, guidance on the drift, one draw per step)."""
    ts = samplers.maruyama_time_grid(num_steps, t_min)
    x = noise
    for i in range(num_steps):
        t_cur, dt = ts[i], ts[i + 1] - ts[i]
        x_in = torch.cat([x, x])
        v = velocity_fn(x_in, torch.full((x_in.shape[0],), t_cur * 1000.0))
        d = v - t_cur * (((t_cur - 1.0) * v - x_in) / t_cur)
        cond, uncond = d.chunk(2)
        d = uncond + cfg * (cond - uncond)
        if i < num_steps - 1:
            x = x + scale_0 * d * dt
            eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator])
            x = x + scale_1 * (2.0 * t_cur) ** 0.5 * abs(dt) ** 0.5 * eps
        else:
            x = x + d * dt
    return x


def test_sampler_matches_plain_update_and_per_sample_noise_stream():
    """Over more steps than one chunk of per-sample noise: the rewritten arithmetic and the chunked draws
    give the released update with one draw per sample and step."""
    net = small_net()
    x, c, _ = inputs(b=2)
    kv = net.condition_kv(torch.cat([c, c.flip(0)]))
    with torch.no_grad():
        fn = lambda x, t: net(x, None, t, cond_kv=kv)  # noqa: E731
        steps = samplers.NOISE_STEPS_PER_DRAW + 5
        gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]  # noqa: E731
        out = samplers.euler_maruyama(fn, x, steps, 1.3, 0.9, 0.8, generator=gens())
        ref = reference_maruyama(fn, x, steps, 1.3, 0.9, 0.8, gens())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_sampler_never_syncs_with_the_host():
    """On the meta device any .item(), bool() or data-dependent branch raises: the loop has none."""
    with torch.device("meta"):
        net = DecoderNet(16, 32, 64, 2, 4, 16).eval()
        c, noise = torch.randn(4, 8, 32), torch.randn(2, 16, 16)
    dec = DiffDecoder(net)
    for sampler, kw in (("maruyama", dict(scale_0=0.9, scale_1=0.9)), ("euler", {}), ("heun", {})):
        out = dec.sample(c, noise, 4, cfg=1.5, sampler=sampler, **kw)
        assert out.device.type == "meta" and out.shape == noise.shape
    loss = dec.loss(torch.randn(2, 16, 16, device="meta"), c[:2], batch_mul=2)
    assert loss.device.type == "meta"


def test_analytic_flops_match_a_flop_counter():
    net = small_net(width=64, seq_len=16, cond_dim=32)
    x, c, t = inputs(b=3, seq_len=16, n=8)
    f = decoder_flops(net, num_conditions=8)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        net(x, c, t)
    assert counter.get_total_flops() == 3 * (f["per_sequence_evaluation"] + f["condition_kv_per_sequence"])


def tiny_model():
    torch.manual_seed(0)
    model = build_model("transdiff_tiny", img_size=64, class_num=10, attn_dropout=0.0, proj_dropout=0.0,
                        label_drop_prob=0.0)
    torch.nn.init.normal_(model.diffdecoder.net.final_layer.linear.weight, std=0.05)
    return model


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.02), (torch.float16, 0.004)])
def test_autocast_sampling_and_training_close_to_fp32(dtype, tol):
    model = tiny_model()
    labels = torch.tensor([1, 4])
    noise = torch.randn(2, model.seq_len, model.token_embed_dim, generator=torch.Generator().manual_seed(0))
    kw = dict(num_sampling_steps=8, cfg=1.3, scale_0=0.9, scale_1=0.0, noise=noise)
    ref = model.samples(labels, **kw)
    with torch.autocast("cpu", dtype=dtype):
        out = model.samples(labels, **kw)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() <= tol * ref.abs().max()

    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for ctx in (torch.autocast("cpu", enabled=False), torch.autocast("cpu", dtype=dtype)):
        model.zero_grad()
        torch.manual_seed(5)  # same noise and t in both runs
        with ctx:
            loss = model(latents, labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert abs(losses[1] - losses[0]) <= 2 * tol * losses[0]
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny_model()
        model.grad_checkpointing = model.diffdecoder.net.grad_checkpointing = ckpt
        torch.manual_seed(5)
        model(torch.randn(2, 16, 4, 4), torch.tensor([1, 4])).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_compiled_sampling_and_training_match_eager():
    model = tiny_model()
    labels = torch.tensor([1, 4])
    noise = torch.randn(2, model.seq_len, model.token_embed_dim)
    kw = dict(num_sampling_steps=4, cfg=1.3, scale_0=0.9, scale_1=0.0, noise=noise)
    ref = model.samples(labels, **kw)
    latents = torch.randn(2, 16, 4, 4)
    torch.manual_seed(5)
    ref_loss = model(latents, labels)
    ref_loss.backward()
    ref_grad = model.diffdecoder.net.res_blocks[0].mlp.fc1.weight.grad.clone()
    model.zero_grad()
    keys = list(model.state_dict())
    compile_model(model)
    assert list(model.state_dict()) == keys  # compiled in place: checkpoints keep their layout
    torch.testing.assert_close(model.samples(labels, **kw), ref, atol=1e-4, rtol=0)
    torch.manual_seed(5)
    loss = model(latents, labels)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.diffdecoder.net.res_blocks[0].mlp.fc1.weight.grad, ref_grad, atol=1e-5,
                               rtol=1e-4)


def test_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "benchmark.py"), "--model", "transdiff_tiny",
           "--img_size", "32", "--class_num", "10", "--batch", "2", "--steps", "2", "--cfg", "1.3",
           "--repeats", "1", "--warmup", "1", "--matmul_seconds", "0.01", "--compare_cache", "--full",
           "--train", "--train_batch", "2", "--peak_tflops", "1", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, timeout=120)
    r = json.loads(out.read_text())
    s = r["sampling"]
    for key in ("decoder", "decoder_no_kv_cache"):
        for field in ("images_per_s", "ms_per_image", "evaluation_flops_per_s", "fraction_of_matmul",
                      "fraction_of_peak", "peak_memory_mib"):
            assert s[key][field] > 0
    assert s["decoder_evaluation_flops_per_image"] == 2 * 2 * s["flops"]["per_sequence_evaluation"]
    assert s["condition_kv_flops_per_image"] == 2 * s["flops"]["condition_kv_per_sequence"]
    assert s["matmul_reference"]["shape"] == [2 * 2 * 4, 64, 64]
    assert s["kv_cache_speedup"] > 0 and s["full_model"]["images_per_s"] > 0
    assert r["training"]["images_per_s"] > 0 and r["training"]["batch_mul"] == 4
    assert r["model"]["decoder_width"] == 64 and r["env"]["threads"] == 1


def test_batch_mul_attends_without_repeating_the_conditions():
    """diffusion_batch_mul: the m repeats of a target share its conditions' keys/values (grouped queries);
    the same loss and gradients as repeating the conditions themselves."""
    net = small_net()
    dec = DiffDecoder(net)
    target, c, _ = inputs(b=2)
    results = []
    for grouped in (True, False):
        net.zero_grad()
        torch.manual_seed(7)
        loss = dec.loss(target, c[:2], batch_mul=3) if grouped else \
            dec.loss(target.repeat_interleave(3, dim=0), c[:2].repeat_interleave(3, dim=0), batch_mul=1)
        loss.backward()
        results.append((loss.detach(), net.cond_embed.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="need a multiple"):
        net(target, torch.cat([c, c[:1]]), torch.rand(2) * 1000)
