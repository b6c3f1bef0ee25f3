"""SemMAE: the paper's equations against hand values, the masking algorithm against a per-image loop, part maps that
follow the augmentation, and both stages end to end on tiny synthetic data."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import semmae
from common import StepRandom, build_adamw, build_dataset, build_vit
from figures import denormalize
from train_utils import encoder_export, load_checkpoint, save_checkpoint
from conftest import step_rng

TINY = ["--model", "micro", "--input-size", "32", "--num-workers", "0", "--batch-size", "8", "--synthetic-size", "16",
        "--warmup-epochs", "0", "--seed", "0"]


# ------------------------------------------------------------------------------------------------------ equations
def test_diversity_loss_hand_values():
    n, hw = 4, 10
    identical = torch.rand(1, 1, hw).expand(2, n, hw)
    # cos = 1 everywhere: the N^2 - N off-diagonal terms give 1 each, the diagonal 0 -> (N^2 - N) / N^2
    assert semmae.diversity_loss(identical).item() == pytest.approx(1 - 1 / n, abs=1e-6)
    orthogonal = torch.zeros(2, n, hw)
    for i in range(n):
        orthogonal[:, i, 2 * i:2 * i + 2] = torch.rand(2)  # disjoint supports
    assert semmae.diversity_loss(orthogonal).item() == pytest.approx(0.0, abs=1e-7)
    # m1 = (1, 0), m2 = (1, 1): cos = 1/sqrt(2), two off-diagonal terms of 1/2 -> 1 / 2^2 = 0.25
    two = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert semmae.diversity_loss(two).item() == pytest.approx(0.25, abs=1e-6)
    # averaged over the batch: (0.25 + 0) / 2
    both = torch.cat([two, torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])])
    assert semmae.diversity_loss(both).item() == pytest.approx(0.125, abs=1e-6)
    assert semmae.part_objective(torch.tensor(0.5), torch.tensor(0.25), 2.0).item() == 1.0


def test_alpha_schedule_first_and_last_epoch():
    assert semmae.alpha_schedule(0, 800) == pytest.approx((1 / 800) ** 2)
    assert semmae.alpha_schedule(799, 800) == 1.0
    assert semmae.alpha_schedule(399, 800, gamma=1.0) == 0.5
    assert semmae.alpha_schedule(0, 4, gamma=0.5) == pytest.approx(0.5)
    args = semmae.build_parser().parse_args(["pretrain", "--data", "synthetic", "--epochs", "4"])
    assert args.gamma == 2.0 and args.mask_ratio == 0.75 and args.blr == 1.5e-4 and args.epochs == 4
    assert [semmae.alpha_for_epoch(args, e) for e in range(4)] == [1 / 16, 1 / 4, 9 / 16, 1.0]
    args.alpha_schedule = "reverse"
    assert semmae.alpha_for_epoch(args, 0) == 15 / 16 and semmae.alpha_for_epoch(args, 3) == 0.0
    args.alpha_schedule = "const1"
    assert semmae.alpha_for_epoch(args, 0) == 1.0
    # the official engine's lines, as alpha = 1 - mask_lambda with T = 4: its commented-out 'reverse' mask_lambda = t/T
    # is `reverse` with --gamma 1; its first upload's cosine line is `cosine`
    args.alpha_schedule, args.gamma = "reverse", 1.0
    assert [semmae.alpha_for_epoch(args, e) for e in range(4)] == [3 / 4, 1 / 2, 1 / 4, 0.0]
    args.alpha_schedule = "cosine"
    half_sqrt2 = 0.5 * math.sqrt(0.5)  # cos(pi / 4) / 2
    assert [semmae.alpha_for_epoch(args, e) for e in range(4)] == pytest.approx([0.5 - half_sqrt2, 0.5,
                                                                                0.5 + half_sqrt2, 1.0])


def test_part_mask_counts_settings():
    sizes = torch.tensor([[6, 10, 3, 5, 0], [20, 1, 1, 1, 1]])  # L = 24 each, r L = 18
    n0 = semmae.part_mask_counts(sizes, 0.75, 0.0, step_rng(2))
    # setting 1: round(0.75 a_k), half to even: 4.5 -> 4, 7.5 -> 8, 2.25 -> 2, 3.75 -> 4
    assert n0.tolist() == [[4, 8, 2, 4, 0], [15, 1, 1, 1, 1]]
    orders = set()
    for step in range(20):
        n1 = semmae.part_mask_counts(sizes, 0.75, 1.0, step_rng(2, step))
        assert n1.sum(1).tolist() == [18, 18]  # setting 2 uses the whole budget floor(r L)
        partial = ((n1 > 0) & (n1 < sizes)).sum(1)
        assert (partial <= 1).all() and (n1 <= sizes).all()
        orders.add(tuple(n1[0].tolist()))
    assert len(orders) > 1  # the parts are visited in a random order, drawn from the step's rng
    # the blend of the two settings is checked against the per-image reference below (alpha 0.3, 0.5, 0.8)


def reference_masking(part_ids, mask_ratio, alpha, num_parts, rng):
    """The official algorithm, one image at a time with Python lists (same random draws from the StepRandom rng:
    the patch permutation, then the order in which setting 2 visits the parts)."""
    b, n = part_ids.shape
    visible_count = int(n * (1 - mask_ratio))
    perm_all = rng.rand(n).argsort(1)
    order_all = rng.rand(num_parts).argsort(1)
    out = []
    for img in range(b):
        perm = perm_all[img].tolist()
        ids = [int(part_ids[img, i]) for i in perm]
        sizes = [ids.count(k) for k in range(num_parts)]
        n1 = [torch.round(torch.tensor(mask_ratio * a)) for a in sizes]
        n2, used = [0] * num_parts, 0
        for k in order_all[img].tolist():  # whole parts in random order until the budget is spent
            room = torch.tensor(n * mask_ratio) - used  # official: float L*r minus the long sizes -> float32 tensor
            n2[k] = min(sizes[k], max(0, int(room)))  # .to(torch.long): truncation
            used += sizes[k]
        counts = [int(torch.round((1 - alpha) * n1[k].float() + alpha * torch.tensor(float(n2[k]))))
                  for k in range(num_parts)]
        seen, masked = [0] * num_parts, []
        for pos, k in enumerate(ids):
            seen[k] += 1
            masked.append(seen[k] <= counts[k])
        order = [perm[p] for p in range(n) if not masked[p]] + [perm[p] for p in range(n) if masked[p]]
        out.append((sorted(order[:visible_count]), sorted(order[visible_count:])))
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("ratio", [0.75, 0.9])  # 49 * 0.9 = 44.1: floor 44, not 49 - int(49 * 0.1) = 45
def test_semantic_guided_masking_matches_reference(alpha, ratio):
    g = torch.Generator().manual_seed(1)
    part_ids = torch.randint(0, 4, (6, 49), generator=g)  # part 4 of 5 is empty
    part_ids[0, :30] = 0  # a dominant part
    vis_ids, mask_ids = semmae.semantic_guided_masking(part_ids, ratio, alpha, step_rng(6, 7), num_parts=5)
    ref = reference_masking(part_ids, ratio, alpha, 5, step_rng(6, 7))
    for img, (rv, rm) in enumerate(ref):
        assert sorted(vis_ids[img].tolist()) == rv and sorted(mask_ids[img].tolist()) == rm


def test_setting2_budget_is_official_floor_at_ratio_09(monkeypatch):
    # L = 196, r = 0.9: the official setting 2 masks floor(176.4) = 176; 196 - int(196 * 0.1) = 177 is off by one
    assert semmae.setting2_budget(196, 0.9) == 176 and 196 - int(196 * (1 - 0.9)) == 177
    assert semmae.setting2_budget(196, 0.75) == 147 and semmae.setting2_budget(49, 0.75) == 36
    # float32 like the official expression: 100 * 0.29 = 28.999999999999996 as a double, 29.0 as float32
    assert semmae.setting2_budget(100, 0.29) == 29 and math.floor(100 * 0.29) == 28
    assert semmae.setting2_budget(torch.tensor([[196], [100]]), 0.9).tolist() == [[176], [90]]
    sizes = torch.tensor([[50, 40, 36, 30, 20, 20], [100, 60, 20, 10, 5, 1]])  # L = 196 each
    for step in range(10):
        n2 = semmae.part_mask_counts(sizes, 0.9, 1.0, step_rng(2, step))
        assert n2.sum(1).tolist() == [176, 176] and (n2 <= sizes).all()
    # inside semantic_guided_masking: setting 2 gets 176, then exactly int(196 * 0.1) = 19 patches stay visible
    seen, counts = [], semmae.part_mask_counts

    def spy(*args, **kwargs):
        seen.append((kwargs["budget"], counts(*args, **kwargs)))
        return seen[-1][1]
    monkeypatch.setattr(semmae, "part_mask_counts", spy)
    part_ids = torch.randint(0, 6, (4, 196), generator=torch.Generator().manual_seed(0))
    vis_ids, mask_ids = semmae.semantic_guided_masking(part_ids, 0.9, 1.0, step_rng(4, 1), num_parts=6)
    assert seen[0][0] == 176 and seen[0][1].sum(1).tolist() == [176] * 4
    assert vis_ids.shape == (4, 19) and mask_ids.shape == (4, 177)
    model = semmae.SemMAE(build_vit("micro", img_size=32), 4, 0.9, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    assert model.budget == 14  # L = 16: floor(14.4), where 16 - int(1.6) = 15


def test_visible_count_exact_for_every_alpha():
    g = torch.Generator().manual_seed(2)
    for n, r in [(49, 0.75), (64, 0.75), (100, 0.29), (16, 0.5), (196, 0.9)]:
        part_ids = torch.randint(0, 6, (5, n), generator=g)
        for step, alpha in enumerate(torch.linspace(0, 1, 11).tolist()):
            vis_ids, mask_ids = semmae.semantic_guided_masking(part_ids, r, alpha, step_rng(5, step), num_parts=6)
            assert vis_ids.shape == (5, int(n * (1 - r))) and mask_ids.shape == (5, n - int(n * (1 - r)))
            assert (torch.cat([vis_ids, mask_ids], 1).sort(1).values == torch.arange(n)).all()  # a partition
    # the noise comes from the step's StepRandom: a batch split over processes (or micro-steps) gets the rows of
    # the masks of the whole batch, so DDP and accumulation mask exactly as one process does
    part_ids = torch.randint(0, 6, (4, 49), generator=g)
    whole = semmae.semantic_guided_masking(part_ids, 0.75, 0.4, step_rng(4, 3, seed=5), num_parts=6)
    halves = [semmae.semantic_guided_masking(part_ids[rows], 0.75, 0.4,
                                             StepRandom(5, 3, torch.device("cpu"), rows, 4), num_parts=6)
              for rows in (slice(0, 2), slice(2, 4))]
    for i in range(2):
        assert torch.equal(torch.cat([h[i] for h in halves]), whole[i])


def per_part(ids, chosen, k):
    return F.one_hot(ids.gather(1, chosen), k).sum(1)  # [B, K] patches of each part among `chosen`


def test_alpha_one_masks_whole_parts_and_alpha_zero_every_part():
    g = torch.Generator().manual_seed(3)
    part_ids = torch.randint(0, 5, (16, 64), generator=g)
    sizes = F.one_hot(part_ids, 5).sum(1)
    _, mask_ids = semmae.semantic_guided_masking(part_ids, 0.75, 1.0, step_rng(16), num_parts=5)
    masked = per_part(part_ids, mask_ids, 5)
    whole_or_none = (masked == 0) | (masked == sizes)
    assert ((~whole_or_none).sum(1) <= 1).all()  # at most one partially masked part per image
    # alpha = 0: round(r a_k) in every part (a layout where these add up to the budget r L = 12 of L = 16)
    part_ids = torch.tensor([[0] * 8 + [1] * 4 + [2] * 4]).repeat(8, 1)
    part_ids = part_ids.gather(1, torch.rand(8, 16, generator=g).argsort(1))  # scattered over the grid
    _, mask_ids = semmae.semantic_guided_masking(part_ids, 0.75, 0.0, step_rng(8), num_parts=3)
    assert (per_part(part_ids, mask_ids, 3) == torch.tensor([6, 3, 3])).all()


# ----------------------------------------------------------------------------------------------- part maps and data
def test_part_map_follows_crop_and_flip():
    size, patch, grid = 32, 8, 8
    part_map = (torch.arange(grid)[None, :] // 2 + 4 * (torch.arange(grid)[:, None] // 4)).to(torch.uint8)  # 8 parts
    levels = torch.linspace(0, 255, 8).round()
    img = levels[F.interpolate(part_map[None, None].float(), size=(48, 48), mode="nearest-exact")[0, 0].long()]
    img = img.expand(3, -1, -1).to(torch.uint8)  # the image shows its own part map as grey levels
    per_pixel, per_patch = semmae.joint_transform(size, 1, 8), semmae.joint_transform(size, patch, 8)
    flipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out, pixel_ids, _ = per_pixel(img, part_map, 0)  # "patches" of 1 pixel: the transformed map itself
        torch.manual_seed(seed)
        _, ids, _ = per_patch(img, part_map, 0)
        grey = denormalize(out)[0] * 255  # [S, S]
        from_img = (grey[:, :, None] - levels).abs().argmin(-1)  # part read back from the pixels
        labels = pixel_ids.view(1, 1, size, size).float()
        border = F.max_pool2d(labels, 5, 1, 2) != -F.max_pool2d(-labels, 5, 1, 2)  # within 2 px of another part
        assert (from_img.flatten() == pixel_ids)[~border.flatten()].all()  # bicubic only blurs the borders
        assert (from_img.flatten() == pixel_ids).float().mean() >= 0.85
        votes = F.one_hot(pixel_ids.view(size, size), 8).permute(2, 0, 1).float()
        assert torch.equal(F.avg_pool2d(votes, patch).argmax(0).flatten(), ids)  # majority part of each patch
        flipped += int(from_img[0, 0] > from_img[0, -1])  # parts grow to the right unless the map was flipped
    assert 0 < flipped < 12  # both flipped and unflipped crops were checked


def teacher_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "teacher.pth"
    save_checkpoint(path, encoder_export(build_vit("micro", img_size=32), "test"))
    return path


def test_stage_a_lowers_loss():
    torch.manual_seed(0)
    model = semmae.PartLearner(build_vit("micro", img_size=32), num_parts=4, channels=32)
    base = build_dataset("synthetic", "train", size=32, length=8)
    imgs = torch.stack([semmae.part_transform(32, False)(base.load(i)[0]) for i in range(8)])
    opt = build_adamw(model, 0.05, 3e-3, semmae.no_weight_decay)
    losses = []
    for _ in range(12):
        loss, metrics = model(imgs)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert not any(p.requires_grad for p in model.teacher.parameters())


class FixedTeacher(nn.Module):
    """Stands in for a ViT teacher: always the same tokens [B, 1+L, D]."""
    def __init__(self, tokens, grid, img_size):
        super().__init__()
        self.register_buffer("tokens", tokens)
        self.embed_dim, self.grid_size, self.config = tokens.shape[-1], grid, {"img_size": img_size}

    def forward(self, imgs):
        return self.tokens.expand(imgs.shape[0], -1, -1)


def test_part_ids_from_fp32_maps_under_autocast():
    # part tokens p0 = (0, 2, 0, 0), p1 = (0, 2.002, 0, 0), p2 = 0; cls = e_0, patch l = (0, 1 + l/16, 0, 0):
    # logits s_l, 1.001 s_l, 0 -> part 1 wins every patch by a hair; in bf16 2.002 rounds to 2, p0 = p1 exactly,
    # and argmax would take part 0 on the tie
    patches = torch.zeros(16, 4)
    patches[:, 1] = 1 + torch.arange(16) / 16
    tokens = torch.cat([torch.tensor([[1.0, 0, 0, 0]]), patches])[None]  # [1, 17, 4]
    model = semmae.PartLearner(FixedTeacher(tokens, 4, 16), num_parts=3, channels=8)
    with torch.no_grad():
        model.part_tokens.weight.zero_()
        model.part_tokens.bias.copy_(torch.tensor([0, 2, 0, 0, 0, 2.002, 0, 0, 0, 0, 0, 0]))
    imgs = torch.zeros(2, 3, 16, 16)
    fp32 = model.maps(imgs)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls, maps = model.maps(imgs)
        ids = maps.argmax(1)  # as extract_parts
    assert maps.dtype == torch.float32 and cls.dtype == torch.float32
    assert torch.equal(ids, torch.ones(2, 4, 4, dtype=torch.long)) and torch.equal(fp32.argmax(1), ids)
    assert torch.allclose(maps, fp32) and torch.allclose(maps.sum(1), torch.ones(2, 4, 4))  # blurred softmax


def test_no_weight_decay_names():
    args = semmae.build_parser().parse_args(["pretrain", "--data", "synthetic"])
    torch.manual_seed(0)
    model = semmae.build_model(args, 6)  # ViT-B/16, 224 px, decoder 8 x 512
    block = ["norm1.weight", "norm1.bias", "attn.qkv.bias", "attn.proj.bias", "norm2.weight", "norm2.bias",
             "mlp.fc1.bias", "mlp.fc2.bias"]
    expected = ({f"encoder.blocks.{i}.{n}" for i in range(12) for n in block} |
                {f"decoder.blocks.{i}.{n}" for i in range(8) for n in block} |
                {"encoder.patch_embed.proj.bias", "encoder.norm.weight", "encoder.norm.bias", "decoder.embed.bias",
                 "decoder.norm.weight", "decoder.norm.bias", "decoder.head.bias"})
    names = dict(model.named_parameters())
    skipped = {n for n, p in names.items() if semmae.no_weight_decay(n, p)}
    assert skipped == expected and len(expected) == 12 * 8 + 8 * 8 + 7
    decayed = set(names) - skipped  # cls and mask tokens, patch embedding, every Linear weight
    assert {"encoder.cls_token", "decoder.mask_token", "encoder.patch_embed.proj.weight"} <= decayed
    assert len(decayed) == 3 + 20 * 4 + 2  # + qkv, proj, fc1, fc2 weights per block, decoder.embed, decoder.head
    assert "encoder.pos_embed" not in names and "decoder.pos_embed" not in names  # fixed sin-cos buffers
    groups = build_adamw(model, 0.05, 1e-4, semmae.no_weight_decay).param_groups
    by_id = {id(p): n for n, p in names.items()}
    assert {g["weight_decay"]: {by_id[id(p)] for p in g["params"]} for g in groups} == {0.05: decayed, 0.0: expected}


def test_stage_a_writes_parts_that_stage_b_reads(tmp_path):
    teacher = teacher_file(tmp_path)
    parts = tmp_path / "parts.pt"
    semmae.main(semmae.build_parser().parse_args(
        ["parts", "--data", "synthetic", "--teacher", str(teacher), "--out", str(parts), "--epochs", "2",
         "--num-parts", "4", "--dec-channels", "16", "--output-dir", str(tmp_path / "a"), "--lr", "3e-3", *TINY]))
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert log[-1]["loss"] < log[0]["loss"] and math.isfinite(log[-1]["l_div"])
    saved = torch.load(parts, weights_only=True)
    assert saved["part_ids"].dtype == torch.uint8 and saved["part_ids"].shape == (16, 4, 4)
    assert saved["paths"] == [f"synthetic:0:{i}" for i in range(16)] and saved["num_parts"] == 4
    assert int(saved["part_ids"].max()) < 4 and (tmp_path / "parts_preview.png").is_file()

    out = tmp_path / "b"
    common = ["--data", "synthetic", "--parts", str(parts), "--decoder-dim", "32", "--decoder-depth", "1",
              "--decoder-heads", "2", "--output-dir", str(out), *TINY]
    semmae.main(semmae.build_parser().parse_args(["pretrain", "--epochs", "2", *common]))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [row["alpha"] for row in log] == [0.25, 1.0]  # (t / T)^2, t = 1, 2, T = 2
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["method"] == "semmae" and ckpt["step"] == 4 and ckpt["encoder_args"]["patch_size"] == 8

    vis = tmp_path / "masks.png"
    semmae.main(semmae.build_parser().parse_args(["pretrain", "--epochs", "2", "--vis", str(vis), *common]))
    from PIL import Image
    # 4 images x (image, parts, 3 masks), 32 px x4, 1 px pad, under a 16 px strip of column labels
    assert Image.open(vis).size == (5 * 129 + 1, 16 + 4 * 129 + 1)

    # a parts file of another dataset is refused with one clear line
    with pytest.raises(ValueError, match="parts for 16 images but the dataset has 24"):
        semmae.main(semmae.build_parser().parse_args(["pretrain", "--epochs", "1", *common, "--synthetic-size", "24"]))
    with pytest.raises(ValueError, match="does not match the dataset"):
        semmae.main(semmae.build_parser().parse_args(["pretrain", "--epochs", "1", *common, "--seed", "1"]))


def test_stage_b_steps_lower_loss():
    torch.manual_seed(0)
    model = semmae.SemMAE(build_vit("micro", img_size=32), num_parts=4, decoder_dim=32, decoder_depth=1,
                          decoder_heads=2)
    base = build_dataset("synthetic", "train", size=32, length=8)
    imgs = torch.stack([semmae.part_transform(32, False)(base.load(i)[0]) for i in range(8)])
    part_ids = torch.randint(0, 4, (8, 16), generator=torch.Generator().manual_seed(0))
    opt = build_adamw(model, 0.05, 2e-3, semmae.no_weight_decay)
    model.alpha.fill_(0.5)
    losses = []
    for step in range(15):
        loss, _ = model(imgs, step_rng(8, step), part_ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3


def test_bad_flags():
    parse = semmae.build_parser().parse_args
    with pytest.raises(ValueError, match="mask-ratio"):
        semmae.main(parse(["pretrain", "--data", "synthetic", "--masking", "random", "--mask-ratio", "1.0"]))
    with pytest.raises(ValueError, match="needs --parts"):
        semmae.main(parse(["pretrain", "--data", "synthetic"]))
    with pytest.raises(SystemExit):
        parse(["parts", "--data", "synthetic"])  # --teacher is required
