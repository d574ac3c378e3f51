"""main.py in one CPU process: the published flags, refusals, schedule and optimizer grouping, gradient
accumulation, exact resume, fine-tuning starts, online evaluation."""
import argparse
import json
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port, read_losses, write_image_folder, write_vae_checkpoint

import engine_transdiff as engine
import main
from models.transdiff import build_model
from tools.build_mrar_index import main as build_index
from util.data import MRAR_INDEX_NAME
from util.distributed import DistInfo
from util.lr_sched import lr_at
from util.optim import EMA, build_adamw, param_groups


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_image_folder(root / "imagenet")
    build_index(["--data_path", str(data), "--output", str(data / MRAR_INDEX_NAME)])
    return SimpleNamespace(root=root, data=data, vae=write_vae_checkpoint(root / "kl16.ckpt"))


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def tiny(env, out, *extra, img_size=32):
    return ["--img_size", str(img_size), "--vae_path", str(env.vae), "--model", "transdiff_tiny", "--class_num", "10",
            "--diffusion_batch_mul", "2", "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "2",
            "--num_workers", "0", "--log_freq", "1", "--data_path", str(env.data), "--output_dir", str(out), *extra]


def parse(argv):
    parser = main.get_args_parser()
    return main.check_args(parser, parser.parse_args(argv))


def refusal(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------ flags
def test_published_commands_parse(env, tmp_path):
    start, cache = tmp_path / "l_1step", tmp_path / "cache"
    start.mkdir()
    (start / "checkpoint-last.pth").touch()  # only looked at when the run starts
    cache.mkdir()
    base = ["--img_size", "256", "--vae_path", str(env.vae), "--vae_embed_dim", "16", "--patch_size", "1",
            "--model", "transdiff_large", "--diffloss_w", "1024"]
    out = ["--output_dir", str(tmp_path / "out"), "--data_path", str(env.data)]
    one_step = base + ["--diffusion_batch_mul", "4", "--epochs", "800", "--warmup_epochs", "100", "--blr", "1.0e-4",
                       "--batch_size", "32", "--resume", str(tmp_path / "out")] + out
    refs = ["--fid_stats", str(env.vae), "--fid_weights", str(env.vae)]  # only their existence is checked here
    args = parse(one_step + ["--online_eval", "--use_cached", "--cached_path", str(cache), "--bf16",
                             "--gradient_accumulation_steps", "2"] + refs)
    assert args.lr == pytest.approx(1e-4 * 32 * 2 / 256) and args.use_cached and args.bf16
    mrar = parse(base + ["--mrar", "--bf16", "--diffusion_batch_mul", "2", "--epochs", "40", "--warmup_epochs", "10",
                         "--lr", "5.0e-5", "--batch_size", "16", "--gradient_accumulation_steps", "2",
                         "--resume", str(start)] + out)
    assert mrar.mrar and mrar.lr == 5e-5 and mrar.mrar_index.endswith(MRAR_INDEX_NAME)
    hi = parse(["--img_size", "512"] + base[2:] + ["--ema_rate", "0.999", "--bf16", "--diffusion_batch_mul", "4",
                                                   "--epochs", "150", "--warmup_epochs", "10", "--lr", "1.0e-4",
                                                   "--batch_size", "16", "--gradient_accumulation_steps", "2",
                                                   "--only_train_diff", "--resume", str(start)] + out)
    assert hi.only_train_diff and hi.ema_rate == 0.999 and hi.img_size == 512
    with torch.device("meta"):  # --diffloss_w is the decoder width
        model = build_model(hi.model, **engine.model_kwargs(parse(one_step + ["--diffloss_w", "512"])))
    assert model.diffdecoder.net.input_proj.out_features == 512 and model.class_emb.embedding_dim == 1024


@pytest.mark.parametrize("extra, reason", [
    (["--lr", "1e-4", "--blr", "1e-4"], "not both"),
    (["--cfg", "1,2,3,4"], "needs --mrar"),
    (["--cfg", "1,2"], "one number or 4"),
    (["--use_cached"], "needs --cached_path"),
    (["--cached_path", "somewhere"], "only read with --use_cached"),
    (["--resume", "/no/such/run"], "does not exist"),
    (["--resume", "{empty}"], "holds no checkpoint"),
    (["--resume", "{empty}", "--load_step", "7"], "no checkpoint-7.pth"),
    (["--load_step", "7"], "give --resume"),
    (["--only_train_diff"], "frozen encoder"),
    (["--img_size", "40"], "cannot be built"),
    (["--min_lr", "1e-6"], "--lr_schedule cosine or a --lr_cooldown"),
    (["--lr_cooldown", "1.5"], "must lie in [0, 1]"),
    (["--lr_cooldown", "0.2", "--lr_schedule", "cosine"], "applies to --lr_schedule constant"),
    (["--mrar", "--mrar_index", "/no/index"], "MRAR index"),
    (["--vae_path", "/no/vae.ckpt"], "is not a file"),
    (["--online_eval", "--fid_stats", "/no/stats.npz"], "evaluation cannot run"),
    (["--online_eval", "--skip_metrics", "--num_images", "15"], "multiple of --class_num"),
    (["--num_iter", "64"], "unrecognized"),
    (["--temperature", "1.0"], "unrecognized"),
    (["--cfg_schedule", "linear"], "unrecognized"),
])
def test_unworkable_flags_are_refused(env, tmp_path, capsys, extra, reason):
    (tmp_path / "empty").mkdir()
    extra = [e.replace("{empty}", str(tmp_path / "empty")) for e in extra]
    assert reason in refusal(tiny(env, tmp_path / "out", *extra), capsys)


def test_missing_or_truncated_checkpoint_is_an_error(env, tmp_path, capsys):
    bad = tmp_path / "checkpoint-last.pth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit) as e:
        main.cli(tiny(env, tmp_path / "out", "--resume", str(bad)))
    assert e.value.code == 1 and "cannot read checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing trained


# ------------------------------------------------------------------ schedule and optimizer
def test_lr_schedule():
    args = SimpleNamespace(lr=1.0, warmup_epochs=10, epochs=110, lr_schedule="constant", min_lr=None)
    assert [lr_at(e, args) for e in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    args.lr_schedule, args.min_lr = "cosine", 0.1
    assert lr_at(60, args) == pytest.approx(0.55) and lr_at(110, args) == pytest.approx(0.1)
    # warmup-stable-decay: constant until the last 20% of the 110 planned epochs, then linear to --min_lr
    args.lr_schedule, args.lr_cooldown, args.min_lr = "constant", 0.2, None
    assert [lr_at(e, args) for e in (5, 88, 99, 110)] == pytest.approx([0.5, 1.0, 0.5, 0.0])
    args.min_lr = 0.1
    assert lr_at(99, args) == pytest.approx(0.55) and lr_at(110, args) == pytest.approx(0.1)


def test_cooldown_follows_the_plan_and_a_longer_plan_is_told(env, tmp_path):
    out = tmp_path / "run"
    main.cli(tiny(env, out, "--lr", "1e-3", "--lr_cooldown", "0.5", "--warmup_epochs", "0"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_epoch = len(rows) // 2  # steps per epoch: the rate holds for epoch 1, then falls to 0 over epoch 2
    assert {r["lr"] for r in rows[:per_epoch]} == {1e-3}
    assert [r["lr"] for r in rows[per_epoch:]] == sorted((r["lr"] for r in rows[per_epoch:]), reverse=True)
    assert rows[-1]["lr"] == pytest.approx(1e-3 / per_epoch)
    main.cli(tiny(env, out, "--lr", "1e-3", "--lr_cooldown", "0.5", "--warmup_epochs", "0", "--epochs", "3"))
    assert "its learning rate now follows --epochs 3 with --lr_cooldown 0.5" in (out / "log.txt").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the new plan cools down over its last 1.5 epochs: the third epoch starts 1 epoch from the end
    assert len(rows) == 3 * per_epoch and rows[2 * per_epoch]["lr"] == pytest.approx(1e-3 / 1.5)


def test_released_adamw_grouping_and_frozen_parts():
    model = build_model("transdiff_tiny", img_size=32, class_num=10)
    excluded = engine.set_trainable(model, SimpleNamespace(only_train_diff=False, label_drop_prob=0.1))
    no_decay, decay = param_groups(model, 0.02, excluded)
    names = {id(p): n for n, p in model.named_parameters()}
    assert not excluded and not model.z_proj.weight.requires_grad  # unused in 1-Step, kept in the groups
    assert all(names[id(p)].startswith("diffdecoder.") or p.ndim <= 1 or names[id(p)].endswith(".bias")
               for p in no_decay["params"])
    assert {names[id(p)] for p in decay["params"]} >= {"z_proj.weight", "encoder_blocks.0.attn.qkv.weight"}
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    model = build_model("transdiff_tiny", img_size=32, class_num=10)
    excluded = engine.set_trainable(model, SimpleNamespace(only_train_diff=True, label_drop_prob=0.1))
    opt = build_adamw(model, 1e-4, 0.02, excluded)
    trained = [p for g in opt.param_groups for p in g["params"]]
    assert len(trained) == sum(1 for n, _ in model.named_parameters() if n.startswith("diffdecoder."))
    assert not model.class_emb.weight.requires_grad and not model.fake_latent.requires_grad


def test_ema_swap_restores_the_weights():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, 0.5)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    with ema.swapped_in(model):
        assert torch.allclose(model.weight, before + 0.5)
    assert torch.allclose(model.weight, before + 1.0)


# ------------------------------------------------------------------ gradient accumulation
class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)

    def forward(self, latents, labels):
        return ((self.out(torch.tanh(self.hidden(latents))).squeeze(-1) - labels.float()) ** 2).mean()


def toy_batches(steps=3, size=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 4, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(steps)]


def toy_train(batches, accum, model=None, ddp=None, world=1, rank=0):
    model = model or Toy()
    args = SimpleNamespace(gradient_accumulation_steps=accum, grad_clip=0.5)
    run = engine.Run(args=args, dist=DistInfo(rank, world), model=ddp or model, raw=model, ema=EMA(model, 0.9),
                     optimizer=build_adamw(model, 1e-2, 0.02), scaler=torch.amp.GradScaler("cpu", enabled=False))
    for x, y in batches:
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        run.train_step_loss = engine.train_step(run, zip(x.chunk(accum), y.chunk(accum)))
    return model, run.ema


def ddp_accumulation_worker(rank, world, port, path):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    model = Toy()
    model, _ = toy_train(toy_batches(), accum=2, model=model, ddp=torch.nn.parallel.DistributedDataParallel(model),
                         world=world, rank=rank)
    torch.save(model.state_dict(), f"{path}.{rank}")
    torch.distributed.destroy_process_group()


def test_accumulation_equals_one_large_batch(tmp_path):
    big, big_ema = toy_train(toy_batches(), accum=1)
    small, small_ema = toy_train(toy_batches(), accum=4)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for a, b in zip(big_ema.shadow, small_ema.shadow):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # two DDP ranks x 2 micro-batches of 2: gradients are synced on the last micro-step only
    mp.spawn(ddp_accumulation_worker, args=(2, free_port(), str(tmp_path / "w")), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"w.{rank}")
        for k, v in big.state_dict().items():
            torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ resume
def test_interrupted_run_resumes_with_the_same_losses(env, tmp_path):
    flags = ["--gradient_accumulation_steps", "2", "--num_workers", "2"]
    main.cli(tiny(env, tmp_path / "full", *flags))
    split = tmp_path / "split"
    main.cli(tiny(env, split, *flags, "--resume", str(split), "--max_train_steps", "4"))
    mid = torch.load(split / "checkpoint-last.pth", weights_only=False)
    assert mid["train_state"]["samples_in_epoch"] == 4 and mid["epoch"] == 0  # stopped inside epoch 1
    main.cli(tiny(env, split, *flags, "--resume", str(split)))
    a, b = read_losses(tmp_path / "full"), read_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])
    full, resumed = (torch.load(d / "checkpoint-last.pth", weights_only=False) for d in (tmp_path / "full", split))
    for key in ("model", "model_ema"):
        for k, v in full[key].items():
            torch.testing.assert_close(resumed[key][k], v, atol=1e-6, rtol=0)
    assert {"model", "model_ema", "optimizer", "epoch", "args", "scaler"} <= set(resumed)
    assert (split / "checkpoint-2.pth").exists() and list(split.glob("events.out.tfevents*"))
    assert json.loads((split / "args.json").read_text())["model"] == "transdiff_tiny"
    log = (split / "log.txt").read_text()
    assert "resumed from" in log and "1 unreadable files skipped" in log
    assert not list(split.glob(".*tmp"))


# ------------------------------------------------------------------ fine-tuning starts
def released_1step(path, img_size=32):
    """A 1-Step checkpoint in the released layout whose EMA differs from its raw weights."""
    model = build_model("transdiff_tiny", img_size=img_size, class_num=10)
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}
    path.mkdir()
    torch.save({"model": model.state_dict(), "model_ema": ema, "optimizer": {}, "epoch": 799,
                "args": argparse.Namespace(model="transdiff_tiny")}, path / "checkpoint-last.pth")
    return ema


def test_mrar_starts_from_a_1step_checkpoint_then_continues_its_own(env, tmp_path, monkeypatch, capsys):
    ema = released_1step(tmp_path / "l_1step", img_size=64)  # 4x4 latents: a mask block of 4 tokens
    out = tmp_path / "mrar"
    argv = tiny(env, out, "--mrar", "--bf16", "--batch_size", "1", "--resume", str(tmp_path / "l_1step"),
                img_size=64)
    main.cli(argv + ["--max_train_steps", "1"])
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=False)
    assert ckpt["epoch"] == -1 and ckpt["train_state"]["step"] == 1
    torch.testing.assert_close(ckpt["model"]["class_emb.weight"], ema["class_emb.weight"])  # lr is 0 at step 0
    torch.testing.assert_close(ckpt["model"]["mask_token"], ema["mask_token"].expand(1, 4, 64))
    log = (out / "log.txt").read_text()
    assert "fine-tuning start from the EMA weights" in log and "mask_token broadcast" in log
    main.cli(argv + ["--max_train_steps", "2"])  # the same command again continues this run
    assert torch.load(out / "checkpoint-last.pth", weights_only=False)["train_state"]["step"] == 2
    assert "continuing this run" in (out / "log.txt").read_text()
    # --evaluate reads the mode off the checkpoint (the published MRAR evaluation omits --mrar)
    seen = fake_evaluation(monkeypatch)
    main.cli(tiny(env, tmp_path / "eval", "--evaluate", "--skip_metrics", "--resume", str(out),
                  "--cfg", "1.3,1.3,1.3,1.3", img_size=64))
    assert seen[0]["mrar"] and seen[0]["weights"]["mask_token"].shape == (1, 4, 64)
    header = (tmp_path / "eval" / "log.txt").read_text()
    assert "global batch" not in header and "evaluation batch 64 per process" in header
    assert f"{torch.get_num_threads()} threads per process" in header and "holds an MRAR model" in header


def test_higher_resolution_start_with_frozen_encoder(env, tmp_path):
    ema = released_1step(tmp_path / "l_1step")
    out = tmp_path / "hi"
    main.cli(tiny(env, out, "--img_size", "64", "--only_train_diff", "--batch_size", "1", "--warmup_epochs", "0",
                  "--lr", "1e-3", "--max_train_steps", "1", "--resume", str(tmp_path / "l_1step")))
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=False)
    sd = ckpt["model"]
    assert sd["diffdecoder.net.diffusion_pos_embed_learned"].shape == (1, 16, 64)
    for k in ("class_emb.weight", "encoder_blocks.0.attn.qkv.weight", "diffusion_pos_embed_learned"):
        torch.testing.assert_close(sd[k], ema[k])  # the encoder is frozen
    assert not torch.allclose(sd["diffdecoder.net.input_proj.weight"], ema["diffdecoder.net.input_proj.weight"])
    n_decoder = sum(1 for k in sd if k.startswith("diffdecoder."))
    assert sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"]) == n_decoder
    assert "resized bicubically" in (out / "log.txt").read_text()


# ------------------------------------------------------------------ evaluation hook
def fake_evaluation(monkeypatch):
    seen = []

    def run_evaluation(model, tokenizer, args, epoch=None, log_writer=None, sampling=None):
        seen.append({"epoch": epoch, "mrar": model.mrar, "scale": tokenizer.scale_factor,
                     "weights": {k: v.clone() for k, v in model.state_dict().items()}})
        return {"fid": 1.0}
    monkeypatch.setitem(sys.modules, "engine_eval", types.SimpleNamespace(run_evaluation=run_evaluation))
    return seen


def test_online_eval_uses_the_ema_weights(env, tmp_path, monkeypatch):
    seen = fake_evaluation(monkeypatch)
    out = tmp_path / "run"
    main.cli(tiny(env, out, "--online_eval", "--skip_metrics", "--eval_freq", "1", "--epochs", "1", "--batch_size", "4",
                  "--warmup_epochs", "0", "--lr", "1e-3", "--ema_rate", "0.5"))
    ckpt = torch.load(out / "checkpoint-1.pth", weights_only=False)
    assert [s["epoch"] for s in seen] == [1] and seen[0]["scale"] == 0.2325
    for k, v in ckpt["model_ema"].items():
        torch.testing.assert_close(seen[0]["weights"][k], v)
    assert not torch.allclose(ckpt["model"]["class_emb.weight"], ckpt["model_ema"]["class_emb.weight"])
    assert "epoch 1 evaluation: FID 1.0" in (out / "log.txt").read_text()


def test_online_eval_with_the_evaluation_module(env, tmp_path):
    out = tmp_path / "run"
    main.cli(tiny(env, out, "--online_eval", "--skip_metrics", "--eval_freq", "1", "--epochs", "1", "--batch_size",
                  "4", "--num_images", "10", "--eval_bsz", "5", "--num_sampling_steps", "2"))
    assert len(list((out / "eval").glob("*ep1/*.png"))) == 10
    assert (out / "eval_results.jsonl").exists()
