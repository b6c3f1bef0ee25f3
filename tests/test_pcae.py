"""Tests of pcae.py: the paper's S(x) and T(x; k) against hand computations, token counts, absolute ids, the teacher
(masked patches only, exact copy, no gradient, EMA), the loss, a short training run, --bench, flag errors (--vis:
test_figures.py)."""
import json, math

import pytest
import torch

from common import build_adamw, build_vit, patchify, standardize_tokens
from train_utils import load_checkpoint
from conftest import step_rng
import pcae
from pcae import PCAE, compress_tokens, cosine_loss, kept_count, similarity_scores, token_counts

MICRO = ["--data", "synthetic", "--model", "micro", "--input-size", "32", "--num-workers", "0",
         "--decoder-dim", "64", "--decoder-depth", "2", "--decoder-heads", "4"]


def micro_model(**kw):
    torch.manual_seed(0)
    vit = build_vit("micro", img_size=32, drop_path_rate=0.25)
    return PCAE(vit, drop_after=(0, 1, 2), decoder_dim=64, decoder_depth=2, decoder_heads=4, decoder_drop_path=0.25,
                **kw)


def test_similarity_scores_match_hand_computation():
    x = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]])  # [1, 3, 2]
    # by hand: x_hat = (0.6, 0.8), (1, 0), (0, 1); m = (1.6/3, 1.8/3); s_i = <x_hat_i, m / ||m||>
    m = (1.6 / 3, 1.8 / 3)
    norm = math.hypot(*m)
    expected = [(0.6 * m[0] + 0.8 * m[1]) / norm, m[0] / norm, m[1] / norm]
    assert torch.allclose(similarity_scores(x)[0], torch.tensor(expected), atol=1e-6)
    assert expected == pytest.approx([0.99655, 0.66436, 0.74741], abs=1e-5)
    # scale of a token does not matter (L2-normalised), only its direction
    assert torch.allclose(similarity_scores(x * torch.tensor([[[7.0], [0.1], [3.0]]])), similarity_scores(x))


def test_compress_keeps_exactly_the_least_similar_tokens():
    torch.manual_seed(0)
    x = torch.randn(3, 11, 6)
    ids = torch.stack([torch.randperm(40)[:11] for _ in range(3)])  # absolute ids of these tokens
    for k, count in [(0.5, 5), (0.3, 3), (1.0, 11)]:
        kept, kept_ids = compress_tokens(x, ids, k)
        assert kept.shape == (3, count, 6) and kept_ids.shape == (3, count)
        scores = similarity_scores(x)
        for b in range(3):
            least = sorted(range(11), key=lambda j: scores[b, j].item())[:count]  # floor(n k) lowest scores
            assert set(kept_ids[b].tolist()) == set(ids[b, least].tolist())
            for j, pid in enumerate(kept_ids[b].tolist()):
                assert torch.equal(kept[b, j], x[b, ids[b].tolist().index(pid)])
    # a cluster of near-identical tokens plus two outliers: the outliers (least redundant) are kept
    x = torch.tensor([[[1.0, 0.0, 0.0]] * 4 + [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]) + 0.01 * torch.randn(1, 6, 3)
    _, kept_ids = compress_tokens(x, torch.arange(6)[None], 1 / 3)
    assert set(kept_ids[0].tolist()) == {4, 5}
    # int(n * k) on Python floats, as the public code: 100 x 0.29 = 28.999999999999996 keeps 28, 100 x 0.57 keeps 56
    cases = {(147, 0.5): 73, (100, 0.29): 28, (100, 0.57): 56, (10, 0.3): 3, (147, 0.3): 44, (73, 0.25): 18,
             (10, 0.7): 7}
    assert {nk: kept_count(*nk) for nk in cases} == cases


def test_random_drop_keeps_the_lowest_noise():
    x, ids = torch.randn(2, 8, 4), torch.arange(8).repeat(2, 1)
    noise = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4], [0.0, 1.0, 0.5, 0.55, 0.9, 0.8, 0.1, 0.2]])
    kept, kept_ids = compress_tokens(x, ids, 0.5, random=True, noise=noise)
    assert [set(r) for r in kept_ids.tolist()] == [{1, 3, 5, 7}, {0, 2, 6, 7}]
    assert torch.equal(kept, torch.stack([x[b, kept_ids[b]] for b in range(2)]))
    with pytest.raises(ValueError, match="noise"):  # no silent draw from the global generator
        compress_tokens(x, ids, 0.5, random=True)


def test_random_drop_in_the_teacher_comes_from_the_step_random():
    model = micro_model(random_drop=True)
    patches = patchify(torch.randn(2, 3, 32, 32), 8)

    def stages(seed):
        rng = step_rng(2, seed=seed)
        _, mask_ids = model.mask(rng)
        return [s.tolist() for s in model.teacher_forward(patches, mask_ids, rng)[2]]

    assert stages(3) == stages(3) and stages(3) != stages(4)
    assert [len(s[0]) for s in stages(3)] == [6, 3, 1]


def test_ids_stay_absolute_through_stages():
    torch.manual_seed(1)
    table = torch.randn(64, 16)  # feature of absolute patch id i
    ids = torch.stack([torch.randperm(64)[:48] for _ in range(2)])  # [2, 48]
    x = table[ids]  # [2, 48, 16]
    for expected in (24, 12, 6, 3):
        prev = ids
        x, ids = compress_tokens(x, ids, 0.5)
        assert ids.shape == (2, expected)
        assert torch.equal(x, table[ids])  # every kept token is still the one of its absolute id
        assert all(set(a) <= set(b) for a, b in zip(ids.tolist(), prev.tolist()))


def test_token_counts_vit_b16_224_mask_075():
    assert token_counts(147, [0, 4, 8], 0.5) == [147, 73, 36, 18]
    torch.manual_seed(0)  # ViT-B/16 geometry (12 blocks, 14x14 grid), narrow width to keep the test fast
    model = PCAE(build_vit("base", embed_dim=32, num_heads=2), decoder_dim=32, decoder_depth=1, decoder_heads=2)
    assert model.drop_after == [0, 4, 8] and model.num_visible == 49
    rng = step_rng(2)
    vis_ids, mask_ids = model.mask(rng)
    target, kept, stages = model.teacher_forward(patchify(torch.randn(2, 3, 224, 224), 16), mask_ids, rng)
    assert mask_ids.shape[1] == 147 and [s.shape[1] for s in stages] == [73, 36, 18] and target.shape == (2, 18, 32)
    for b in range(2):
        assert set(kept[b].tolist()) <= set(stages[1][b].tolist()) <= set(stages[0][b].tolist())
        assert set(stages[0][b].tolist()) <= set(mask_ids[b].tolist())
        assert not set(kept[b].tolist()) & set(vis_ids[b].tolist())  # targets are masked patches only


def test_teacher_sees_only_the_masked_patches():
    model = micro_model()
    imgs = torch.randn(2, 3, 32, 32)
    rng = step_rng(2)
    vis_ids, mask_ids = model.mask(rng)
    patches = patchify(imgs, 8)
    target, kept, _ = model.teacher_forward(patches, mask_ids, rng)
    assert target.dtype == torch.float32 and target.shape == (2, 1, 64)  # 12 masked -> 6 -> 3 -> 1 kept
    assert torch.allclose(target.mean(-1), torch.zeros(2, 1), atol=1e-5)  # standardised per token
    assert torch.allclose(target.var(-1), torch.ones(2, 1), atol=1e-4)
    changed = patches.clone()
    changed[torch.arange(2)[:, None], vis_ids] += 5.0  # visible patches changed: targets must not move
    assert torch.equal(model.teacher_forward(changed, mask_ids, rng)[0], target)
    changed = patches.clone()
    changed[torch.arange(2)[:, None], kept] += 5.0
    assert not torch.allclose(model.teacher_forward(changed, mask_ids, rng)[0], target)


def test_target_standardisation_and_cosine_loss():
    t = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    mean, var = 3.0, ((2 ** 2 + 1 + 0 + 3 ** 2) / 3)  # unbiased variance, as the public code
    expected = torch.tensor([(v - mean) / math.sqrt(var + 1e-6) for v in (1.0, 2.0, 3.0, 6.0)])
    assert torch.allclose(standardize_tokens(t)[0, 0], expected, atol=1e-6)
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])  # cosines 1 and 1/sqrt(2)
    assert cosine_loss(pred, target).item() == pytest.approx(1 - (1 + 2 ** -0.5) / 2, abs=1e-6)
    # a positive scale per token (biased vs unbiased variance) does not change the loss
    assert cosine_loss(pred, target * torch.tensor([[[0.3], [7.0]]])).item() == pytest.approx(
        1 - (1 + 2 ** -0.5) / 2, abs=1e-6)


def test_teacher_exact_copy_no_gradient_and_ema():
    model = micro_model()
    s, t = model.student.state_dict(), model.teacher.state_dict()
    assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert model.decoder.head.out_features == model.student.embed_dim  # teacher width, not p*p*3 = 192
    loss, _ = model(torch.randn(4, 3, 32, 32), step_rng(4))
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable)  # DDP without find_unused_parameters
    assert not any(n.startswith("teacher.") for n, _ in trainable)
    opt = torch.optim.SGD([p for _, p in trainable], lr=1.0)
    opt.step()
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.update_teacher(0.75)  # q <- 0.75 q + 0.25 p
    w = "blocks.0.attn.qkv.weight"
    expected = 0.75 * before[w] + 0.25 * model.student.state_dict()[w]
    assert torch.allclose(model.teacher.state_dict()[w], expected, atol=1e-6)
    assert not torch.equal(model.teacher.state_dict()[w], before[w])


def test_no_weight_decay_names():
    """The public code's groups (timm 0.5.4 add_weight_decay on the student + decoder): weight decay 0 on biases and
    LayerNorm weights, 0.05 on every other trainable parameter, cls and mask tokens included; the frozen teacher is in
    no group (it is a separate model there) and the position embeddings are buffers."""
    args = pcae.build_parser().parse_args(["--data", "synthetic"])
    torch.manual_seed(0)
    model = pcae.build_model(args)  # ViT-B/16 student and teacher, decoder 8 x 512
    optimizer = build_adamw(model, args.weight_decay, 1e-4, pcae.no_weight_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert set(groups) == {0.05, 0.0}
    block_biases = ["norm1.weight", "norm1.bias", "attn.qkv.bias", "attn.proj.bias", "norm2.weight", "norm2.bias",
                    "mlp.fc1.bias", "mlp.fc2.bias"]
    block_weights = ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
    no_decay = ({"student.patch_embed.proj.bias", "student.norm.weight", "student.norm.bias", "decoder.embed.bias",
                 "decoder.norm.weight", "decoder.norm.bias", "decoder.head.bias"}
                | {f"student.blocks.{i}.{k}" for i in range(12) for k in block_biases}
                | {f"decoder.blocks.{i}.{k}" for i in range(8) for k in block_biases})
    decay = ({"student.patch_embed.proj.weight", "student.cls_token", "decoder.embed.weight", "decoder.mask_token",
              "decoder.head.weight"}
             | {f"student.blocks.{i}.{k}" for i in range(12) for k in block_weights}
             | {f"decoder.blocks.{i}.{k}" for i in range(8) for k in block_weights})
    assert groups[0.0] == no_decay and len(no_decay) == 12 * 8 + 8 * 8 + 7
    assert groups[0.05] == decay and len(decay) == 12 * 4 + 8 * 4 + 5
    teacher = {n for n in names.values() if n.startswith("teacher.")}
    assert len(teacher) == 12 * 12 + 5 and not teacher & (groups[0.0] | groups[0.05])
    assert not {n for n, _ in model.named_buffers()} & set(names.values())  # pos_embed, decoder.pos_embed


def test_training_lowers_the_loss(tmp_path):
    args = pcae.build_parser().parse_args(MICRO + [
        "--synthetic-size", "128", "--batch-size", "16", "--epochs", "3", "--warmup-epochs", "0", "--lr", "1e-3",
        "--output-dir", str(tmp_path)])
    pcae.main(args)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.05, losses
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["method"] == "pcae" and ckpt["step"] == 24
    model = ckpt["model"]
    # the exported encoder is the student; the teacher moved away from its initial copy only a little (m ~ 0.9999)
    assert torch.equal(ckpt["encoder"]["blocks.0.attn.qkv.weight"], model["student.blocks.0.attn.qkv.weight"])
    assert not torch.equal(model["teacher.blocks.0.attn.qkv.weight"], model["student.blocks.0.attn.qkv.weight"])
    assert "decoder.head.weight" in model and "decoder.pos_embed" not in model  # fixed positions are not saved
    assert ckpt["args"]["momentum"] == 0.9999


def test_bench_pcae_cheaper_than_mae_style(capsys):
    rows = pcae.main(pcae.build_parser().parse_args(MICRO + ["--bench-baseline", "--bench-steps", "1",
                                                             "--batch-size", "4"]))
    assert rows["pcae"]["gflop_per_image"] < rows["mae-style"]["gflop_per_image"]
    assert "time ratio" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--keep-ratio", "0"], ["--keep-ratio", "1.5"], ["--mask-ratio", "1"],
                                   ["--mask-ratio", "0"], ["--drop-after", "4"], ["--drop-after", "0,1,2,3,0"],
                                   ["--drop-after", "a,b"], ["--keep-ratio", "0.1"], ["--decoder-dim", "66"],
                                   ["--momentum", "1.5"]])
def test_bad_flags_are_user_errors(flags, tmp_path):
    with pytest.raises(ValueError):
        pcae.main(pcae.build_parser().parse_args(MICRO + flags + ["--output-dir", str(tmp_path)]))
