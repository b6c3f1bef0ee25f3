"""Latent MIM: equations against hand computations, the jittered grid, masks, the momentum target, the decoders, a
short training run on synthetic data, and one step of the full default ViT-B/16 recipe on CPU."""
import json, math

import pytest
import torch
import torch.nn.functional as F

from common import Block, MAEDecoder, build_adamw, get_2d_sincos_pos_embed, patchify
from eval_utils import load_vit
from train_utils import load_checkpoint
from conftest import step_rng
import latent_mim as lm

MICRO = ["--data", "synthetic", "--model", "micro", "--input-size", "32", "--gap", "2", "--mask-ratio", "0.75",
         "--proj-dim", "32", "--decoder-dim", "32", "--decoder-heads", "4", "--decoder-depth", "2",
         "--num-workers", "0"]


def micro_args(*extra):
    """The parsed flags after main's checks (the model checks its own; check_args sets the crop size from it)."""
    args = lm.build_parser().parse_args(MICRO + list(extra))
    lm.check_args(args, lm.build_model(args))
    return args


def micro_model(*extra):
    return lm.build_model(micro_args(*extra))


# ----------------------------------------------------------------------------------------------- grid and masks
def test_gap_zero_equals_patchify():
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.equal(lm.gap_patchify(imgs, 8, 0), patchify(imgs, 8))


def test_gap_patchify_never_draws_from_the_global_generator():
    imgs = torch.randn(2, 3, 40, 40)
    with pytest.raises(ValueError, match="offsets or the rng"):
        lm.gap_patchify(imgs, 8, 2)
    state = torch.get_rng_state()
    a = lm.gap_patchify(imgs, 8, 2, rng=step_rng(2))
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(a, lm.gap_patchify(imgs, 8, 2, rng=step_rng(2)))


def test_gap_patchify_crops_each_cell_at_its_offset():
    B, p, gap, grid = 2, 4, 3, 3
    cell = p + gap
    imgs = torch.randn(B, 3, grid * cell, grid * cell)
    offsets = torch.randint(gap, (B, grid * grid, 2), generator=torch.Generator().manual_seed(0))
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
    model = micro_model()  # 32 px, patch 8 -> 16 patches; ratio 0.75 -> 4 visible
    imgs = torch.randn(3, 3, model.crop, model.crop)
    pixels, vis_ids, mask_ids = model.mask(imgs, step_rng(3))
    assert model.crop == 40 and pixels.shape == (3, 16, 8 * 8 * 3)
    assert vis_ids.shape == (3, 4) and mask_ids.shape == (3, 12)
    for b in range(3):
        assert sorted(vis_ids[b].tolist() + mask_ids[b].tolist()) == list(range(16))
    with pytest.raises(ValueError, match="40 px"):
        model.mask(torch.randn(3, 3, 32, 32), step_rng(3))  # the grid of 8 + 2 px cells needs 40 px


# ------------------------------------------------------------------------------------------------------- losses
PRED = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [B=1, T=2, D=2]
TARGET = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])


def test_regression_losses_by_hand():
    # diffs: (1, 0) and (-1, 2): L2 = 1 and 5, L1 = 1 and 3
    assert lm.latent_loss(PRED, TARGET, "mse").item() == pytest.approx(3.0)
    assert lm.latent_loss(PRED, TARGET, "l1").item() == pytest.approx(2.0)
    # Huber per channel, summed over channels. delta 2: |1|, |0|, |-1| < 2 -> 0.5, 0, 0.5; |2| >= 2 -> 2 (2 - 1) = 2
    assert lm.latent_loss(PRED, TARGET, "huber", delta=2.0).item() == pytest.approx((0.5 + (0.5 + 2.0)) / 2)
    # delta 1: |1| >= 1 -> 1 (1 - 0.5) = 0.5; |0| -> 0; |-1| -> 0.5; |2| -> 1 (2 - 0.5) = 1.5
    assert lm.latent_loss(PRED, TARGET, "huber", delta=1.0).item() == pytest.approx((0.5 + (0.5 + 1.5)) / 2)


def test_huber_gradient_is_quadratic_for_small_errors_and_l1_for_large_ones():
    """Per channel: below delta the gradient is the error itself, above it delta sign(error), i.e. L1's. With 768
    standardised channels a whole-vector condition would never pick the quadratic branch, so Huber would be L1."""
    B, T, D = 2, 3, 768
    target = torch.randn(B, T, D)
    sign = torch.randint(2, (B, T, D)).float() * 2 - 1
    for err, expect in ((0.3 * sign, 0.3 * sign), (3.0 * sign, sign)):  # small: e; large: delta sign(e), delta 1
        grads = {}
        for kind in ("huber", "l1"):
            pred = (target + err).requires_grad_()
            lm.latent_loss(pred, target, kind, delta=1.0).backward()
            grads[kind] = pred.grad * (B * T)  # the loss is a mean over images and patches
        assert torch.allclose(grads["huber"], expect, atol=1e-5)
        assert torch.allclose(grads["l1"], sign, atol=1e-6)
    assert not torch.allclose(0.3 * sign, sign)  # small errors: Huber's gradient differs from L1's


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


def test_default_sim_weight_matches_the_official_2tau_scaling():
    """Ours: tau PatchDisc + 0.05 R. Official: 2 tau PatchDisc (cross-entropy x 2 tau) + 0.1 R. Ours is exactly half,
    so AdamW takes the same steps; the old default 0.1 doubled R's relative weight."""
    args = lm.build_parser().parse_args(["--data", "synthetic"])
    assert args.sim_weight == 0.05 and args.tau == 0.2
    torch.manual_seed(0)
    pred, target, vis, gamma = torch.randn(1, 6, 8), torch.randn(1, 6, 8), torch.randn(1, 3, 8), 0.75
    ours = (lm.patch_discrimination_loss(pred, target, args.tau)
            + args.sim_weight * lm.similarity_regularizer(pred, vis, gamma))
    p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    official_pd = F.cross_entropy((p @ t.transpose(1, 2) / 0.2).flatten(0, 1), torch.arange(6)) * (2 * 0.2)
    mean_cos = lambda z: (F.normalize(z, dim=-1) @ F.normalize(z, dim=-1).transpose(1, 2)).mean()
    r = (mean_cos(pred) - gamma) ** 2 + (mean_cos(vis) - gamma) ** 2
    assert r > 0.1  # R matters in this comparison
    assert ours.item() == pytest.approx((official_pd + 0.1 * r).item() / 2, rel=1e-5)


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


def cue_inputs():
    pos = get_2d_sincos_pos_embed(512, 14)  # the decoder's table for ViT-B/16: logits up to 256 / sqrt(512)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(196, generator=g)
    p_v, p_t = pos[perm[:20]][None], pos[perm[20:]][None]  # 20 visible, 176 targets
    return torch.randn(512, generator=g), p_t, p_v, torch.randn(1, 20, 512, generator=g)


def test_visual_cue_weights_stay_fp32_under_bf16_autocast():
    m, p_t, p_v, z_v = cue_inputs()
    ref_w = (p_t.double() @ p_v.double().transpose(1, 2) / math.sqrt(512)).softmax(-1)  # [1, 176, 20]
    ref_q = m.double() + p_t.double() + ref_w @ z_v.double()
    rel = lambda a, ref: ((a.double() - ref).norm() / ref.norm()).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, q = lm.visual_cue_weights(p_t, p_v), lm.visual_cue_queries(m, p_t, p_v, z_v)
        left_to_autocast = (p_t @ p_v.transpose(1, 2) / math.sqrt(512)).softmax(-1)  # the bf16 way
    assert w.dtype == q.dtype == torch.float32 and w.shape == (1, 176, 20)
    assert rel(w, ref_w) < 1e-5 and rel(q, ref_q) < 1e-5
    assert rel(left_to_autocast, ref_w) > 1e-2  # bf16 weights are off by a few per cent


def test_decoder_passes_fp32_positions_to_the_visual_cues(monkeypatch):
    """Under autocast the decoder's features are bf16, but the cue weights must see the fp32 position table."""
    torch.manual_seed(0)
    decoder = lm.CrossDecoder(64, 4, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    seen, real = {}, lm.visual_cue_queries

    def spy(*a):
        seen["args"], seen["q"] = a, real(*a)
        return seen["q"]
    monkeypatch.setattr(lm, "visual_cue_queries", spy)
    vis_ids, mask_ids = torch.tensor([[0, 5, 9]]), torch.tensor([[1, 2, 3, 4, 6, 7, 8, 10, 11, 12, 13, 14, 15]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = decoder(torch.randn(1, 4, 64), vis_ids, mask_ids)
    (m, p_t, p_v, z_v), q = seen["args"], seen["q"]
    table = decoder.pos_embed[0, 1:]  # [16, 32] fp32
    assert torch.equal(p_t[0], table[mask_ids[0]]) and torch.equal(p_v[0], table[vis_ids[0]])
    assert q.dtype == torch.float32 and out.shape == (1, 13, 64)
    assert torch.equal(m, decoder.mask_token)


@pytest.mark.parametrize("kind", lm.DECODERS)
def test_decoders_are_mae_decoders_with_zero_mask_token_and_the_old_keys(kind):
    """'self' is common's MAEDecoder, 'cross' / 'cross-cues' its cross-attention subclass; all predict the online
    width, start the mask token at zero (official code) and keep the checkpoint keys embed / mask_token /
    (query_token) / blocks / norm / head; the position table is rebuilt, not saved."""
    torch.manual_seed(0)
    decoder = micro_model("--decoder", kind).decoder
    assert isinstance(decoder, MAEDecoder) and isinstance(decoder, lm.CrossDecoder) == (kind != "self")
    assert torch.count_nonzero(decoder.mask_token) == 0 and decoder.head.out_features == 64
    cross = kind != "self"
    prefixes = {k.split(".")[0] for k in decoder.state_dict()}
    assert prefixes == {"embed", "mask_token", "blocks", "norm", "head"} | ({"query_token"} if cross else set())
    assert type(decoder.blocks[0]) is (lm.CrossBlock if cross else Block)
    if cross:
        assert decoder.cues == (kind == "cross-cues") and 0.01 < decoder.query_token.std() < 0.03


# ------------------------------------------------------------------------------------------- model and training
@pytest.mark.parametrize("target,decoder,proj", [("momentum", "cross-cues", "mlp"), ("independent", "self", "mlp"),
                                                 ("joint", "cross", "none"), ("shared-stopgrad", "cross-cues", "mlp")])
def test_gradients_reach_every_trainable_parameter_and_no_target_one(target, decoder, proj):
    torch.manual_seed(0)
    model = micro_model("--target", target, "--decoder", decoder, "--proj", proj)
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
    model = micro_model()
    pairs = lambda enc, proj: dict(enc.named_parameters()) | {f"proj.{n}": p for n, p in proj.named_parameters()}
    online, target = pairs(model.encoder, model.proj), pairs(model.target_encoder, model.target_proj)
    assert all(torch.equal(online[k], target[k]) for k in online)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(2, 3, 40, 40), step_rng(2))[0].backward()
    opt.step()
    before = {k: v.detach().clone() for k, v in target.items()}
    assert not all(torch.equal(online[k], before[k]) for k in online)  # the optimizer moved the online encoder only
    model.update_teacher(0.9)
    for k in online:
        assert torch.allclose(target[k], 0.9 * before[k] + 0.1 * online[k], atol=1e-6), k


def test_cli_validation():
    """Each bad flag is a ValueError before training: from the model's constructor (the encoder's sizes, the mask
    ratio, the gap, tau, the decoder's width) or from check_args (the crop size against the model's grid)."""
    for bad in (["--mask-ratio", "1.0"], ["--mask-ratio", "0.99"], ["--crop-size", "32"], ["--input-size", "36"],
                ["--gap", "-1"], ["--tau", "0"], ["--decoder-dim", "30"], ["--model", "nano"]):
        with pytest.raises(ValueError):
            micro_model(*bad)
    with pytest.raises(ValueError, match="inconsistent"):
        micro_args("--crop-size", "32")
    assert micro_args("--crop-size", "40").crop_size == 40
    with pytest.raises(ValueError):
        lm.LatentMIM(model="micro", input_size=32, decoder="crosss")  # the model's own arguments are checked too


def test_training_steps_lower_the_default_loss():
    """PatchDisc + R, AdamW and EMA steps on one batch of synthetic images: the loss falls step after step."""
    args = micro_args()
    torch.manual_seed(0)
    model, data = lm.build_model(args), lm.train_dataset(args)
    imgs = torch.stack([data[i, i][0] for i in range(8)])  # [8, 3, 40, 40]
    opt = build_adamw(model, 0.05, 2e-3, lm.no_weight_decay)
    losses = []
    for _ in range(12):
        loss, _ = model(imgs, step_rng(8))
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_teacher(0.99)
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0] and losses[-1] < min(losses[:6])


def test_main_run_logs_and_exports_the_online_encoder(tmp_path):
    args = lm.build_parser().parse_args(MICRO + [
        "--output-dir", str(tmp_path), "--synthetic-size", "32", "--batch-size", "8", "--accum", "1", "--epochs", "3",
        "--warmup-epochs", "0", "--lr", "1e-3", "--loss", "mse", "--log-every", "1"])
    lm.main(args)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert {"loss", "lr", "momentum", "gamma", "sim_pred", "sim_vis", "sim_target"} <= set(rows[0])
    assert rows[-1]["momentum"] > rows[0]["momentum"] >= 0.99 and rows[-1]["gamma"] < rows[0]["gamma"] <= 0.75
    vit = load_vit(tmp_path / "checkpoint.pth")
    assert vit.config["img_size"] == 32  # the evaluation grid, gap 0
    state = load_checkpoint(tmp_path / "checkpoint.pth")["model"]
    for n, q in vit.state_dict().items():  # the online encoder, not its EMA target
        assert torch.equal(state[f"encoder.{n}"], q), n
    assert not all(torch.equal(state[f"target_encoder.{n}"], q) for n, q in vit.state_dict().items())


def test_no_weight_decay_names():
    """The official groups (timm, names with 'bias' / 'norm' / 'embed' undecayed), mapped onto our names, for the
    default ViT-B/16 model; the frozen momentum target is in no group."""
    args = lm.build_parser().parse_args(["--data", "synthetic"])
    model = lm.build_model(args)
    lm.check_args(args, model)
    enc = [f"encoder.blocks.{i}.{n}" for i in range(12) for n in (
        "norm1.weight", "norm1.bias", "attn.qkv.bias", "attn.proj.bias", "norm2.weight", "norm2.bias",
        "mlp.fc1.bias", "mlp.fc2.bias")]
    enc += ["encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias", "encoder.norm.weight",
            "encoder.norm.bias"]
    proj = [f"proj.{i}.{w}" for i in (1, 4, 7) for w in ("weight", "bias")]  # the projector's 3 LayerNorms
    dec = [f"decoder.blocks.{i}.{n}" for i in range(3) for n in (
        "norm1.weight", "norm1.bias", "self_attn.qkv.bias", "self_attn.proj.bias", "norm2q.weight", "norm2q.bias",
        "norm2kv.weight", "norm2kv.bias", "cross_attn.q_proj.bias", "cross_attn.kv_proj.bias", "cross_attn.proj.bias",
        "norm3.weight", "norm3.bias", "mlp.fc1.bias", "mlp.fc2.bias")]
    dec += ["decoder.embed.weight", "decoder.embed.bias", "decoder.norm.weight", "decoder.norm.bias",
            "decoder.head.bias"]
    expect = set(enc + proj + dec)
    assert len(expect) == 12 * 8 + 4 + 6 + 3 * 15 + 5
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = build_adamw(model, 0.05, 1e-4, lm.no_weight_decay).param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert {names[id(p)] for p in no_decay["params"]} == expect
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"encoder.cls_token", "decoder.mask_token", "decoder.query_token", "proj.3.weight",
            "decoder.head.weight", "decoder.blocks.2.cross_attn.kv_proj.weight"} <= decayed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | expect == trainable and not decayed & expect
    assert not any(n.startswith("target_") for n in trainable)


def test_full_default_vit_b16_step_on_cpu():
    """The paper's recipe as the defaults: ViT-B/16, 280 px with gap 4, 20 visible / 176 targets, projector,
    3-block cross-attention decoder with visual cues, PatchDisc + R; one optimizer step and EMA update, batch 2."""
    d = lm.build_parser().parse_args(["--data", "synthetic"])
    recipe = (d.epochs, d.warmup_epochs, d.blr, d.batch_size * 8 * d.accum, d.min_lr_frac)
    assert recipe == (800, 40, 1.5e-4, 4096, 0.25)
    args = lm.build_parser().parse_args(["--data", "synthetic", "--batch-size", "2"])
    torch.manual_seed(0)
    model = lm.build_model(args)
    lm.check_args(args, model)
    assert (model.encoder.embed_dim, len(model.encoder.blocks), model.patch, model.crop) == (768, 12, 16, 280)
    assert (model.num_visible, model.num_patches, model.loss_kind, model.sim_weight) == (20, 196, "patchdisc", 0.05)
    assert model.proj[3].weight.shape == (4096, 4096) and len(model.decoder.blocks) == 3
    assert isinstance(model.decoder, lm.CrossDecoder) and model.decoder.cues and model.decoder.embed.out_features == 512
    opt = build_adamw(model, 0.05, 1e-4, lm.no_weight_decay)
    loss, metrics = model(torch.randn(2, 3, 280, 280), step_rng(2))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    w = model.target_encoder.blocks[0].attn.qkv.weight
    before = w.detach().clone()
    opt.step()
    model.update_teacher(0.99)
    online = model.encoder.blocks[0].attn.qkv.weight
    assert torch.allclose(w, 0.99 * before + 0.01 * online, atol=1e-7) and not torch.equal(w, before)


def test_every_ablation_row_of_the_docs_runs_r_only_where_the_row_says_so(root):
    """docs/latent_mim.md's ablation table, parsed: each row's flags on its recipe (B1 = --recipe in100-b1, B2 =
    --recipe in100-b2, else --recipe in100) give the official setting (configs/lmim.yaml: avg_sim_coeff 0), with the
    similarity regulariser R on only in the row whose sim column says yes."""
    text = (root / "docs" / "latent_mim.md").read_text()
    assert "latent_mim.py --data /imagenet100 --recipe in100 " in text  # the command the rows are run with
    rows = [line.split("|")[1:4] for line in text.splitlines() if line.startswith("| ")
            and line.split("|")[1].strip() in ("collapse", "loss", "mask / gap / sim", "decoder")]
    assert len(rows) == 17  # 4 collapse, 4 loss, 4 mask / gap / sim and 5 decoder rows
    for table, row, flags in rows:
        flags = flags.strip().strip("`") if "`" in flags else ""
        base = {"B1": "in100-b1", "B2": "in100-b2"}.get(flags.split(" ")[0], "in100")
        flags = flags.removeprefix("B1").removeprefix("B2").split("`")[0].split()
        args = lm.build_parser().parse_args(["--data", "synthetic", "--recipe", base, *flags])
        assert (args.epochs, args.warmup_epochs, args.batch_size * 8 * args.accum) == (300, 30, 4096), row
        expected = 0.05 if table.strip() == "mask / gap / sim" and row.strip().endswith("yes") else 0.0
        assert args.sim_weight == expected, (table, row)
