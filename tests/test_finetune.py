"""Tests of finetune.py (MAE's end-to-end fine-tuning): layer-wise lr decay and weight-decay groups,
the head's init, mixup / cutmix targets, the evaluation counts, and a resume that equals an uninterrupted run."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import eval_utils
import train_utils
import cli
import finetune as ft
from conftest import ROOT, assert_equivalent_runs, subprocess_env

SIZE, N_TRAIN = 32, 48  # micro ViT at 32 px: 4 x 4 patches; --data synthetic with 48 train / 12 val images


def random_encoder_checkpoint(path):
    torch.manual_seed(0)
    vit = common.build_vit("micro", img_size=SIZE)
    train_utils.save_checkpoint(path, train_utils.encoder_export(vit, "random-init"))
    return path


def finetune_argv(ckpt, out, *flags):
    return ["--ckpt", str(ckpt), "--data", "synthetic", "--synthetic-size", str(N_TRAIN),
            "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "4", "--accum", "2", "--num-workers", "0",
            "--log-every", "1", "--device", "cpu", "--lr", "2e-3", "--output-dir", str(out),
            "--output", str(out / "probe.jsonl"), *flags]


def finetune(ckpt, out, *flags):
    return ft.main(ft.build_parser().parse_args(finetune_argv(ckpt, out, *flags)))


# ------------------------------------------------------------------------------------- layer-wise lr decay (MAE)
def test_layer_decay_of_a_depth_12_encoder_matches_hand_computation():
    scales = ft.layer_lr_scales(12, 0.65)
    assert len(scales) == 14 and scales[-1] == 1.0 and scales[-2] == pytest.approx(0.65)
    assert scales[0] == pytest.approx(0.003697205891) and scales[1] == pytest.approx(0.005688009063)  # 0.65^13, ^12
    vit = common.ViT(img_size=SIZE, patch_size=8, embed_dim=64, depth=12, num_heads=4)
    model = ft.FinetuneClassifier(vit, 10)
    groups = ft.finetune_param_groups(model, weight_decay=0.05, layer_decay=0.65)
    of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    expected = {  # hand-assigned layer ids: embeddings 0, blocks.i i + 1, what follows the blocks 13
        "vit.patch_embed.proj.weight": (0.65 ** 13, 0.05), "vit.patch_embed.proj.bias": (0.65 ** 13, 0.0),
        "vit.cls_token": (0.65 ** 13, 0.0), "vit.pos_embed": (0.65 ** 13, 0.0),  # timm's no_weight_decay set
        "fc_norm.weight": (1.0, 0.0), "fc_norm.bias": (1.0, 0.0), "head.weight": (1.0, 0.05), "head.bias": (1.0, 0.0)}
    for i in range(12):
        for part, wd in (("norm1.weight", 0.0), ("attn.qkv.weight", 0.05), ("attn.qkv.bias", 0.0),
                         ("attn.proj.weight", 0.05), ("norm2.bias", 0.0), ("mlp.fc1.weight", 0.05),
                         ("mlp.fc2.bias", 0.0)):
            expected[f"vit.blocks.{i}.{part}"] = (0.65 ** (12 - i), wd)
    for name, (scale, wd) in expected.items():
        assert of[id(names[name])] == (pytest.approx(scale, rel=1e-12), wd), name
    # global pool: the encoder's final norm is not used and not trained; every other parameter is in one group
    assert id(names["vit.norm.weight"]) not in of and not names["vit.norm.weight"].requires_grad
    assert len(of) == sum(p.requires_grad for p in model.parameters()) == len(names) - 2
    assert len(groups) == 2 * 14  # (decay, no decay) per layer id
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    ft.set_layer_lr(optimizer, 2e-3)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx(sorted({2e-3 * s for s in scales}))
    # --pool cls: the final norm is the cls token's norm, trained at the head's scale without weight decay
    cls_model = ft.FinetuneClassifier(common.ViT(img_size=SIZE, patch_size=8, embed_dim=64, depth=12, num_heads=4),
                                      10, pool="cls")
    cls_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in ft.finetune_param_groups(cls_model, 0.05, 0.65)
              for p in g["params"]}
    assert cls_of[id(cls_model.vit.norm.weight)] == (1.0, 0.0) and not hasattr(cls_model, "fc_norm")


def test_head_init_drop_path_and_trained_positions():
    vit = common.build_vit("micro", img_size=SIZE)
    sincos = vit.pos_embed.clone()
    torch.manual_seed(0)
    model = ft.FinetuneClassifier(vit, 1000, drop_path=0.3)
    w = model.head.weight  # [1000, 64]: 64 000 draws
    assert w.std().item() == pytest.approx(2e-5, rel=0.02) and abs(w.mean().item()) < 2e-7
    assert w.abs().max().item() < 6 * 2e-5 and (model.head.bias == 0).all()
    assert (model.fc_norm.weight == 1).all() and (model.fc_norm.bias == 0).all()
    assert [b.drop_path for b in model.vit.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert isinstance(model.vit.pos_embed, torch.nn.Parameter) and torch.equal(model.vit.pos_embed, sincos)
    assert "pos_embed" in model.vit.state_dict()  # the exported encoder keeps the key load_vit reads
    imgs = torch.randn(2, 3, SIZE, SIZE)
    model.eval()
    with torch.no_grad():  # global pool: fc_norm of the mean of the patch tokens before the final norm
        x = model.vit.forward_blocks(model.vit.embed(imgs))
        assert torch.allclose(model.logits(imgs), model.head(model.fc_norm(x[:, 1:].mean(1))))
    model.train()
    with pytest.raises(ValueError, match="rng"):  # stochastic depth must draw from the step's StepRandom
        model.logits(imgs)


# ------------------------------------------------------------------------------------------------ mixup / cutmix
def constant_batch(b=6):
    """Image i is filled with the value i, so a mixed image tells which images went into it and in what share."""
    return torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 20, 20).clone(), torch.arange(b)


def mixed(mix, seed):
    """(images, mixed images, targets) of the constant batch; every target row sums to 1."""
    imgs, labels = constant_batch()
    out, t = mix(imgs.clone(), labels, seed)
    assert t.shape == (6, mix.num_classes) and torch.allclose(t.sum(1), torch.ones(6))
    return imgs, out, t


def partner_share(out, i):
    """(partner j, its share of image i's pixels) for a CutMix output."""
    others = out[i][out[i] != i]
    if len(others) == 0:
        return None, 0.0
    return int(others[0]), len(others) / out[i].numel()


def test_cutmix_label_weight_is_the_pasted_area():
    eps, classes = 0.1, 8
    mix, pasted = ft.BatchMix(classes, mixup=0.0, cutmix=1.0, smoothing=eps), []
    for seed in range(20):
        _, out, t = mixed(mix, seed)
        shares = set()
        for i in range(6):
            j, share = partner_share(out, i)
            shares.add(round(share, 9))
            assert t[i, i].item() == pytest.approx((1 - eps) * (1 - share) + eps / classes, abs=1e-6)
            if j is not None:
                assert t[i, j].item() == pytest.approx((1 - eps) * share + eps / classes, abs=1e-6)
                assert ((out[i] == i) | (out[i] == j)).all()  # a box of one other image, nothing blended
            assert ((t[i] - eps / classes).abs() < 1e-7).sum() == classes - 1 - (j is not None)  # the rest: eps / C
        assert len(shares) == 1  # one box for the whole batch
        pasted.append(shares.pop())
    assert min(pasted) < 0.2 and max(pasted) > 0.5  # lambda ~ Beta(1, 1): boxes of many sizes


def test_mixup_label_weights_are_the_blend_weights():
    eps, classes = 0.1, 8
    mix, lams = ft.BatchMix(classes, mixup=0.8, cutmix=0.0, smoothing=eps), []
    for seed in range(20):
        imgs, out, t = mixed(mix, seed)
        w = (t - eps / classes) / (1 - eps)  # the mixing weights behind the smoothed targets
        lam = w[0, 0].item()
        for i in range(6):
            assert w[i, i].item() == pytest.approx(lam, abs=1e-6)  # one lambda for the batch
            (j,) = [c for c in range(8) if c != i and w[i, c] > 1e-6]  # the partner's label, weight 1 - lambda
            assert w[i, j].item() == pytest.approx(1 - lam, abs=1e-6)
            assert torch.allclose(out[i], lam * imgs[i] + (1 - lam) * imgs[j], atol=1e-5)  # its image, same share
        lams.append(lam)
    assert min(lams) < 0.3 and max(lams) > 0.7


def test_mix_is_seeded_and_leaves_the_global_generator_alone():
    mix = ft.BatchMix(8)  # MAE's defaults: mixup 0.8, cutmix 1.0, switch 0.5, smoothing 0.1
    torch.manual_seed(123)
    state = torch.get_rng_state()
    kinds = set()
    for seed in range(16):
        _, out, t = mixed(mix, seed)
        again = mixed(mix, seed)
        assert torch.equal(out, again[1]) and torch.equal(t, again[2])
        kinds.add("mixup" if len(out[0].unique()) == 1 and t[0, 0] < 0.9 else "cutmix")
    assert kinds == {"mixup", "cutmix"} and torch.equal(torch.get_rng_state(), state)
    # no mixing at all: smoothed one-hot targets
    imgs, labels = constant_batch()
    out, t = ft.BatchMix(8, mixup=0, cutmix=0, smoothing=0.1)(imgs.clone(), labels, 0)
    assert torch.equal(out, imgs) and torch.allclose(t, F.one_hot(labels, 8) * 0.9 + 0.1 / 8)


# ---------------------------------------------------------------------------------------------------- evaluation
class TableModel(torch.nn.Module):
    """logits = a fixed table row per image; image k is filled with the value k."""
    def __init__(self, table):
        super().__init__()
        self.table = table

    def logits(self, imgs):
        return self.table[imgs[:, 0, 0, 0].long()]


def test_evaluation_counts_match_a_hand_count():
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    table = torch.tensor([
        [5.0, 1, 0, 0, 0, 0, 0],  # label 0 first: top-1 and top-5
        [3.0, 2, 0, 0, 0, 0, 0],  # label 1 second: top-5 only
        [6.0, 5, 1, 4, 3, 2, 0],  # label 2 sixth: neither
        [0.0, 0, 0, 9, 0, 0, 0],  # label 3 first: both
        [5.0, 4, 3, 2, 1, 0, 0],  # label 4 fifth: top-5 only
        [0.0, 0, 0, 0, 0, 0, 0],  # all tied: classes in order, label 5 sixth: neither
    ])
    imgs = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 2, 2)
    loader = [(imgs[:4], labels[:4], torch.full((4,), -1)), (imgs[4:], labels[4:], torch.full((2,), -1))]
    result = ft.evaluate_classifier(TableModel(table), loader, train_utils.Dist("cpu"))
    top1, top5, loss = result["top1"], result["top5"], result["val_loss"]
    assert top1 == pytest.approx(100 * 2 / 6) and top5 == pytest.approx(100 * 4 / 6)
    hand = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(table.tolist(), labels.tolist())]
    assert loss == pytest.approx(sum(hand) / 6, rel=1e-6)


# -------------------------------------------------------------------------------------------------- the whole run
def test_resume_equals_an_uninterrupted_run(tmp_path):
    ckpt = random_encoder_checkpoint(tmp_path / "pretrain" / "checkpoint.pth")
    full = finetune(ckpt, tmp_path / "full")
    stopped = finetune(ckpt, tmp_path / "split", "--max-steps", "8")  # 6 steps per epoch: stops inside epoch 1
    assert stopped["epochs_done"] == 1 and (tmp_path / "split" / "probe.jsonl").read_text() == ""  # no result
    resumed = finetune(ckpt, tmp_path / "split")
    a, b = (train_utils.load_checkpoint(tmp_path / d / "checkpoint.pth") for d in ("full", "split"))
    assert a["step"] == b["step"] == 12 and a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert (resumed["top1"], resumed["top5"]) == (full["top1"], full["top5"])
    logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("full", "split")]
    assert [r["top1"] for r in logs[0]] == [r["top1"] for r in logs[1]] and len(logs[0]) == 2
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["val_loss"]) for r in logs[0])
    # the optimizer's groups keep their layer scales; the last lr is MAE's cosine end, min_lr x scale
    groups = a["optimizer"]["param_groups"]
    assert {round(g["lr_scale"], 12) for g in groups} == {round(s, 12) for s in ft.layer_lr_scales(4, 0.65)}
    lr_last = common.warmup_cosine(11 / 6, 2, 1, full["lr"], 0.0, 1e-6 / full["lr"])
    assert all(g["lr"] == pytest.approx(lr_last * g["lr_scale"]) for g in groups)
    # the best checkpoint, and the logged top-1 recounted by hand from the saved classifier on the val images
    best = train_utils.load_checkpoint(tmp_path / "full" / "checkpoint-best.pth")
    assert best["top1"] == max(r["top1"] for r in logs[0]) and best["method"] == "finetune"
    model = ft.FinetuneClassifier(eval_utils.load_vit(ckpt), 10)
    model.load_state_dict(a["model"])
    val = common.SeededDataset(common.build_dataset("synthetic", "val", size=SIZE, length=N_TRAIN),
                               common.image_transform(common.eval_transform(SIZE)))
    imgs, labels = torch.stack([val[i][0] for i in range(len(val))]), torch.tensor([val[i][1] for i in range(12)])
    with torch.no_grad():
        hits = (model.eval().logits(imgs).argmax(1) == labels).sum().item()
    assert full["top1"] == pytest.approx(100 * hits / 12)
    # the fine-tuned encoder loads like any other checkpoint's
    assert eval_utils.load_vit(tmp_path / "full" / "checkpoint.pth").config == eval_utils.load_vit(ckpt).config
    assert json.loads((tmp_path / "full" / "probe.jsonl").read_text())["mode"] == "finetune"


def test_public_vit_checkpoint_fine_tunes(tmp_path):
    # a public layout (timm / MAE fine-tuned: `model`, `module.` prefix, its own head and fc_norm, dropped on loading)
    torch.manual_seed(1)
    vit = common.build_vit("micro", img_size=SIZE)
    state = {f"module.{k}": v for k, v in vit.state_dict().items()}
    state.update({"module.head.weight": torch.ones(1000, 64), "module.fc_norm.weight": torch.ones(64)})
    torch.save({"model": state}, tmp_path / "public.pth")
    row = finetune(tmp_path / "public.pth", tmp_path / "ft", "--epochs", "1", "--max-steps", "2")
    ckpt = train_utils.load_checkpoint(tmp_path / "ft" / "checkpoint.pth")
    assert ckpt["step"] == 2 and row["num_classes"] == 10 and ckpt["model"]["head.weight"].shape == (10, 64)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_accumulation_steps(tmp_path):
    # mixup / cutmix mix within a micro-batch, seeded by its place in the step's global batch: 2 processes x batch 4
    # read and mix the same micro-batches as 1 process x batch 4 x accum 2
    ckpt = random_encoder_checkpoint(tmp_path / "checkpoint.pth")
    one = finetune(ckpt, tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "finetune.py"), *finetune_argv(ckpt, tmp_path / "ddp", "--accum", "1")]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (train_utils.load_checkpoint(tmp_path / d / "checkpoint.pth") for d in ("one", "ddp"))
    assert_equivalent_runs(a, b)
    ddp = json.loads((tmp_path / "ddp" / "probe.jsonl").read_text())
    assert (ddp["top1"], ddp["top5"], ddp["eff_batch"]) == (one["top1"], one["top5"], 8)


def test_finetune_flag_errors(tmp_path):
    ckpt = random_encoder_checkpoint(tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit):  # argparse: --pool is mae-mean or cls
        finetune(ckpt, tmp_path / "o", "--pool", "mean")
    with pytest.raises(ValueError, match="--layer-decay"):
        finetune(ckpt, tmp_path / "o", "--layer-decay", "0")
    # defaults: MAE's FINETUNE.md (batch 32 per GPU, 5 warm-up epochs, wd 0.05, the global pool); by width ViT-B's
    # recipe (epochs 100, blr 5e-4, layer decay 0.65, drop path 0.1), ViT-L's and ViT-H's (50, 1e-3, 0.75, 0.2 / 0.3)
    parse = lambda *flags: ft.build_parser().parse_args(["--ckpt", str(ckpt), "--data", "synthetic", *flags])
    args = parse()
    assert parse("--batch-size", "64").batch_size == 64  # a given flag wins
    assert ft.FINETUNE_RECIPES[768] == dict(epochs=100, blr=5e-4, layer_decay=0.65, drop_path=0.1)
    assert ft.FINETUNE_RECIPES[1024]["blr"] == ft.FINETUNE_RECIPES[1280]["blr"] == 1e-3
    assert (args.batch_size, args.warmup_epochs, args.weight_decay, args.pool) == (32, 5, 0.05, "mae-mean")
    assert (args.mixup, args.cutmix, args.mixup_switch_prob, args.smoothing, args.reprob, args.min_lr) == \
        (0.8, 1.0, 0.5, 0.1, 0.25, 1e-6)


def test_a_stop_during_the_evaluation_saves_and_the_resume_redoes_it(tmp_path, monkeypatch, capsys):
    """SIGTERM while the val pass runs: the pass stops at the next batch, the position (the epoch's steps done) is
    saved, exit 75; the resumed run evaluates that epoch, and its log lines equal an uninterrupted run's."""
    ckpt = random_encoder_checkpoint(tmp_path / "checkpoint.pth")
    finetune(ckpt, tmp_path / "straight")
    logits, calls = ft.FinetuneClassifier.logits, []

    def stop_in_the_val_pass(self, imgs, rng=None):
        if not self.training:
            calls.append(1)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
        return logits(self, imgs, rng)
    monkeypatch.setattr(ft.FinetuneClassifier, "logits", stop_in_the_val_pass)
    monkeypatch.setattr(sys, "argv", ["finetune.py", *finetune_argv(ckpt, tmp_path / "stopped")])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(ft.main, ft.build_parser())
    assert exit_info.value.code == 75 and len(calls) == 1  # no val batch after the signal
    stopped = train_utils.load_checkpoint(tmp_path / "stopped" / "checkpoint.pth")
    assert (stopped["epoch"], stopped["samples"]) == (0, 48) and not (tmp_path / "stopped" / "log.jsonl").exists()
    monkeypatch.setattr(ft.FinetuneClassifier, "logits", logits)
    finetune(ckpt, tmp_path / "stopped")
    lines = {d: [json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()]
             for d in ("straight", "stopped")}
    keys = ("epoch", "loss", "lr", "top1", "top5", "val_loss")
    assert [[row[k] for k in keys] for row in lines["stopped"]] == [[row[k] for k in keys] for row in lines["straight"]]
