"""The TransDiff model: weight layout of every released variant, parity with the reference implementation,
precision, resolutions, MRAR, and clear errors."""
import pytest
import torch
from conftest import load_fixture, synth_state_dict

from models import transdiff
from models.transdiff import Transdiff, build_model, patchify, unpatchify

RELEASED = {
    "transdiff_base": ("transdiff_base", {}),
    "transdiff_base_mrar": ("transdiff_base", {"mrar": True}),
    "transdiff_large": ("transdiff_large", {}),
    "transdiff_large_mrar": ("transdiff_large", {"mrar": True}),
    "transdiff_huge": ("transdiff_huge", {}),
    "transdiff_huge_mrar": ("transdiff_huge", {"mrar": True}),
    "transdiff_large_512": ("transdiff_large", {"img_size": 512}),
}
PARAMS_M = {"transdiff_base": 289.96, "transdiff_large": 682.52, "transdiff_huge": 1327.89}


@pytest.mark.parametrize("variant", sorted(RELEASED))
def test_state_dict_matches_released(variant, manifests):
    name, kwargs = RELEASED[variant]
    with torch.device("meta"):
        model = build_model(name, **kwargs)
    sd = model.state_dict()
    entry = manifests[variant]
    assert list(sd) == [k for k, _ in entry["state_dict"]]
    assert [list(v.shape) for v in sd.values()] == [s for _, s in entry["state_dict"]]
    n = sum(p.numel() for p in model.parameters())
    assert n == entry["num_params"]
    if variant in PARAMS_M:
        assert round(n / 1e6, 2) == PARAMS_M[variant]


def fixture_model(fx, **kwargs):
    c = fx["config"]
    model = Transdiff(img_size=c["img_size"], patch_size=c["patch_size"], encoder_embed_dim=c["encoder_embed_dim"],
                      encoder_depth=c["encoder_depth"], encoder_num_heads=c["encoder_num_heads"],
                      decoder_embed_dim=c["decoder_embed_dim"], decoder_depth=c["decoder_depth"],
                      decoder_num_heads=c["decoder_num_heads"], mlp_ratio=c["mlp_ratio"], class_num=c["class_num"],
                      buffer_size=c["buffer_size"], norm_eps=c["norm_eps"], **kwargs)
    model.load_state_dict(synth_state_dict(fx["manifest"], fx["weights_seed"]), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def fx1():
    return load_fixture("parity_1step_256.pt")


@pytest.fixture(scope="module")
def model1(fx1):
    return fixture_model(fx1)


def test_parity_1step_conditions_and_decoder(fx1, model1):
    with torch.no_grad():
        cond = model1.forward_encoder(model1.class_emb(fx1["labels"]))
        probe = fx1["decoder_probe"]
        v = model1.diffdecoder.net(probe["x"], probe["c"], probe["t"])
    torch.testing.assert_close(cond, fx1["conditions"], atol=1e-4, rtol=0)
    torch.testing.assert_close(v, probe["v"], atol=1e-4, rtol=0)


def test_parity_1step_samples(fx1, model1):
    assert len(fx1["samples"]) >= 2
    for cfg, expected in fx1["samples"].items():
        out = model1.samples(fx1["labels"], fx1["num_sampling_steps"], cfg=cfg, scale_0=fx1["scale_0"],
                             scale_1=fx1["scale_1"], noise=fx1["noise"])
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_parity_mrar_samples():
    fx = load_fixture("parity_mrar_256.pt")
    model = fixture_model(fx, mrar=True)
    out = model.samples(fx["labels"], fx["num_sampling_steps"], cfg=fx["cfg"], scale_0=fx["scale_0"],
                        scale_1=fx["scale_1"], noise=fx["noise"])
    torch.testing.assert_close(out, fx["samples"], atol=1e-4, rtol=0)


def test_patchify_roundtrip():
    x = torch.randn(2, 16, 8, 8)
    for p in (1, 2, 4):
        tokens = patchify(x, p)
        assert tokens.shape == (2, (8 // p) ** 2, 16 * p * p)
        torch.testing.assert_close(unpatchify(tokens, p, 16), x)
    # channels outermost inside a token, as the released z_proj expects
    assert torch.equal(patchify(x, 2)[0, 0, :4], x[0, 0, :2, :2].flatten())


def tiny(**kw):
    torch.manual_seed(0)
    return build_model("transdiff_tiny", class_num=10, **kw)


@pytest.mark.parametrize("kw,tokens,conds", [
    ({"img_size": 32}, 4, 4),                     # 2x2 latent grid
    ({"img_size": 64, "patch_size": 2}, 4, 4),    # patches of the latent grid
    ({"img_size": 512}, 1024, 256),               # released 512 layout: 1024 latent tokens, 256 conditions
    ({"img_size": 64, "mrar": True}, 16, 16),     # MRAR: 4 references of 2x2 tokens
    ({"img_size": 32, "vae_stride": 4, "vae_embed_dim": 8}, 64, 64),  # another tokenizer geometry
])
def test_any_resolution_trains_and_samples(kw, tokens, conds):
    model = tiny(**kw)
    assert model.seq_len == tokens and model.num_conditions == conds
    c, g = model.vae_embed_dim, model.grid
    labels = torch.tensor([1, 7])
    latents = torch.randn(2, 4, c, g, g) if model.mrar else torch.randn(2, c, g, g)
    loss = model(latents, labels)
    loss.backward()
    assert torch.isfinite(loss)
    out = model.samples(labels, num_sampling_steps=3, cfg=1.5)
    assert out.shape == (2, c, g, g) and torch.isfinite(out).all()


def test_training_reduces_loss_on_a_fixed_batch():
    model = tiny(img_size=32, label_drop_prob=0.0, attn_dropout=0.0, proj_dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    latents, labels = torch.randn(8, 16, 2, 2), torch.arange(8)
    torch.manual_seed(1)
    losses = []
    for _ in range(40):
        loss = model(latents, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5


def _loss_and_grads(model, latents, labels):
    torch.manual_seed(3)  # the same label drops, noise and times on both paths
    model.zero_grad()
    loss = model(latents, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_one_encoder_pass_per_class_equals_one_per_row():
    """1-Step without dropout encodes each class (and the fake latent) once when the batch has more rows than
    keys; loss, every gradient and the samples are those of the row-by-row encoder."""
    model = build_model("transdiff_tiny", img_size=32, class_num=3, attn_dropout=0.0, proj_dropout=0.0,
                        label_drop_prob=0.3)
    latents, labels = torch.randn(12, 16, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 2, 2, 0, 1, 1, 0])
    calls = []
    hook = model.encoder_blocks[0].register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    per_key = _loss_and_grads(model, latents, labels)
    kw = dict(num_sampling_steps=3, cfg=2.0, noise=torch.randn(12, 4, 16), scale_1=0.0)
    samples = model.samples(labels, **kw)
    assert calls == [4, 4]  # 3 classes + the fake latent, in training and for the guided batch of 24
    model.encoder_dropout = True  # the row-by-row path (the dropout probabilities stay 0)
    per_row = _loss_and_grads(model, latents, labels)
    assert calls[2] == 12
    torch.testing.assert_close(per_key[0], per_row[0], rtol=0, atol=1e-6)
    assert per_key[1].keys() == per_row[1].keys() and "class_emb.weight" in per_key[1]
    for name, grad in per_key[1].items():
        torch.testing.assert_close(grad, per_row[1][name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(samples, model.samples(labels, **kw), rtol=0, atol=1e-5)
    hook.remove()


def test_encoder_with_dropout_encodes_every_row():
    model = build_model("transdiff_tiny", img_size=32, class_num=3)  # released dropout 0.1
    calls = []
    model.encoder_blocks[0].register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    model(torch.randn(8, 16, 2, 2), torch.zeros(8, dtype=torch.long)).backward()
    model.samples(torch.zeros(8, dtype=torch.long), num_sampling_steps=2, cfg=1.0)
    assert calls == [8, 4]  # training draws dropout per row; sampling (eval) needs one pass per key


def test_seeded_sampling_is_reproducible_and_batch_invariant():
    model = tiny(img_size=32)
    labels = torch.tensor([0, 3, 5])
    kw = dict(num_sampling_steps=4, cfg=1.3, scale_0=0.9, scale_1=0.9)
    a = model.samples(labels, generator=torch.Generator().manual_seed(7), **kw)
    b = model.samples(labels, generator=torch.Generator().manual_seed(7), **kw)
    c = model.samples(labels, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # one generator per sample: a sample does not depend on its batch
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    full = model.samples(labels, generator=gens([1, 2, 3]), **kw)
    alone = model.samples(labels[1:2], generator=gens([2]), **kw)
    torch.testing.assert_close(full[1:2], alone, atol=1e-5, rtol=0)


def test_fp32_stays_fp32_and_bf16_autocast_runs():
    model = tiny(img_size=32)
    labels = torch.tensor([2, 4])
    noise = torch.randn(2, model.seq_len, model.token_embed_dim)
    ref = model.samples(labels, num_sampling_steps=4, cfg=1.5, scale_1=0.0, noise=noise)
    assert ref.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.samples(labels, num_sampling_steps=4, cfg=1.5, scale_1=0.0, noise=noise)
        loss = model(torch.randn(2, 16, 2, 2), labels)
    loss.backward()
    assert out.dtype == torch.float32 and torch.isfinite(loss)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_ode_samplers_are_deterministic():
    model = tiny(img_size=32)
    labels = torch.tensor([1, 2])
    noise = torch.randn(2, model.seq_len, model.token_embed_dim)
    for sampler in ("euler", "heun"):
        a = model.samples(labels, 5, cfg=1.5, sampler=sampler, noise=noise)
        b = model.samples(labels, 5, cfg=1.5, sampler=sampler, noise=noise)
        assert torch.equal(a, b) and torch.isfinite(a).all()


def test_mrar_cfg_must_be_one_or_four():
    model = tiny(img_size=64, mrar=True)
    labels = torch.tensor([1])
    assert model.samples(labels, 2, cfg=[1.0, 1.2, 1.5, 1.5]).shape == (1, 16, 4, 4)
    with pytest.raises(ValueError, match="list of 4"):
        model.samples(labels, 2, cfg=[1.0, 1.5])


def test_bad_inputs_get_clear_errors():
    model = tiny(img_size=32)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        model.samples(torch.tensor([3, 10]), 2)
    with pytest.raises(ValueError, match=r"labels must lie"):
        model(torch.randn(1, 16, 2, 2), torch.tensor([-1]))
    with pytest.raises(ValueError, match="training latents of shape"):
        model(torch.randn(2, 16, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        model.samples(torch.tensor([0]), 2, sampler="ddim")
    with pytest.raises(ValueError, match="noise must have shape"):
        model.samples(torch.tensor([0]), 2, noise=torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="scale_0/scale_1 apply to the 'maruyama' sampler only"):
        model.samples(torch.tensor([0]), 2, sampler="euler", scale_0=0.9)
    with pytest.raises(ValueError, match="not a multiple of the tokenizer stride"):
        build_model("transdiff_tiny", img_size=40)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("transdiff_giant")


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_public_factories_build_the_released_sizes(name):
    with torch.device("meta"):
        model = getattr(transdiff, name)()
        wide = getattr(transdiff, name)(img_size=512)  # keyword arguments reach the model
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == PARAMS_M[name]
    assert wide.img_size == 512 and wide.seq_len == 4 * model.seq_len


def test_eval_mode_restored_after_sampling():
    model = tiny(img_size=32).train()
    model.samples(torch.tensor([0]), 2)
    assert model.training


# ------------------------------------------------------------------ plain path vs models/fused.py, block by block
def _perturbed(*modules):
    """Fresh LayerNorms are all alike (weight 1, bias 0): perturb every parameter so that a swapped norm shows."""
    with torch.no_grad():
        for p in (p for m in modules for p in m.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    return modules


def _plain_and_fused(module, *inputs):
    """module(*inputs) through its plain `forward` (autograd on) and through its inference path (eval, no
    autograd), each on its own copy of the inputs (the inference path works in place)."""
    module.eval()
    plain = module(*[x.clone() if torch.is_tensor(x) else x for x in inputs]).detach()
    with torch.no_grad():
        return plain, module(*[x.clone() if torch.is_tensor(x) else x for x in inputs])


@pytest.mark.parametrize("masked", [False, True])
def test_encoder_block_paths_agree(masked):
    from models.blocks import EncoderBlock
    from models.transdiff import block_causal_mask

    torch.manual_seed(0)
    (blk,) = _perturbed(EncoderBlock(32, 4, proj_drop=0.1, attn_drop=0.1))
    x = torch.randn(2, 12, 32, requires_grad=True)
    mask = block_causal_mask([4, 4, 4]) if masked else None
    plain, fast = _plain_and_fused(blk, x, mask)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    assert fast.abs().mean() > 0.1  # not a trivial zero


@pytest.mark.parametrize("shared_t", [False, True])
def test_decoder_block_and_final_layer_paths_agree(shared_t):
    """Per-sample time (training-like) and one time for the batch (sampling: modulation folded into the norms);
    two latent sequences per condition sequence (diffusion_batch_mul)."""
    from models import fused
    from models.blocks import DecoderBlock, FinalLayer

    torch.manual_seed(0)
    blk, final = _perturbed(DecoderBlock(32, 4, proj_drop=0.1, attn_drop=0.1), FinalLayer(32, 8))
    x, c = torch.randn(4, 10, 32, requires_grad=True), torch.randn(2, 6, 32)
    t6, temb = torch.randn(1 if shared_t else 4, 6, 32), torch.randn(1 if shared_t else 4, 32)
    blk.eval(), final.eval()
    plain = final(blk(x, t6, blk.attn2.kv(c)), temb).detach()
    with torch.no_grad():
        kv = fused.cross_attention_kv(blk.attn2, c)
        fast = fused.final_layer(final, fused.decoder_block_(blk, x.clone(), t6, kv), temb)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    assert fast.abs().mean() > 0.1


def test_decoder_net_paths_agree_on_conditions_and_velocity():
    from models.diffdecoder import DecoderNet

    torch.manual_seed(0)
    net = DecoderNet(token_dim=8, cond_dim=16, width=32, depth=2, num_heads=4, seq_len=10).eval()
    _perturbed(net)  # also the zero-initialised output layer, which would make every velocity 0
    x, c, t = torch.randn(2, 10, 8), torch.randn(2, 6, 16), torch.tensor([300.0, 700.0])
    plain_kv = [tuple(a.detach() for a in kv) for kv in net.condition_kv(c.requires_grad_())]
    plain = net(x, None, t, cond_kv=net.condition_kv(c)).detach()
    with torch.no_grad():
        fast_kv = net.condition_kv(c)
        fast = net(x, None, t, cond_kv=fast_kv)
    for a, b in zip(plain_kv, fast_kv):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    assert fast.abs().mean() > 0.01
