"""Tests of common.py: values checked against hand computations, not just shapes."""
import math
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import common
import figures
import eval_utils
import output_lock
import train_log
import train_utils
import cli
from tools import bench
from common import (ResumableSampler, SeededDataset, StepRandom, SyntheticShapes, build_vit, get_2d_sincos_pos_embed,
                    patchify, random_masking, unpatchify)


# ------------------------------------------------------------------------------------------------ position embeddings
def test_sincos_matches_hand_computation():
    # embed_dim 8: each axis gets 4 channels = [sin(p w0), sin(p w1), cos(p w0), cos(p w1)], w = 1 / 10000^(0, 1/2)
    emb = get_2d_sincos_pos_embed(8, 3, cls_token=True)
    assert emb.shape == (10, 8)
    assert torch.equal(emb[0], torch.zeros(8))  # cls row
    w = [1.0, 0.01]
    for i in range(3):  # row
        for j in range(3):  # column
            one_d = lambda p: [math.sin(p * w[0]), math.sin(p * w[1]), math.cos(p * w[0]), math.cos(p * w[1])]
            expected = torch.tensor(one_d(j) + one_d(i))  # MAE: first half from the column, second from the row
            assert torch.allclose(emb[1 + i * 3 + j], expected, atol=1e-6)


def test_sincos_matches_mae_numpy_formula():
    np = pytest.importorskip("numpy") if False else __import__("numpy")  # numpy ships with torch
    def mae_1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    d, g = 32, 5
    grid = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32))  # (w, h) as in MAE
    grid = np.stack(grid, axis=0).reshape(2, 1, g, g)
    ref = np.concatenate([mae_1d(d // 2, grid[0]), mae_1d(d // 2, grid[1])], axis=1)
    assert torch.allclose(get_2d_sincos_pos_embed(d, g), torch.from_numpy(ref).float(), atol=1e-6)


# --------------------------------------------------------------------------------------------------------------- ViT
BASE_BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                   "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                   "mlp.fc2.bias"]
BASE_KEYS = (["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
             + [f"blocks.{i}.{k}" for i in range(12) for k in BASE_BLOCK_KEYS] + ["norm.weight", "norm.bias"])


def test_base_preset_key_list_and_shapes():
    vit = build_vit("base")
    state = vit.state_dict()
    assert list(state) == BASE_KEYS
    assert state["patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert state["pos_embed"].shape == (1, 197, 768)
    assert state["blocks.0.attn.qkv.weight"].shape == (2304, 768)
    assert state["blocks.11.mlp.fc1.weight"].shape == (3072, 768)
    # timm's ViT-B/16 without head has 85,798,656 parameters, 197 x 768 of them the position table fixed here
    assert sum(p.numel() for p in vit.parameters() if p.requires_grad) == 85_798_656 - 197 * 768


def test_timm_layout_checkpoint_loads_both_ways(tmp_path):
    # a public timm / MAE layout: encoder keys + classifier head + fc_norm, wrapped as MAE does
    src = build_vit("small")
    public = {**src.state_dict(), "head.weight": torch.zeros(1000, 384), "head.bias": torch.zeros(1000)}
    torch.save({"model": {f"module.{k}": v for k, v in public.items()}, "epoch": 3}, tmp_path / "mae.pth")
    vit = eval_utils.load_vit(tmp_path / "mae.pth")
    assert vit.config == dict(img_size=224, patch_size=16, in_chans=3, embed_dim=384, depth=12, num_heads=6,
                              mlp_ratio=4.0)
    for k, v in src.state_dict().items():
        assert torch.equal(vit.state_dict()[k], v)
    # and ours loads into a model with the common names (strict, no missing or unexpected keys)
    missing, unexpected = src.load_state_dict(vit.state_dict(), strict=True)
    assert missing == [] and unexpected == []


def test_dino_teacher_layout(tmp_path):
    src = build_vit("micro")
    ckpt = {"student": {"module.backbone." + k: v * 0 for k, v in src.state_dict().items()},
            "teacher": {"backbone." + k: v for k, v in src.state_dict().items()} | {"head.mlp.0.weight": torch.ones(2)}}
    torch.save(ckpt, tmp_path / "dino.pth")
    vit = eval_utils.load_vit(tmp_path / "dino.pth")  # the teacher is preferred, as DINO's own evaluation does
    assert torch.equal(vit.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_load_vit_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        eval_utils.load_vit(tmp_path / "notes.txt")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "mlp.pth")
    with pytest.raises(ValueError, match="contains no ViT encoder"):
        eval_utils.load_vit(tmp_path / "mlp.pth")
    with pytest.raises(ValueError, match="checkpoint not found"):
        eval_utils.load_vit(tmp_path / "missing.pth")


def test_pieces_compose_to_forward():
    torch.manual_seed(0)
    vit = build_vit("micro", img_size=32).eval()
    imgs = torch.randn(2, 3, 32, 32)
    # conv embedding == linear embedding of patchified pixels
    assert torch.allclose(vit.patch_tokens(imgs), vit.embed_pixels(patchify(imgs, 8)), atol=1e-5)
    # embedding a subset with its positions == embedding all then gathering
    ids = torch.tensor([[3, 0, 7], [15, 2, 9]])
    full = vit.embed(imgs)  # [B, 1 + 16, D]
    part = vit.embed(imgs, ids)
    assert torch.allclose(part[:, 1:], common.gather_tokens(full[:, 1:], ids), atol=1e-6)
    assert torch.allclose(part[:, 0], full[:, 0])
    # blocks one by one + norm == forward
    x = vit.embed(imgs)
    for blk in vit.blocks:
        x = blk(x)
    assert torch.allclose(vit.norm(x), vit(imgs), atol=1e-6)
    # a subset given as pixels == forward on the same subset
    pixels = common.gather_tokens(patchify(imgs, 8), ids)
    assert torch.allclose(vit.forward_pixels(pixels, ids), vit(imgs, ids), atol=1e-5)


def test_mae_init():
    vit = build_vit("tiny")
    w = vit.blocks[0].attn.qkv.weight  # xavier_uniform bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= math.sqrt(6 / (192 + 576)) + 1e-6
    assert torch.equal(vit.blocks[0].attn.qkv.bias, torch.zeros(576))
    assert 0.01 < vit.cls_token.std() < 0.03
    assert not any(n == "pos_embed" for n, _ in vit.named_parameters())  # fixed, not trained


def test_stochastic_depth_from_step_random():
    blocks = torch.nn.ModuleList(common.Block(16, 2, drop_path=0.5) for _ in range(3)).train()
    x = torch.randn(4, 3, 16)
    cpu = torch.device("cpu")
    full = common.run_blocks(blocks, x, StepRandom(0, 5, cpu, slice(0, 4), 4))
    rows_2_3 = common.run_blocks(blocks, x[2:], StepRandom(0, 5, cpu, slice(2, 4), 4))
    assert torch.allclose(rows_2_3, full[2:], atol=1e-6)  # the same rows of the same global draw
    # by hand: one [B, depth, 2] draw, block i uses column i for its attention and MLP branches
    u = StepRandom(0, 5, cpu, slice(0, 4), 4).rand(3, 2)
    expected = x
    for i, blk in enumerate(blocks):
        keep = (u[:, i] >= 0.5).float() / 0.5  # [B, 2]
        expected = expected + blk.attn(blk.norm1(expected)) * keep[:, 0, None, None]
        expected = expected + blk.mlp(blk.norm2(expected)) * keep[:, 1, None, None]
    assert torch.allclose(full, expected, atol=1e-6)
    assert torch.equal(common.drop_path(torch.ones(8, 3), 0.25, False), torch.ones(8, 3))  # identity in eval mode
    blocks.eval()
    assert torch.allclose(common.run_blocks(blocks, x, StepRandom(0, 5, cpu, slice(0, 4), 4)),
                          common.run_blocks(blocks, x), atol=1e-6)  # eval: no draw, no drop


def test_stochastic_depth_in_training_needs_the_step_rng():
    blocks = torch.nn.ModuleList([common.Block(16, 2, drop_path=0.1)]).train()
    with pytest.raises(ValueError, match="rng"):
        common.run_blocks(blocks, torch.randn(2, 3, 16))  # no silent draw from the global generator
    with pytest.raises(ValueError, match="uniforms"):
        common.drop_path(torch.ones(2, 3), 0.1, True)


def test_preset_patch_size_lookup():
    assert common.preset_patch_size("base") == 16 and common.preset_patch_size("huge") == 14
    assert common.preset_patch_size("base", 8) == 8
    with pytest.raises(ValueError, match="unknown model 'giant'"):
        common.preset_patch_size("giant")


# ---------------------------------------------------------------------------------------------- patches and masks
def test_patchify_round_trip_and_order():
    imgs = torch.randn(2, 3, 32, 48)[:, :, :, :32]
    p = patchify(imgs, 8)
    assert p.shape == (2, 16, 8 * 8 * 3)
    assert torch.equal(unpatchify(p, 8), imgs)
    # patch 5 = row 1, column 1; pixel (p, q, c) order
    assert torch.equal(p[1, 5].view(8, 8, 3), imgs[1, :, 8:16, 8:16].permute(1, 2, 0))


def test_random_masking_counts_and_partition():
    noise = torch.rand(5, 196)
    vis, msk = random_masking(noise, 49)
    assert vis.shape == (5, 49) and msk.shape == (5, 147)
    for b in range(5):
        assert sorted(torch.cat([vis[b], msk[b]]).tolist()) == list(range(196))
        assert noise[b, vis[b]].max() < noise[b, msk[b]].min()  # the smallest noise is visible


def test_standardize_tokens_by_hand():
    t = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    mean, var = 3.0, (2 ** 2 + 1 + 0 + 3 ** 2) / 3  # unbiased, as torch's .var() and MAE's norm_pix_loss
    expected = torch.tensor([(v - mean) / math.sqrt(var + 1e-6) for v in (1.0, 2.0, 3.0, 6.0)])
    assert torch.allclose(common.standardize_tokens(t)[0], expected, atol=1e-6)
    assert common.standardize_tokens(t.to(torch.bfloat16)).dtype == torch.float32


def test_mae_decoder_equals_mae_unshuffle_formulation():
    """MAE puts the mask tokens at the masked positions (unshuffle), adds the position table in patch order, runs the
    blocks and reads the masked rows; ours appends the mask tokens and adds each token's own position. Attention is
    permutation-equivariant, so the two agree."""
    torch.manual_seed(0)
    grid, enc_dim, out_dim = 3, 16, 12
    dec = common.MAEDecoder(enc_dim, grid, out_dim, decoder_dim=8, decoder_depth=2, decoder_heads=2).eval()
    vis, msk = common.random_masking(torch.rand(2, grid * grid), 4)  # [2, 4], [2, 5]
    latent = torch.randn(2, 5, enc_dim)  # [cls, 4 visible]
    ours = dec(latent, vis, msk)  # [2, 5, out]
    x = dec.embed(latent)
    full = dec.mask_token.expand(2, grid * grid, -1).clone()  # [2, L, 8]: mask tokens everywhere ...
    full.scatter_(1, vis[..., None].expand(-1, -1, 8), x[:, 1:])  # ... and the visible tokens at their positions
    y = torch.cat([x[:, :1], full], 1) + dec.pos_embed  # cls at position row 0 (zeros)
    for blk in dec.blocks:
        y = blk(y)
    mae = common.gather_tokens(dec.head(dec.norm(y[:, 1:])), msk)
    assert ours.shape == (2, 5, out_dim)
    assert torch.allclose(ours, mae, atol=1e-5)
    assert dec.mask_token.std() > 0.01  # normal(0.02) init, as MAE
    assert "pos_embed" not in dec.state_dict()  # fixed: rebuilt, not saved
    assert torch.equal(common.MAEDecoder(enc_dim, grid, out_dim, 8, 1, 2, mask_token_std=0.0).mask_token,
                       torch.zeros(1, 1, 8))


def test_denormalize_inverts_the_normalisation():
    img = torch.rand(3, 8, 8)
    mean, std = torch.tensor(common.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(common.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(figures.denormalize((img - mean) / std), img, atol=1e-6)


def test_step_random_is_independent_of_the_split():
    dev = torch.device("cpu")
    whole = StepRandom(7, 3, dev, slice(0, 8), 8).rand(5)
    parts = [StepRandom.for_micro_step(7, 3, micro, 2, 2, rank, 2, dev).rand(5)
             for micro in range(2) for rank in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(StepRandom(7, 4, dev, slice(0, 8), 8).rand(5), whole)  # a new step, new draws


# ------------------------------------------------------------------------------------------------------------ data
def test_synthetic_is_deterministic_and_structured():
    a, b = SyntheticShapes(32, 50, seed=1), SyntheticShapes(32, 50, seed=1)
    for i in (0, 17, 49):
        (xa, ya), (xb, yb) = a.load(i), b.load(i)
        assert torch.equal(xa, xb) and ya == yb
        assert xa.shape == (3, 32, 32) and xa.dtype == torch.uint8
    assert not torch.equal(a.load(0)[0], SyntheticShapes(32, 50, seed=2).load(0)[0])
    assert SyntheticShapes(80, 5).load(3)[0].shape == (3, 80, 80)  # any size
    labels = [a.load(i)[1] for i in range(50)]
    assert len(set(labels)) >= 8  # all classes appear
    # colour carries no class information: the mean colour of class-0 images varies as much as any other class's
    means = torch.stack([a.load(i)[0].float().mean((1, 2)) for i in range(50)])
    assert means.std(0).min() > 20


def test_seeded_augmentation_is_a_function_of_the_seed():
    ds = SeededDataset(SyntheticShapes(48, 10), common.image_transform(common.pretrain_transform(32)))
    x1, y1, bad1 = ds[(3, 111)]
    x2, _, _ = ds[(3, 111)]
    x3, _, _ = ds[(3, 222)]
    assert x1.shape == (3, 32, 32) and bad1 == -1
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    state = torch.get_rng_state()
    ds[(4, 5)]
    assert torch.equal(state, torch.get_rng_state())  # the main process's generator is untouched


@pytest.mark.parametrize("size, resize", [(32, 36), (224, 256), (384, 384)])
def test_eval_transform_resizes_as_mae_by_the_input_size(size, resize):
    """MAE's build_transform: crop_pct 224/256 up to 224 px, 1 above: Resize(int(size / crop_pct)) + CenterCrop."""
    from PIL import Image
    from torchvision.transforms import v2
    img = Image.fromarray(torch.randint(0, 256, (300, 500, 3), dtype=torch.uint8, generator=torch.Generator()
                                        .manual_seed(0)).numpy())
    by_hand = v2.functional.center_crop(v2.functional.resize(v2.functional.to_image(img), resize, antialias=True,
                                                             interpolation=v2.InterpolationMode.BICUBIC), size)
    expected = v2.functional.normalize(v2.functional.to_dtype(by_hand, torch.float32, scale=True),
                                       common.IMAGENET_MEAN, common.IMAGENET_STD)
    assert torch.equal(common.eval_transform(size)(img), expected)


def test_resumable_sampler_partitions_global_batches():
    n, b, world, accum = 50, 3, 2, 2
    samplers = [ResumableSampler(n, b, world, r, accum, seed=4) for r in range(world)]
    for s in samplers:
        s.epoch = 2
    per_rank = [[i for i, _ in s] for s in samplers]
    assert samplers[0].steps_per_epoch == 50 // 12 == 4 and len(per_rank[0]) == 4 * accum * b == len(samplers[0])
    seen = per_rank[0] + per_rank[1]
    assert len(set(seen)) == len(seen)  # no sample twice in an epoch
    # the union of rank batches of one micro-step is a contiguous slice of the epoch permutation
    one = ResumableSampler(n, b * world, 1, 0, accum, seed=4)
    one.epoch = 2
    flat = [i for i, _ in one]
    assert sorted(per_rank[0][:b] + per_rank[1][:b]) == sorted(flat[:2 * b])
    # resuming at chunk 3 continues exactly where the run left off
    samplers[0].start_chunk = 3
    assert [i for i, _ in samplers[0]] == per_rank[0][3 * b:]


def test_imagefolder_errors_and_bad_images(tmp_path, capsys):
    from PIL import Image
    with pytest.raises(ValueError, match="not found"):
        common.build_dataset(str(tmp_path / "nope"), "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        common.build_dataset(str(tmp_path), "train")
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        common.build_dataset(str(tmp_path), "train")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "train" / "cat" / "a.jpg")
    (tmp_path / "train" / "cat" / "b.jpg").write_bytes(b"")  # zero bytes
    (tmp_path / "train" / "cat" / "c.jpg").write_text("not an image")
    folder = common.build_dataset(str(tmp_path), "train")
    assert len(folder) == 3 and folder.classes == ["cat"]
    ds = SeededDataset(folder, common.image_transform(common.eval_transform(32)))
    x, label, bad = ds[1]
    assert bad == 1 and x.shape == (3, 32, 32)  # replaced by the next readable image (wrapping around)
    assert ds[0][2] == -1
    logger = train_log.StepLogger(train_utils.Dist("cpu"), tmp_path, every=1)
    logger.note_bad(torch.tensor([-1, 1, 2, 1]), ds)
    logger.note_bad(torch.tensor([1]), ds)
    err = capsys.readouterr().err
    assert err.count("b.jpg") == 1 and err.count("c.jpg") == 1  # each file reported once
    assert logger.bad_in_epoch == 4


# ---------------------------------------------------------------------------------------------------------- schedules
def test_schedules_at_known_steps():
    ws = common.warmup_cosine
    assert ws(0, 100, 10, 1.0) == 0.0
    assert ws(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert ws(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert ws(55, 100, 10, 1.0) == pytest.approx(0.5)  # half-way through the cosine
    assert ws(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert ws(0, 100, 10, 2.0, start_frac=0.25, end_frac=0.25) == pytest.approx(0.5)
    assert ws(100, 100, 10, 2.0, start_frac=0.25, end_frac=0.25) == pytest.approx(0.5)
    assert common.ema_momentum(0, 1000, 0.99) == pytest.approx(0.99)
    assert common.ema_momentum(500, 1000, 0.99) == pytest.approx(0.995)
    assert common.ema_momentum(1000, 1000, 0.99) == pytest.approx(1.0)
    assert common.cosine_schedule(0.25, 1, 0.75, 0.25) == pytest.approx(0.25 + 0.5 * (1 + math.cos(math.pi / 4)) * 0.5)


def test_ema_update_rule():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    qa = [p.clone() for p in a.parameters()]
    common.ema_update(a, b, 0.9)
    for q, p, new in zip(qa, b.parameters(), a.parameters()):
        assert torch.allclose(new, 0.9 * q + 0.1 * p)


def test_param_group_split():
    vit = build_vit("micro")
    vit.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 64))
    decay, no_decay = common.param_groups(vit, 0.05, lambda name, p: p.ndim < 2 or name == "cls_token")
    names = {id(p): n for n, p in vit.named_parameters()}
    d, nd = {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert d == {"mask_token", "patch_embed.proj.weight"} | {f"blocks.{i}.{k}" for i in range(4) for k in
                 ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")}
    assert {"cls_token", "norm.weight", "norm.bias", "blocks.0.attn.qkv.bias",
            "blocks.3.norm2.weight", "patch_embed.proj.bias"} <= nd
    assert len(d) + len(nd) == sum(1 for _ in vit.parameters())


# -------------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    vit = build_vit("micro", img_size=32)
    state = {"model": vit.state_dict(), "epoch": 3, "args": {"lr": 1e-3, "drop": [0, 4]},
             **train_utils.encoder_export(vit, "x")}
    train_utils.save_checkpoint(tmp_path / "checkpoint.pth", state)
    ckpt = train_utils.load_checkpoint(tmp_path / "checkpoint.pth")  # weights_only=True
    assert ckpt["epoch"] == 3 and ckpt["args"]["drop"] == [0, 4] and ckpt["method"] == "x"
    rebuilt = eval_utils.load_vit(tmp_path / "checkpoint.pth")
    assert rebuilt.config == vit.config
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in vit.state_dict().items())
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    train_utils.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken_save(obj, f):
        f.write(b"partial garbage")
        raise KeyboardInterrupt  # the process dies in the middle of the write
    monkeypatch.setattr(cli.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        train_utils.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert train_utils.load_checkpoint(path)["step"] == 1


@pytest.mark.slow
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, root):
    path = tmp_path / "checkpoint.pth"
    script = textwrap.dedent(f"""
        import sys, torch; sys.path.insert(0, {str(root)!r})
        from train_utils import save_checkpoint
        big = torch.randn(40_000_000)  # 160 MB: long enough to be killed mid-write
        step = 0
        while True:
            step += 1
            save_checkpoint({str(path)!r}, {{"step": step, "w": big}})
            print(step, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "1"  # one complete checkpoint exists
    time.sleep(0.3)  # now somewhere inside a later write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = train_utils.load_checkpoint(path)
    assert ckpt["step"] >= 1 and ckpt["w"].shape == (40_000_000,)


def test_load_state_error_names_the_mismatch(tmp_path):
    with pytest.raises(ValueError, match="does not match this model"):
        train_utils.load_state(build_vit("micro"), build_vit("tiny").state_dict(), "the encoder", "x.pth")


def test_output_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        output_lock.check_output_dir(blocker / "out")


def test_non_finite_guard_names_the_step():
    guard = train_log.NonFiniteGuard()
    guard.check(torch.tensor(1.0), 0)
    guard.check(torch.tensor(float("nan")), 1)  # read one step later, without a sync
    with pytest.raises(FloatingPointError, match="step 1"):
        guard.check(torch.tensor(1.0), 2)
    guard = train_log.NonFiniteGuard()
    guard.check(torch.tensor(float("inf")), 7)
    with pytest.raises(FloatingPointError, match="step 7"):
        guard.flush()  # before a checkpoint is written


def test_flop_count_of_vit_base_forward():
    vit = build_vit("base").to("meta")
    flops = bench.count_flops(lambda: vit(torch.empty(1, 3, 224, 224, device="meta")))
    # analytic: 12 blocks x (24 N D^2 + 4 N^2 D) + patch embedding 2 L (p^2 3) D, N = 197, L = 196, D = 768
    n, d = 197, 768
    analytic = 12 * (24 * n * d * d + 4 * n * n * d) + 2 * 196 * 768 * 768
    assert flops == pytest.approx(analytic, rel=1e-3)
    assert flops / 1e9 == pytest.approx(35.1, abs=0.2)  # 17.6 GMACs, the published ViT-B/16 figure


# ------------------------------------------------------------------------------------------------------- training run
def test_accumulation_equals_one_big_batch_and_its_resume_is_exact(tmp_path):
    """A real method's loop (PCAE: masks, stochastic depth and the EMA teacher all drawn per step): batch 4 x accum 2
    reads the same samples and draws as batch 8, so the two agree up to float summation order (the derived tolerance
    of assert_equivalent_runs); a stop and resume on the same layout is bit-identical to the uninterrupted run."""
    from conftest import assert_equivalent_runs, assert_same_state, run_inprocess
    big = run_inprocess("pcae", tmp_path / "big", "", "--batch-size", "8", "--keep-every", "1")
    assert big["epoch"] == 2 and big["step"] == 2 * (48 // 8) and big["samples"] == 0
    kept = [train_utils.load_checkpoint(tmp_path / "big" / f"checkpoint-{e:04d}.pth") for e in (1, 2)]
    assert [(k["epoch"], k["step"]) for k in kept] == [(1, 6), (2, 12)]  # a copy at the end of every epoch
    straight = run_inprocess("pcae", tmp_path / "straight", "", "--batch-size", "4", "--accum", "2")
    stopped = run_inprocess("pcae", tmp_path / "acc", "", "--batch-size", "4", "--accum", "2", "--max-steps", "5")
    assert (stopped["epoch"], stopped["step"], stopped["samples"]) == (0, 5, 40)  # saved mid-epoch at the stop
    resumed = run_inprocess("pcae", tmp_path / "acc", "", "--batch-size", "4", "--accum", "2")
    assert_same_state(straight, resumed)
    assert_equivalent_runs(big, resumed)
    assert not torch.equal(stopped["model"]["student.norm.weight"], big["model"]["student.norm.weight"])  # trained on
    lines = (tmp_path / "big" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"bad_images": 0' in lines[0]
