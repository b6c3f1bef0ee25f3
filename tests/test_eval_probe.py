"""Tests of eval_probe.py: k-NN votes, LARS, the probe loop, feature pools, and end-to-end evaluation of checkpoints
(this project's format written by each training script after a couple of steps, and public timm / MAE layouts).
To test another kind of checkpoint, add a maker to CHECKPOINT_MAKERS: tmp_path -> (checkpoint path, extra eval_probe
flags, reference encoder)."""
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch

import common
import train_utils
import cli
import eval_probe as ep
import eval_utils as eu
from conftest import run_inprocess, write_parts_file

SIZE, N_TRAIN = 32, 48  # micro ViT at 32 px: 4 x 4 patches; --data synthetic with 48 train / 12 val images
CPU = train_utils.Dist("cpu")  # one process



def probe(ckpt, *flags, output=None):
    args = ["--ckpt", str(ckpt), "--data", "synthetic", "--synthetic-size", str(N_TRAIN), "--num-workers", "0",
            "--batch-size", "16", "--device", "cpu", *flags]
    if output:
        args += ["--output", str(output)]
    return ep.main(ep.build_parser().parse_args(args))


# ------------------------------------------------------------------------------------------------------------- k-NN
def test_knn_weighted_vote_matches_hand_computation():
    # one class-0 neighbour at cos 1 and two class-1 neighbours at cos 0.8 (features deliberately not unit length)
    train = torch.tensor([[2.0, 0.0], [0.8, 0.6], [1.6, -1.2], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    test = torch.tensor([[3.0, 0.0]])
    votes = ep.knn_votes(train, labels, test, [1, 3], temperature=0.07, num_classes=3)
    assert torch.allclose(votes[3], torch.tensor([[math.exp(1 / 0.07), 2 * math.exp(0.8 / 0.07), 0.0]]), rtol=1e-4)
    assert torch.allclose(votes[1], torch.tensor([[math.exp(1 / 0.07), 0.0, 0.0]]), rtol=1e-4)
    # T = 0.07: the close neighbour outweighs the majority; T = 1: e^1 < 2 e^0.8, the majority wins
    predict = lambda test, k, t=0.07: ep.knn_votes(train, labels, test, [k], t, num_classes=3)[k].argmax(1).tolist()
    assert predict(test, 3) == [0]
    assert predict(test, 3, 1.0) == [1]
    assert predict(torch.tensor([[-5.0, 0.1], [0.9, 0.7]]), 1) == [2, 1]


def test_knn_leave_one_out_and_topk():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 1, 0])  # each nearest other sample has the other label
    votes = ep.knn_votes(feats, labels, feats, [1], exclude_self=True)[1]
    assert votes.argmax(1).tolist() == [1, 0, 0, 1]
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.3, 0.4], [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    assert eu.topk_correct(scores, torch.tensor([2, 5])) == [0, 1]  # label 2 is 4th of row 0; label 5 last of row 1
    assert eu.accuracy(scores, torch.tensor([1, 5])) == (50.0, 50.0)


def test_knn_top5_counts_the_first_min_5_k_predictions():
    # six training features at angles 0, 0.1, ..., 0.5 rad from the test feature: the neighbours come in that order,
    # with weights exp(cos / T) decreasing; the test feature is repeated once with each label
    angles = torch.arange(6) * 0.1
    train, test, truth = torch.stack([angles.cos(), angles.sin()], 1), torch.tensor([[1.0, 0.0]]).repeat(6, 1), \
        torch.arange(6)
    votes = ep.knn_votes(train, torch.tensor([2, 4, 1, 0, 3, 5]), test, [1, 3, 5], num_classes=6)
    assert eu.topk_correct(votes[1], truth, max_rank=1) == [1, 1]  # k = 1: top-5 = top-1 (label 2 only)
    assert eu.topk_correct(votes[3], truth, max_rank=3) == [1, 3]  # voted 2 > 4 > 1; not the zero-vote 0, 3, 5
    assert eu.topk_correct(votes[5], truth, max_rank=5) == [1, 5]  # every label but 5 (the 6th neighbour's)
    assert eu.accuracy(votes[3], truth, max_rank=3) == pytest.approx((100 / 6, 50.0))
    assert eu.topk_correct(votes[3], truth) == [1, 5]  # a plain top-5 lets two zero-vote classes in
    # two classes voted among 3 neighbours (2 gets w1 + w3 > w2 of 4): DINO's 3rd prediction is a zero-vote class,
    # here the lowest index, 0 (ties in class order)
    votes = ep.knn_votes(train, torch.tensor([2, 4, 2, 1, 3, 5]), test, [3], num_classes=6)[3]
    assert eu.label_rank(votes, truth).tolist() == [2, 3, 0, 4, 1, 5]
    assert eu.topk_correct(votes, truth, max_rank=3) == [1, 3]  # labels 2, 4, 0


# ------------------------------------------------------------------------------------------------------------- LARS
def test_lars_two_steps_match_hand_computation():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = ep.LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    gw1, gb1 = torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([0.2, 0.4])
    w.grad, b.grad = gw1.clone(), gb1.clone()
    opt.step()
    d1 = gw1 + 0.1 * torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # weight decay only on the 2-D parameter
    d1 = d1 * (0.001 * 5.0 / d1.norm())  # trust ratio eta ||w|| / ||d||
    w1 = torch.tensor([[3.0, 4.0], [0.0, 0.0]]) - 0.5 * d1
    b1 = torch.tensor([1.0, -1.0]) - 0.5 * gb1  # 1-D: plain SGD step, no decay, no trust ratio
    assert torch.allclose(w.detach(), w1) and torch.allclose(b.detach(), b1)
    gw2, gb2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([-0.1, 0.3])
    w.grad, b.grad = gw2.clone(), gb2.clone()
    opt.step()
    d2 = gw2 + 0.1 * w1
    d2 = d2 * (0.001 * w1.norm() / d2.norm())
    assert torch.allclose(w.detach(), w1 - 0.5 * (0.9 * d1 + d2))  # momentum buffer mu = 0.9 mu + d
    assert torch.allclose(b.detach(), b1 - 0.5 * (0.9 * gb1 + gb2))


# ------------------------------------------------------------------------------------------------- probe training
def test_probe_reaches_100_percent_on_separable_features(monkeypatch):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 16, generator=g) * 3  # four well separated Gaussian classes
    y, vy = torch.randint(4, (256,), generator=g), torch.randint(4, (128,), generator=g)
    x, vx = means[y] + torch.randn(256, 16, generator=g), means[vy] + torch.randn(128, 16, generator=g)
    lrs = []
    monkeypatch.setattr(ep, "set_lr", lambda opt, lr: (lrs.append(lr), common.set_lr(opt, lr)))
    torch.manual_seed(0)
    head = ep.build_head(16, 4)
    assert not head[0].affine and head[0].eps == 1e-6 and head[1].bias.abs().max() == 0
    batches, n = ep.cached_batches(x, y, 32, CPU)
    res = ep.fit_linear_head(head, batches, n, (vx, vy), CPU, epochs=10, warmup_epochs=1, lr=20.0, eval_every=5)
    assert res["top1"] == 100.0 and res["history"][-1]["loss"] < 0.1
    assert [r["epoch"] for r in res["history"]] == [4, 9]
    # lr per step: linear warmup from 0 over 1 epoch (8 steps), then half-cosine (MAE's adjust_learning_rate)
    assert len(lrs) == 80 and lrs[0] == 0.0 and lrs[4] == pytest.approx(10.0) and lrs[8] == pytest.approx(20.0)
    assert lrs[44] == pytest.approx(common.cosine_schedule(4.5, 9, 20.0, 0.0))


def test_feature_pools_and_gather_order(monkeypatch):
    torch.manual_seed(0)
    vit = common.build_vit("micro", img_size=SIZE).eval()
    imgs = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens, pre = vit(imgs), vit.forward_blocks(vit.embed(imgs))  # [3, 17, 64]
    assert torch.allclose(eu.extract(vit, imgs, "cls"), tokens[:, 0], atol=1e-6)
    assert torch.allclose(eu.extract(vit, imgs, "mean"), tokens[:, 1:].mean(1), atol=1e-6)
    assert torch.allclose(eu.extract(vit, imgs, "prenorm-mean"), pre[:, 1:].mean(1), atol=1e-6)
    # mae-mean: MAE's global pool, fc_norm as models_vit.py builds it (LayerNorm eps 1e-6, default init 1 / 0) on the
    # pre-norm mean: every feature vector has mean 0 and (biased) variance 1
    mae = eu.extract(vit, imgs, "mae-mean")
    assert torch.allclose(mae, torch.nn.LayerNorm(64, eps=1e-6)(pre[:, 1:].mean(1)).detach(), atol=1e-5)
    assert mae.mean(1).abs().max() < 1e-5 and torch.allclose(mae.var(1, unbiased=False), torch.ones(3), atol=1e-4)
    assert (mae - eu.extract(vit, imgs, "mean")).abs().max() > 0.1  # LN of the mean is not the mean of LNs
    # mean keeps the final norm's trained affine g, b; the probe's BatchNorm1d(affine=False) removes it (up to sign g)
    g = torch.randn(64).sign() * (0.5 + torch.rand(64))
    with torch.no_grad():
        vit.norm.weight.copy_(g), vit.norm.bias.copy_(torch.randn(64))
    def bn(x):  # BatchNorm1d(affine=False) in train mode with eps -> 0 (over 3 images some variances are 1e-4)
        return (x - x.mean(0)) / x.std(0, correction=0)
    plain = torch.nn.functional.layer_norm(pre[:, 1:], (64,), eps=1e-6).mean(1)  # mean of LN_1,0 tokens
    assert torch.allclose(bn(eu.extract(vit, imgs, "mean")), bn(plain) * g.sign(), atol=1e-3)
    # 3 processes hold rows rank::3 of 7 rows; the gathered tensor is in index order
    rows = torch.arange(7.0)[:, None]

    def fake_all_gather(parts, x):
        for r in range(3):
            shard = rows[r::3]
            parts[r].zero_()[:len(shard)] = shard
    monkeypatch.setattr(train_utils.torch_dist, "all_gather", fake_all_gather)
    dist = SimpleNamespace(world=3, rank=1)
    assert train_utils.gather_rows(dist, rows[1::3], 7).flatten().tolist() == list(range(7))


# ------------------------------------------------------------------------------------------------ checkpoint formats
def micro_vit():
    torch.manual_seed(1)
    return common.build_vit("micro", img_size=SIZE).eval()


def project_reference(path):
    """The encoder of a checkpoint in this project's format, rebuilt without load_vit."""
    ckpt = torch.load(path, weights_only=True)
    vit = common.ViT(**ckpt["encoder_args"])
    vit.load_state_dict(ckpt["encoder"])
    return vit.eval()


def make_project(tmp_path):
    vit, path = micro_vit(), tmp_path / "ours" / "checkpoint.pth"
    path.parent.mkdir()
    train_utils.save_checkpoint(path, {"model": {"decoder.weight": torch.zeros(2)},
                                       **train_utils.encoder_export(vit, "test")})
    return path, [], project_reference(path)


def timm_state(vit):
    """timm's VisionTransformer layout: the encoder keys plus a classification head."""
    return {**vit.state_dict(), "head.weight": torch.randn(10, 64), "head.bias": torch.zeros(10)}


def make_timm(tmp_path):
    vit, path = micro_vit(), tmp_path / "timm.pth"
    torch.save(timm_state(vit), path)
    return path, ["--num-heads", "4"], vit  # 64-wide micro heads: the count cannot be inferred from the shapes


def make_timm_wrapped(tmp_path):
    vit, path = micro_vit(), tmp_path / "timm_ddp.pth"
    torch.save({"model": {"module." + k: v for k, v in timm_state(vit).items()}, "epoch": 3}, path)
    return path, ["--num-heads", "4"], vit


def make_script_checkpoint(name):
    """A checkpoint written by a training script (micro ViT, 32 px) after two optimizer steps."""
    def make(tmp_path):
        parts = write_parts_file(tmp_path / "parts.pt")
        assert run_inprocess(name, tmp_path / "run", parts, "--max-steps", "2")["step"] == 2
        path = tmp_path / "run" / "checkpoint.pth"
        return path, [], project_reference(path)
    return make


CHECKPOINT_MAKERS = {"project": make_project, "timm": make_timm, "timm-ddp-wrapped": make_timm_wrapped,
                     **{name: make_script_checkpoint(name) for name in ("latent_mim", "pcae", "semmae", "semmae-parts")}}


def reference_images(split):
    data = common.SeededDataset(common.build_dataset("synthetic", split, size=SIZE, length=N_TRAIN, seed=0),
                                common.image_transform(common.eval_transform(SIZE)))
    samples = [data[i] for i in range(len(data))]  # (image, label, bad)
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])


def reference_features(vit, split, pool="cls"):
    imgs, labels = reference_images(split)
    with torch.no_grad():
        if pool == "prenorm-mean":  # mean of the patch tokens before the final norm
            return vit.forward_blocks(vit.embed(imgs))[:, 1:].mean(1), labels
        return vit(imgs)[:, 0], labels  # cls token after the final norm


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_MAKERS))
def test_checkpoint_loads_and_evaluates(kind, tmp_path):
    path, extra, ref = CHECKPOINT_MAKERS[kind](tmp_path)
    args = ep.build_parser().parse_args(["--ckpt", str(path), "--data", "synthetic", "--device", "cpu", *extra])
    vit = eu.load_encoder(args, CPU)
    assert args.input_size == SIZE and vit.config["num_heads"] == 4
    imgs = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(eu.extract(vit, imgs, "cls"), ref(imgs)[:, 0], atol=1e-5)
    out = tmp_path / "results" / "probe.jsonl"
    row = probe(path, "--mode", "knn", "--nb-knn", "3", *extra, output=out)
    # the default read-out follows the checkpoint's method: Latent MIM's evaluation uses the pre-norm patch mean
    assert row["pool"] == ("prenorm-mean" if kind == "latent_mim" else "cls")
    (tf, ty), (vf, vy) = reference_features(ref, "train", row["pool"]), reference_features(ref, "val", row["pool"])
    for k in (1, 3):
        expected = eu.accuracy(ep.knn_votes(tf, ty, vf, [k], num_classes=10)[k], vy, max_rank=k)
        assert (row["knn"][str(k)]["top1"], row["knn"][str(k)]["top5"]) == pytest.approx(expected)
    assert row["knn"]["1"]["top5"] == row["knn"]["1"]["top1"]  # DINO: top-5 over min(5, k) predictions
    if kind == "project":  # Latent MIM's NN: leave-one-out 1-NN on val, mean of patch tokens before the final norm
        loo = probe(path, "--mode", "knn", "--loo", "--pool", "prenorm-mean", "--nb-knn", "1", output=out)
        imgs = reference_images("val")[0]
        with torch.no_grad():
            pre = ref.forward_blocks(ref.embed(imgs))[:, 1:].mean(1)  # [12, 64]
        sim = torch.nn.functional.normalize(pre, dim=1) @ torch.nn.functional.normalize(pre, dim=1).T
        nearest = sim.fill_diagonal_(-2).argmax(1)
        assert loo["k"] == 1 and loo["top1"] == pytest.approx(100 * (vy[nearest] == vy).float().mean().item())
        assert loo["top5"] == loo["top1"]
    cached = probe(path, "--cached", "--epochs", "2", "--warmup-epochs", "1", "--lr", "5", *extra, output=out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in lines][-1] == "linear" and lines[-1]["top1"] == cached["top1"]
    assert cached["eff_batch"] == 16 and len(cached["history"]) == 2 and math.isfinite(cached["history"][-1]["loss"])


def test_public_layout_head_count_from_presets_or_flag(tmp_path):
    path, _, ref = make_timm(tmp_path)
    vit = eu.load_encoder(ep.build_parser().parse_args(["--ckpt", str(path), "--data", "synthetic"]), CPU)
    assert vit.config["num_heads"] == 4  # width 64 and depth 4 are the micro preset's: 4 heads
    imgs = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(eu.extract(vit, imgs, "cls"), ref(imgs)[:, 0], atol=1e-5)
    # --num-heads overrides the inferred count (here wrongly, so the features change)
    vit1 = eu.load_encoder(ep.build_parser().parse_args(["--ckpt", str(path), "--data", "synthetic",
                                                         "--num-heads", "1"]), CPU)
    assert vit1.config["num_heads"] == 1
    with torch.no_grad():
        assert not torch.allclose(eu.extract(vit1, imgs, "cls"), ref(imgs)[:, 0], atol=1e-3)


def test_full_protocol_with_augmentation_is_reproducible(tmp_path, monkeypatch):
    boxes = []  # every training crop goes through MAE's TF-style box (not torchvision's RandomResizedCrop)
    monkeypatch.setattr(ep, "tf_crop_params", lambda *a, f=ep.tf_crop_params: boxes.append(f(*a)) or boxes[-1])
    path, _, _ = make_project(tmp_path)
    flags = ["--epochs", "2", "--warmup-epochs", "1", "--pool", "mean", "--output", str(tmp_path / "p.jsonl")]
    a = probe(path, *flags)
    assert len(boxes) == 2 * N_TRAIN  # 3 full batches of 16 per epoch, 2 epochs
    b = probe(path, *flags)
    assert boxes[:2 * N_TRAIN] == boxes[2 * N_TRAIN:]  # the same boxes again: seeded per (seed, epoch, image)
    assert a["history"] == b["history"] and not a["cached"] and a["lr"] == pytest.approx(0.1 * 16 / 256)
    assert len(a["history"]) == 2 and a["pool"] == "mean"


# ------------------------------------------------------------------------------- linear-probe crop (MAE util/crop.py)
def crop_boxes(n, height, width, **kw):
    torch.manual_seed(0)
    return torch.tensor([ep.tf_crop_params(height, width, **kw) for _ in range(n)])  # [n, 4]: top, left, h, w


def test_tf_crop_draws_in_mae_order_from_the_default_generator():
    torch.manual_seed(3)
    box = ep.tf_crop_params(300, 500)
    torch.manual_seed(3)  # MAE's sequence: area fraction, log aspect ratio, then top, then left
    u, t = torch.empty(1).uniform_(0.08, 1.0).item(), torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3)).item()
    w = min(round(math.sqrt(150000 * u * math.exp(t))), 500)
    h = min(round(math.sqrt(150000 * u / math.exp(t))), 300)
    top, left = torch.randint(0, 300 - h + 1, (1,)).item(), torch.randint(0, 500 - w + 1, (1,)).item()
    assert box == (top, left, h, w)


def test_tf_crop_area_follows_the_clamped_uniform_draw():
    # square S x S, ratio 1: w = h = min(round(S sqrt(u)), S), so the area fraction is A = min(u, 1) up to rounding,
    # u ~ U(lo, hi) with hi > 1: CDF (x - lo) / (hi - lo) below 1 and an atom at 1 of mass (hi - 1) / (hi - lo)
    side, lo, hi, n = 1000, 0.25, 2.25, 4000
    box = crop_boxes(n, side, side, scale=(lo, hi), ratio=(1.0, 1.0))
    assert (box[:, 2] == box[:, 3]).all() and box[:, 2].max() == side
    area = (box[:, 2] * box[:, 3]).double() / side ** 2
    c = (1 - 0.5 / side) ** 2  # round(S sqrt(u)) = S once S sqrt(u) >= S - 1/2
    assert (area == 1).double().mean().item() == pytest.approx((hi - c) / (hi - lo), abs=0.03)  # 0.6255
    assert area.mean().item() == pytest.approx(((1 - lo ** 2) / 2 + hi - 1) / (hi - lo), abs=0.015)  # 0.8594
    for p in (0.1, 0.2, 0.3):  # quantiles lo + p (hi - lo) below the atom
        assert area.quantile(p).item() == pytest.approx(lo + p * (hi - lo), abs=0.04)
    # torchvision's retry loop would reject every u > 1: P(A = 1) would be about 0.625^10, the fallback's


def test_tf_crop_clamps_each_side_and_stays_inside_the_image():
    # MAE's default scale and ratio on a square: w is clamped to S when u r >= c, i.e. with probability
    # (1 / 2a) int_{log c}^{a} (1 - c e^-t) / 0.92 dt = (a - log c - 1 + 3c/4) / (1.84 a), a = log 4/3 (about 0.071);
    # h likewise (r -> 1/r); never both (u r >= 1 and u / r >= 1 only at u = r = 1)
    side, n = 1000, 4000
    box = crop_boxes(n, side, side)
    a, c = math.log(4 / 3), (1 - 0.5 / side) ** 2
    expected = (a - math.log(c) - 1 + 0.75 * c) / (1.84 * a)
    w_full, h_full = box[:, 3] == side, box[:, 2] == side
    assert w_full.double().mean().item() == pytest.approx(expected, abs=0.02)
    assert h_full.double().mean().item() == pytest.approx(expected, abs=0.02)
    assert not (w_full & h_full).any()
    # a non-square image and areas up to twice the image: the box never leaves it, both sides get clamped
    box = crop_boxes(n, 60, 100, scale=(0.08, 2.0))
    top, left, h, w = box.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 60).all() and (left + w <= 100).all()
    assert (h == 60).any() and (w == 100).any() and (h >= 1).all() and (w >= 1).all()


def test_tf_crop_never_falls_back_to_a_centre_crop():
    # ratio 2-3 on a square never fits: torchvision would fall back to the centre box top 25, h 50, every time.
    # TF-style: w = S (clamped), h = round(S sqrt(u / r)) with u / r in [0.2, 0.5], top uniform on {0, ..., S - h}
    side, n = 100, 2000
    top, left, h, w = crop_boxes(n, side, side, scale=(0.6, 1.0), ratio=(2.0, 3.0)).unbind(1)
    assert (w == side).all() and (left == 0).all()
    assert h.min() == round(side * math.sqrt(0.2)) and h.max() >= 68 and len(h.unique()) >= 20
    pos = top.double() / (side - h)
    assert pos.mean().item() == pytest.approx(0.5, abs=0.03) and (top == 0).any() and (top == side - h).any()
    assert ((top == 25) & (h == 50)).double().mean() < 0.01


def test_probe_train_transform_is_tf_crop_then_flip_then_normalise():
    from PIL import Image
    from torchvision.transforms import v2
    pixels = torch.randint(0, 256, (30, 40, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    img = Image.fromarray(pixels.numpy())
    for seed in range(6):  # both flip outcomes occur
        torch.manual_seed(seed)
        out = ep.probe_train_transform(16)(img)
        torch.manual_seed(seed)
        top, left, h, w = ep.tf_crop_params(30, 40)
        ref = v2.functional.resized_crop(pixels.permute(2, 0, 1), top, left, h, w, [16, 16],
                                         interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        if torch.rand(1) < 0.5:  # RandomHorizontalFlip(p = 0.5)
            ref = ref.flip(-1)
        ref = (ref / 255.0 - torch.tensor(common.IMAGENET_MEAN)[:, None, None]) / torch.tensor(
            common.IMAGENET_STD)[:, None, None]
        assert out.shape == (3, 16, 16) and torch.allclose(out, ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------ errors
def test_clear_errors(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "no_vit.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, bad)
    with pytest.raises(ValueError, match="no ViT encoder"):
        probe(bad)
    path, _, _ = make_project(tmp_path)
    expected = r"built for 32 px images \(4x4 patches of 8 px\) but --input-size is 64; pass --input-size 32"
    with pytest.raises(ValueError, match=expected):
        probe(path, "--input-size", "64")
    with pytest.raises(ValueError, match="--loo"):
        probe(path, "--loo")
    monkeypatch.setattr(sys, "argv", ["eval_probe.py", "--ckpt", str(bad), "--data", "synthetic"])
    with pytest.raises(SystemExit) as exit_info:  # the command line: one line on stderr, exit code 2
        cli.run_main(ep.main, ep.build_parser())
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "no ViT encoder" in err


# ------------------------------------------------------------------------------------------- non-finite features
def test_a_nan_score_is_never_a_correct_prediction():
    scores = torch.tensor([[0.1, float("nan"), 0.3], [float("nan")] * 3, [0.9, 0.2, 0.1]])
    labels = torch.tensor([2, 0, 0])
    never = torch.iinfo(torch.long).max
    assert eu.label_rank(scores, labels).tolist() == [never, never, 0]  # outside every top-k
    assert eu.accuracy(scores, labels) == pytest.approx((100 / 3, 100 / 3))  # top-5 of 3 classes: only row 2


@pytest.mark.parametrize("mode", [["--mode", "knn"], ["--cached", "--epochs", "1", "--warmup-epochs", "0"]])
def test_an_encoder_with_a_nan_weight_stops_the_evaluation_with_exit_3(mode, tmp_path, monkeypatch, capsys):
    path, _, _ = make_project(tmp_path)
    ckpt = train_utils.load_checkpoint(path)
    ckpt["encoder"]["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    train_utils.save_checkpoint(path, ckpt)
    monkeypatch.setattr(sys, "argv", ["eval_probe.py", "--ckpt", str(path), "--data", "synthetic", "--synthetic-size",
                                      str(N_TRAIN), "--batch-size", "8", "--num-workers", "0", *mode])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(ep.main, ep.build_parser())
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 3 and err == [
        f"error: the encoder of {path} gives non-finite features for 12 of 12 val images: its weights hold NaN or "
        f"inf; evaluate another checkpoint"]
    assert (path.parent / "probe.jsonl").read_text() == ""  # no 100 % written
