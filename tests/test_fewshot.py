"""Tests of eval_probe.py's few-shot transfer (--shots K --trials N): the K-shot subsets, the logistic regression
(its optimum against closed forms and the stationarity condition), the mean ± std report, the one-line errors, and
end-to-end runs of both modes on --data synthetic with a random-init micro encoder."""
import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cli
import common
import eval_probe as ep
import train_utils
from conftest import ROOT, subprocess_env

SIZE, N_TRAIN = 32, 64  # micro ViT at 32 px; --data synthetic: 64 train images (4 to 10 per class), 16 val


def hand_labels():
    """Three classes of 4, 6 and 5 images, interleaved."""
    return torch.tensor([0, 1, 2, 1, 0, 2, 1, 1, 2, 0, 1, 2, 0, 1, 2])


def micro_checkpoint(path):
    torch.manual_seed(1)
    vit = common.build_vit("micro", img_size=SIZE)
    train_utils.save_checkpoint(path, train_utils.encoder_export(vit, "random-init"))
    return path


def fewshot_args(ckpt, output, *flags, size=N_TRAIN):
    return ["--ckpt", str(ckpt), "--data", "synthetic", "--synthetic-size", str(size), "--num-workers", "0",
            "--batch-size", "16", "--device", "cpu", "--output", str(output), *flags]


def probe(*args):
    return ep.main(ep.build_parser().parse_args(fewshot_args(*args)))


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def reference_features(ckpt, split, seed=0):
    """Features of the encoder rebuilt without load_vit: cls token after the final norm (--seed also seeds the
    synthetic images)."""
    state = torch.load(ckpt, weights_only=True)
    vit = common.ViT(**state["encoder_args"])
    vit.load_state_dict(state["encoder"])
    vit.eval()
    data = common.SeededDataset(common.build_dataset("synthetic", split, size=SIZE, length=N_TRAIN, seed=seed),
                                common.image_transform(common.eval_transform(SIZE)))
    samples = [data[i] for i in range(len(data))]
    with torch.no_grad():
        feats = vit(torch.stack([s[0] for s in samples]))[:, 0]  # [N, 64]
    return feats, torch.tensor([s[1] for s in samples])


# ------------------------------------------------------------------------------------------------------ subsets
def test_subsets_have_k_per_class_and_depend_on_seed_and_trial_only():
    labels = hand_labels()
    a = ep.fewshot_subset(labels, 3, 2, seed=7, trial=0)
    assert torch.bincount(labels[a], minlength=3).tolist() == [2, 2, 2]  # exactly K of each class
    assert a.tolist() == sorted(set(a.tolist()))  # sorted, no repeats
    # the documented draw: generator mix_seed(seed, t); per class in label order, the first K of a permutation of its
    # increasing indices
    g = torch.Generator().manual_seed(common.mix_seed(7, 0))
    members = [[i for i, y in enumerate(labels.tolist()) if y == c] for c in range(3)]  # [0, 4, 9, 12], ...
    expected = sorted(m[j] for m in members for j in torch.randperm(len(m), generator=g)[:2].tolist())
    assert a.tolist() == expected
    # a fixed (seed, trial) gives the same subset, whatever the global RNG state or the trials drawn before
    torch.manual_seed(123)
    assert torch.equal(ep.fewshot_subset(labels, 3, 2, 7, 0), a)
    later = [ep.fewshot_subset(labels, 3, 2, 7, t) for t in range(5)]
    torch.manual_seed(5)
    assert torch.equal(ep.fewshot_subset(labels, 3, 2, 7, 4), later[4])
    # trials differ from each other, and so does another seed
    assert len({tuple(s.tolist()) for s in later}) == 5
    assert not torch.equal(ep.fewshot_subset(labels, 3, 2, 8, 0), a)
    # K = the smallest class: that class is taken whole
    whole = ep.fewshot_subset(labels, 3, 4, 7, 1)
    assert [i for i in whole.tolist() if labels[i] == 0] == members[0]
    # the digest: SHA-1 of the sorted indices as little-endian int64
    raw = b"".join(i.to_bytes(8, "little") for i in a.tolist())
    assert ep.subset_digest(a) == hashlib.sha1(raw).hexdigest()[:16]


def test_class_with_fewer_than_k_images_is_named():
    labels, classes = hand_labels(), ["cat", "dog", "emu"]
    ep.check_shots(labels, classes, 4)  # 4, 6, 5 images: enough
    with pytest.raises(cli.UserError, match=r"^--shots 5: class 'cat' has only 4 training images$"):
        ep.check_shots(labels, classes, 5)
    with pytest.raises(cli.UserError, match=r"class 'cat' has only 4 training images \(and 1 more classes\)$"):
        ep.check_shots(labels, classes, 6)
    with pytest.raises(cli.UserError, match=r"class 'emu' has only 0 training images$"):
        ep.check_shots(labels[labels < 2], classes, 1)


# ------------------------------------------------------------------------------------------ logistic regression
def test_logistic_regression_two_symmetric_points_closed_form():
    # f_1 = e, f_2 = -e after L2 normalisation (the raw lengths 3 and 0.5 do not matter), labels 0 and 1, no bias.
    # By symmetry W* = [a e, -a e]; with d = 2a the objective is 2 log(1 + e^-d) + lambda d^2 / 4, stationary where
    # lambda d = 4 sigma(-d) = 4 / (1 + e^d). d = ln 3: lambda = 1 / ln 3 (p(correct) = 3/4); d = ln 7: lambda =
    # 1 / (2 ln 7) (p = 7/8). The penalty is lambda / 2 ||W||^2 on the SUMMED cross-entropy (a mean would give
    # other optima).
    feats, labels = torch.tensor([[3.0, 0.0], [-0.5, 0.0]]), torch.tensor([0, 1])
    for d, lambd, p in ((math.log(3), 1 / math.log(3), 3 / 4), (math.log(7), 1 / (2 * math.log(7)), 7 / 8)):
        w, grad_max = ep.fit_logistic_regression(feats, labels, 2, lambd)
        # fp64 line searches compare losses, which stop resolving changes once |grad| is about sqrt(eps) = 1e-8
        assert w.dtype == torch.float64 and grad_max < 1e-8
        assert torch.allclose(w, torch.tensor([[d / 2, 0.0], [-d / 2, 0.0]], dtype=torch.float64), atol=1e-7)
        probs = (F.normalize(feats.double(), dim=1) @ w.T).softmax(1)
        assert torch.allclose(probs.diagonal(), torch.tensor([p, p], dtype=torch.float64), atol=1e-7)
    # a stronger penalty gives a smaller W (d solves lambda d = 4 sigma(-d), decreasing in lambda)
    assert ep.fit_logistic_regression(feats, labels, 2, 10.0)[0].norm() < ep.fit_logistic_regression(
        feats, labels, 2, 0.1)[0].norm()


def test_logistic_regression_separates_and_is_stationary():
    g = torch.Generator().manual_seed(0)
    means = torch.eye(4, 16) * 4  # four orthogonal class directions
    y, vy = torch.arange(4).repeat(3), torch.arange(4).repeat(25)  # 3 shots per class; 100 val images
    x, vx = means[y] + 0.5 * torch.randn(12, 16, generator=g), means[vy] + 0.5 * torch.randn(100, 16, generator=g)
    lambd = 0.1
    w, grad_max = ep.fit_logistic_regression(x, y, 4, lambd)
    assert ep.accuracy(F.normalize(vx.double(), dim=1) @ w.T, vy)[0] == 100.0
    # stationarity of (1/n) [sum_i CE_i + lambda/2 ||W||^2], gradient by hand: (1/n) [(P - Y)^T F + lambda W]
    f = F.normalize(x.double(), dim=1)  # [12, 16]
    residual = (f @ w.T).softmax(1) - F.one_hot(y, 4).double()  # [12, 4]
    grad = (residual.T @ f + lambd * w) / len(f)  # [4, 16]
    assert grad.abs().max() < 1e-8 and grad_max == pytest.approx(grad.abs().max().item(), abs=1e-12)
    # deterministic: the same W again
    assert torch.equal(ep.fit_logistic_regression(x, y, 4, lambd)[0], w)


# ------------------------------------------------------------------------------------------------ end to end
def test_knn_trials_match_hand_1nn_and_report_mean_and_sample_std(tmp_path, capsys):
    ckpt, out = micro_checkpoint(tmp_path / "random.pth"), tmp_path / "fewshot.jsonl"
    summary = probe(ckpt, out, "--mode", "knn", "--shots", "2", "--trials", "3", "--nb-knn", "1", "30", "--seed", "4")
    rows = rows_of(out)
    trials = rows[:-1]
    assert [r["fewshot"] for r in rows] == ["trial"] * 3 + ["summary"] and rows[-1] == summary
    (tf, ty), (vf, vy) = reference_features(ckpt, "train", seed=4), reference_features(ckpt, "val", seed=4)
    for t, row in enumerate(trials):
        idx = ep.fewshot_subset(ty, 10, 2, 4, t)
        assert (row["trial"], row["trial_seed"], row["shots"], row["subset_size"]) == (t, common.mix_seed(4, t), 2, 20)
        assert row["subset_sha1"] == ep.subset_digest(idx)
        # 1-NN by hand: the label of the most cosine-similar of the 20 subset images
        sim = F.normalize(vf, dim=1) @ F.normalize(tf[idx], dim=1).T  # [16, 20]
        assert row["knn"]["1"]["top1"] == pytest.approx(100 * (ty[idx][sim.argmax(1)] == vy).double().mean().item())
        assert row["k"] == 20 and set(row["knn"]) == {"1", "20"}  # k = 30 clamped to the 20 subset images
    assert len({r["subset_sha1"] for r in trials}) == 3
    assert "only 20 training images of a 2-shot subset can vote; k = 30 clamped to 20" in capsys.readouterr().err
    # mean and sample std (n - 1) over the trial rows, by hand
    for key in ("top1", "top5"):
        values = [r[key] for r in trials]
        mean = sum(values) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
        assert summary[key] == pytest.approx(mean) and summary[key + "_std"] == pytest.approx(std)
    one = [r["knn"]["1"]["top1"] for r in trials]
    assert summary["knn"]["1"]["top1"] == pytest.approx(sum(one) / 3)
    assert summary["trial_top1"] == [r["top1"] for r in trials] and summary["trials"] == 3


def test_linear_trials_fit_logistic_regression_on_cached_features(tmp_path, monkeypatch, capsys):
    crops = []  # MAE's augmentation must not run: --shots implies cached features
    monkeypatch.setattr(ep, "tf_crop_params", lambda *a: crops.append(a))
    ckpt, out = micro_checkpoint(tmp_path / "random.pth"), tmp_path / "fewshot.jsonl"
    summary = probe(ckpt, out, "--shots", "3", "--trials", "2", "--lambd", "0.5")
    trials = rows_of(out)[:-1]
    assert crops == [] and summary["classifier"] == "logistic" and summary["lambd"] == 0.5
    (tf, ty), (vf, vy) = reference_features(ckpt, "train"), reference_features(ckpt, "val")
    for t, row in enumerate(trials):
        idx = ep.fewshot_subset(ty, 10, 3, 0, t)
        assert row["subset_size"] == 30 and row["subset_sha1"] == ep.subset_digest(idx) and row["grad_max"] < 1e-6
        w, _ = ep.fit_logistic_regression(tf[idx], ty[idx], 10, 0.5)
        scores = F.normalize(vf.double(), dim=1) @ w.T  # [16, 10]
        assert (row["top1"], row["top5"]) == pytest.approx(ep.accuracy(scores, vy))
    mean, std = sum(r["top1"] for r in trials) / 2, abs(trials[0]["top1"] - trials[1]["top1"]) / math.sqrt(2)
    assert summary["top1"] == pytest.approx(mean) and summary["top1_std"] == pytest.approx(std)
    printed = capsys.readouterr().out.splitlines()[-1]  # the summary line: mean ± std as written in the row
    assert printed.startswith(f"linear 3-shot, 2 trials, random.pth: top-1 {mean:.2f} ± {std:.2f}  top-5 ")
    # the default lambda is DINO's; a single trial has no sample std
    one = probe(ckpt, tmp_path / "one.jsonl", "--shots", "1", "--trials", "1")
    assert one["lambd"] == 0.1 and one["top1_std"] is None and "± n/a" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- errors
def run_main_error(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "argv", ["eval_probe.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(ep.main, ep.build_parser())
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def test_one_line_errors(tmp_path, monkeypatch, capsys):
    ckpt, out = micro_checkpoint(tmp_path / "random.pth"), tmp_path / "e.jsonl"
    base = fewshot_args(ckpt, out, size=48)
    for flags, message in ((["--shots", "0"], "--shots and --trials must be at least 1, got --shots 0 --trials 5"),
                           (["--shots", "2", "--trials", "0"], "--shots and --trials must be at least 1"),
                           (["--mode", "knn", "--loo", "--shots", "2"], "--loo does not combine with --shots"),
                           (["--trials", "3"], "--trials is a few-shot option (--shots K)"),
                           (["--shots", "1", "--lambd", "-1"], "--lambd must be a finite positive number")):
        assert message in run_main_error(monkeypatch, capsys, [*base, *flags])
    # --data synthetic: the class sizes are counted on the extracted labels
    data = common.SyntheticShapes(SIZE, 48, 0)
    counts = torch.bincount(torch.tensor([data.load(i)[1] for i in range(48)]), minlength=10)
    short = [c for c in range(10) if counts[c] < 5]
    first = int(counts[short[0]])
    err = run_main_error(monkeypatch, capsys, [*base, "--shots", "5"])
    assert err == (f"error: --shots 5: class '{data.classes[short[0]]}' has only {first} training "
                   f"image{'s' * (first != 1)} (and {len(short) - 1} more classes)")
    # an image folder: counted before any feature is extracted
    for split, sizes in (("train", {"ant": 3, "bee": 1}), ("val", {"ant": 1, "bee": 1})):
        for name, n in sizes.items():
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), (40 * i, 0, 0)).save(tmp_path / "data" / split / name / f"{i}.png")
    monkeypatch.setattr(ep, "extract_dataset", lambda *a: pytest.fail("extracted before checking the classes"))
    folder = ["--ckpt", str(ckpt), "--data", str(tmp_path / "data"), "--device", "cpu", "--output", str(out)]
    err = run_main_error(monkeypatch, capsys, [*folder, "--shots", "2", "--mode", "knn"])
    assert err == "error: --shots 2: class 'bee' has only 1 training image"
    assert out.read_text() == ""


# ------------------------------------------------------------------------------------------------ processes
@pytest.mark.slow
def test_two_processes_draw_and_score_the_same_trials(tmp_path):
    ckpt = micro_checkpoint(tmp_path / "random.pth")
    for mode in ("knn", "linear"):
        flags = ["--mode", mode, "--shots", "2", "--trials", "3"]
        one = tmp_path / f"one-{mode}.jsonl"
        probe(ckpt, one, *flags)
        two = tmp_path / f"two-{mode}.jsonl"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "eval_probe.py"), *fewshot_args(ckpt, two, *flags)]
        done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        a, b = rows_of(one), rows_of(two)
        assert [r.get("subset_sha1") for r in a] == [r.get("subset_sha1") for r in b]  # the same images in every trial
        for ra, rb in zip(a, b):
            assert (ra["top1"], ra["top5"]) == pytest.approx((rb["top1"], rb["top5"]))
