"""Latent MIM: equations against hand computations, the jittered grid, masks, the momentum target, a short training
run on synthetic data, and one step of the full default ViT-B/16 recipe on CPU."""
import json, math

import pytest
import torch

from common import StepRandom, UserError, build_adamw, load_vit, patchify
import latent_mim as lm

MICRO = ["--data", "synthetic", "--model", "micro", "--input-size", "32", "--gap", "2", "--mask-ratio", "0.75",
         "--proj-dim", "32", "--decoder-dim", "32", "--decoder-heads", "4", "--decoder-depth", "2",
         "--num-workers", "0"]



def micro_args(*extra):
    args = lm.build_parser().parse_args(MICRO + list(extra))
    lm.check_args(args)
    return args


def step_rng(batch, step=0):
    return StepRandom.for_micro_step(0, step, 0, batch, 1, 0, 1, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- grid and masks
def test_gap_zero_equals_patchify():
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.equal(lm.gap_patchify(imgs, 8, 0), patchify(imgs, 8))


def test_gap_patchify_crops_each_cell_at_its_offset():
    B, p, gap, grid = 2, 4, 3, 3
    cell = p + gap
    imgs = torch.randn(B, 3, grid * cell, grid * cell)
    offsets = torch.randint(gap, (B, grid * grid, 2))
    out = lm.gap_patchify(imgs, p, gap, offsets=offsets)
    assert out.shape == (B, grid * grid, p * p * 3)
    for b in range(B):
        for k in range(grid * grid):
            y = (k // grid) * cell + int(offsets[b, k, 0])
            x = (k % grid) * cell + int(offsets[b, k, 1])
            expect = imgs[b, :, y:y + p, x:x + p].permute(1, 2, 0).reshape(-1)  # (p, q, c) order
            assert torch.equal(out[b, k], expect)


def test_jitter_range_from_step_random():
    """Pixels encode their own coordinates, so each patch's top-left pixel reveals the drawn offset."""
    B, p, gap, grid = 8, 4, 4, 5
    cell = p + gap
    ys, xs = torch.meshgrid(torch.arange(grid * cell), torch.arange(grid * cell), indexing="ij")
    imgs = torch.stack([ys, xs, ys * 0], 0).float().expand(B, -1, -1, -1)
    out = lm.gap_patchify(imgs, p, gap, rng=step_rng(B)).view(B, grid * grid, p, p, 3)
    k = torch.arange(grid * grid)
    oy = out[:, :, 0, 0, 0] - (k // grid) * cell  # [B, L]
    ox = out[:, :, 0, 0, 1] - (k % grid) * cell
    for o in (oy, ox):
        assert o.min() == 0 and o.max() == gap - 1  # uniform over {0..gap-1}: every value seen in 400 draws
        assert len(set(o.flatten().tolist())) == gap
    assert not torch.equal(oy, ox)  # independent per axis
    assert not torch.equal(oy[0], oy[1])  # and per image


def test_mask_counts():
    assert lm.num_visible(196, 0.9) == 20 and lm.num_visible(196, 0.75) == 49
    model = lm.LatentMIM(micro_args())  # 32 px, patch 8 -> 16 patches; ratio 0.75 -> 4 visible
    imgs = torch.randn(3, 3, model.crop, model.crop)
    pixels, vis, tgt = model.views(imgs, step_rng(3))
    assert model.crop == 40 and pixels.shape == (3, 16, 8 * 8 * 3)
    assert vis.shape == (3, 4) and tgt.shape == (3, 12)
    for b in range(3):
        assert sorted(vis[b].tolist() + tgt[b].tolist()) == list(range(16))


# ------------------------------------------------------------------------------------------------------- losses
PRED = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [B=1, T=2, D=2]
TARGET = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])


def test_regression_losses_by_hand():
    # diffs: (1, 0) and (-1, 2): L2 = 1 and 5, L1 = 1 and 3
    assert lm.latent_loss(PRED, TARGET, "mse").item() == pytest.approx(3.0)
    assert lm.latent_loss(PRED, TARGET, "l1").item() == pytest.approx(2.0)
    # delta 2: patch 1 L2 = 1 < 4 -> 0.5 * 1; patch 2 L2 = 5 >= 4 -> 2 (3 - 1) = 4
    assert lm.latent_loss(PRED, TARGET, "huber", delta=2.0).item() == pytest.approx((0.5 + 4.0) / 2)
    # delta 1: both L2 >= 1 -> 1 (1 - 0.5) and 1 (3 - 0.5)
    assert lm.latent_loss(PRED, TARGET, "huber", delta=1.0).item() == pytest.approx((0.5 + 2.5) / 2)


def test_patchdisc_by_hand():
    tau = 0.2
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    # cosines: pred1=(1,0): 1 with t1, 1/sqrt2 with t2; pred2=(0,1): 0 with t1, 1/sqrt2 with t2
    c = 1 / math.sqrt(2)
    d1 = -tau * math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(c / tau)))
    d2 = -tau * math.log(math.exp(c / tau) / (math.exp(0.0) + math.exp(c / tau)))
    got = lm.patch_discrimination_loss(PRED, target, tau)
    assert got.item() == pytest.approx((d1 + d2) / 2, rel=1e-5)
    assert lm.latent_loss(PRED, target, "patchdisc", tau=tau).item() == pytest.approx(got.item())
    # +sim/tau: a matching prediction scores lower than a swapped one
    assert lm.patch_discrimination_loss(target, target, tau) < lm.patch_discrimination_loss(target.flip(1), target, tau)


def test_patchdisc_negatives_come_from_the_same_image_only():
    pred, target = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    per_image = [lm.patch_discrimination_loss(pred[b:b + 1], target[b:b + 1]) for b in range(3)]
    assert lm.patch_discrimination_loss(pred, target).item() == pytest.approx(sum(per_image).item() / 3, rel=1e-5)


def test_similarity_regularizer_by_hand():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])  # cosine matrix [[1, 0], [0, 1]] -> mean 1/2
    visible = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]])  # [[1,1,-1],[1,1,-1],[-1,-1,1]] -> 1/9
    gamma = 0.25
    expect = (gamma - 0.5) ** 2 + (gamma - 1 / 9) ** 2
    assert lm.similarity_regularizer(pred, visible, gamma).item() == pytest.approx(expect, rel=1e-5)
    # brute-force cosine matrices on random tensors, averaged per image over the batch
    p, v = torch.randn(2, 6, 4), torch.randn(2, 3, 4)
    cos = lambda z: torch.nn.functional.cosine_similarity(z[:, :, None], z[:, None], dim=-1).mean((1, 2))
    assert lm.mean_pairwise_cosine(p) == pytest.approx(cos(p), abs=1e-6)
    brute = ((0.6 - cos(p)) ** 2 + (0.6 - cos(v)) ** 2).mean()
    assert lm.similarity_regularizer(p, v, 0.6).item() == pytest.approx(brute.item(), rel=1e-5)


def test_visual_cue_queries_by_hand():
    m = torch.tensor([0.1, -0.2])
    p_t = torch.tensor([[[1.0, 0.0]]])  # [1, T=1, 2]
    p_v = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [1, V=2, 2]
    z_v = torch.tensor([[[2.0, 4.0], [-6.0, 8.0]]])
    w1, w2 = math.exp(1 / math.sqrt(2)), math.exp(0.0)  # P_T P_V^T / sqrt(d) = [1, 0] / sqrt 2
    a1, a2 = w1 / (w1 + w2), w2 / (w1 + w2)
    expect = [0.1 + 1.0 + a1 * 2 + a2 * -6, -0.2 + 0.0 + a1 * 4 + a2 * 8]
    got = lm.visual_cue_queries(m, p_t, p_v, z_v)
    assert got.shape == (1, 1, 2) and got[0, 0].tolist() == pytest.approx(expect, rel=1e-6)
    assert torch.equal(lm.visual_cue_queries(m.view(1, 1, 2), p_t, p_v, z_v), got)


# ------------------------------------------------------------------------------------------- model and training
@pytest.mark.parametrize("target,decoder,proj", [("momentum", "cross-cues", "mlp"), ("independent", "self", "mlp"),
                                                 ("joint", "cross", "none"), ("shared-stopgrad", "cross-cues", "mlp")])
def test_gradients_reach_every_trainable_parameter_and_no_target_one(target, decoder, proj):
    torch.manual_seed(0)
    model = lm.LatentMIM(micro_args("--target", target, "--decoder", decoder, "--proj", proj))
    loss, metrics = model(torch.randn(2, 3, 40, 40), step_rng(2))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # DDP runs without find_unused_parameters
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if target == "momentum":
        assert frozen and all(n.startswith(("target_encoder.", "target_proj.")) for n in frozen)
        assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("target_"))
    else:
        assert not frozen
    assert (target in ("momentum", "independent")) == hasattr(model, "target_encoder")
    assert set(metrics) == {"sim_pred", "sim_vis", "sim_target"} and all(0 <= v <= 1 + 1e-5 for v in metrics.values())


def test_momentum_target_starts_as_copy_and_follows_the_ema_rule():
    torch.manual_seed(0)
    model = lm.LatentMIM(micro_args())
    pairs = lambda enc, proj: dict(enc.named_parameters()) | {f"proj.{n}": p for n, p in proj.named_parameters()}
    online, target = pairs(model.encoder, model.proj), pairs(model.target_encoder, model.target_proj)
    assert all(torch.equal(online[k], target[k]) for k in online)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(2, 3, 40, 40), step_rng(2))[0].backward()
    opt.step()
    before = {k: v.detach().clone() for k, v in target.items()}
    assert not all(torch.equal(online[k], before[k]) for k in online)  # the optimizer moved the online encoder only
    model.momentum_update(0.9)
    for k in online:
        assert torch.allclose(target[k], 0.9 * before[k] + 0.1 * online[k], atol=1e-6), k


def test_cli_validation():
    for bad in (["--mask-ratio", "1.0"], ["--mask-ratio", "0.99"], ["--crop-size", "32"], ["--input-size", "36"],
                ["--gap", "-1"], ["--tau", "0"], ["--decoder-dim", "30"]):
        with pytest.raises(UserError):
            micro_args(*bad)
    assert micro_args("--crop-size", "40").crop_size == 40


def test_training_steps_lower_the_default_loss():
    """PatchDisc + R, AdamW and EMA steps on one batch of synthetic images: the loss falls step after step."""
    args = micro_args()
    torch.manual_seed(0)
    model, data = lm.LatentMIM(args), lm.train_dataset(args)
    imgs = torch.stack([data[i, i][0] for i in range(8)])  # [8, 3, 40, 40]
    opt = build_adamw(model, 0.05, 2e-3)
    losses = []
    for _ in range(12):
        loss, _ = model(imgs, step_rng(8))
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.momentum_update(0.99)
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0] and losses[-1] < min(losses[:6])


def test_main_run_logs_and_exports_the_online_encoder(tmp_path):
    args = lm.build_parser().parse_args(MICRO + [
        "--output-dir", str(tmp_path), "--synthetic-size", "32", "--batch-size", "8", "--accum", "1", "--epochs", "3",
        "--warmup-epochs", "0", "--lr", "1e-3", "--loss", "mse", "--log-every", "1"])
    run = lm.main(args)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert {"loss", "lr", "momentum", "gamma", "sim_pred", "sim_vis", "sim_target"} <= set(rows[0])
    assert rows[-1]["momentum"] > rows[0]["momentum"] >= 0.99 and rows[-1]["gamma"] < rows[0]["gamma"] <= 0.75
    vit = load_vit(tmp_path / "checkpoint.pth")
    assert vit.config["img_size"] == 32  # the evaluation grid, gap 0
    for (n, p), q in zip(run.model.encoder.state_dict().items(), vit.state_dict().values()):
        assert torch.equal(p, q), n


def test_vis_writes_the_figure(tmp_path):
    from PIL import Image
    path = tmp_path / "grid.png"
    lm.main(lm.build_parser().parse_args(MICRO + ["--vis", str(path)]))
    with Image.open(path) as img:
        assert img.size == (4 + 3 * (40 + 4), 4 + 4 * (40 + 4))  # 3 panels x 4 images of the 40 px crop


def test_full_default_vit_b16_step_on_cpu():
    """The paper's recipe as the defaults: ViT-B/16, 280 px with gap 4, 20 visible / 176 targets, projector,
    3-block cross-attention decoder with visual cues, PatchDisc + R; one optimizer step and EMA update, batch 2."""
    d = lm.build_parser().parse_args(["--data", "synthetic"])
    recipe = (d.epochs, d.warmup_epochs, d.blr, d.batch_size * 8 * d.accum, d.min_lr_frac)
    assert recipe == (800, 40, 1.5e-4, 4096, 0.25)
    args = lm.build_parser().parse_args(["--data", "synthetic", "--batch-size", "2"])
    lm.check_args(args)
    torch.manual_seed(0)
    model = lm.LatentMIM(args)
    assert (model.encoder.embed_dim, len(model.encoder.blocks), model.patch, model.crop) == (768, 12, 16, 280)
    assert (model.num_visible, model.num_patches, model.loss_kind, model.sim_weight) == (20, 196, "patchdisc", 0.1)
    assert model.proj[3].weight.shape == (4096, 4096) and len(model.decoder.blocks) == 3
    assert model.decoder.kind == "cross-cues" and model.decoder.embed.out_features == 512
    opt = build_adamw(model, 0.05, 1e-4)
    loss, metrics = model(torch.randn(2, 3, 280, 280), step_rng(2))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    w = model.target_encoder.blocks[0].attn.qkv.weight
    before = w.detach().clone()
    opt.step()
    model.momentum_update(0.99)
    online = model.encoder.blocks[0].attn.qkv.weight
    assert torch.allclose(w, 0.99 * before + 0.01 * online, atol=1e-7) and not torch.equal(w, before)
