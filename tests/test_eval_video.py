"""Tests of eval_video.py: the DAVIS toolkit's J and F on hand-made masks, DINO's label propagation on hand cases,
the frame / position-table geometry, the synthetic DAVIS folder, and the whole evaluation (random-init encoder; a
trained micro encoder against the copy-first baseline in the slow test)."""
import json
import math
import re
import sys

import pytest
import torch

import common
import cli
import train_utils
import eval_video as ev
from conftest import run_inprocess

B = lambda rows: torch.tensor(rows, dtype=torch.bool)  # noqa: E731  (a mask from 0/1 rows)


# ------------------------------------------------------------------------------------------------------------ J
def test_region_j_hand_cases():
    pred, gt = torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)
    pred[0:2, 0:2], gt[0:2, 1:3] = True, True  # 2 shared pixels of 6 covered
    assert ev.region_j(pred, gt).item() == pytest.approx(2 / 6)
    empty = torch.zeros(4, 4, dtype=torch.bool)
    assert ev.region_j(empty, empty).item() == 1.0  # toolkit: an empty union scores 1
    assert ev.region_j(empty, gt).item() == 0.0 and ev.region_j(pred, empty).item() == 0.0
    void = torch.zeros(4, 4, dtype=torch.bool)
    void[:, 0] = True  # hides the 2 pixels that only pred covers: 2 shared of 4
    assert ev.region_j(pred, gt, void).item() == pytest.approx(2 / 4)
    batch = ev.region_j(torch.stack([pred, empty]), torch.stack([gt, empty]))
    assert batch.tolist() == pytest.approx([1 / 3, 1.0])


# ------------------------------------------------------------------------------------------------------------ F
def test_seg2bmap_hand_case():
    seg = B([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    # a pixel differing from its east, south or south-east neighbour: the ring half a pixel towards the origin;
    # the last row compares with the east neighbour only, the last column with the south one
    assert ev.seg2bmap(seg).int().tolist() == [[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert not ev.seg2bmap(torch.ones(3, 5, dtype=torch.bool)).any()  # the image border is no boundary
    seg = B([[0, 0, 0], [0, 0, 1], [0, 0, 1]])  # touching the last column and row
    assert ev.seg2bmap(seg).int().tolist() == [[0, 1, 1], [0, 1, 0], [0, 1, 0]]


def test_disk_and_dilation_against_their_definition():
    assert ev.disk(0).int().tolist() == [[1]]
    assert ev.disk(1).int().tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert ev.disk(2).int().tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0],
                                         [0, 0, 1, 0, 0]]
    for r in range(9):  # every (dy, dx) with dy^2 + dx^2 <= r^2; row dy holds 2 floor(sqrt(r^2 - dy^2)) + 1 pixels
        d = ev.disk(r)
        assert d.shape == (2 * r + 1, 2 * r + 1)
        assert all(bool(d[dy + r, dx + r]) == (dy * dy + dx * dx <= r * r) for dy in range(-r, r + 1)
                   for dx in range(-r, r + 1))
        assert d.sum() == sum(2 * math.isqrt(r * r - dy * dy) + 1 for dy in range(-r, r + 1))
    assert ev.disk(8).sum() == 197  # DAVIS 480p's tolerance disk: 17 + 2 (15 + 15 + 15 + 13 + 13 + 11 + 7 + 1)
    point = torch.zeros(1, 7, 7, dtype=torch.bool)
    point[0, 3, 3] = True
    assert torch.equal(ev.dilate(point, 2)[0, 1:6, 1:6], ev.disk(2)) and ev.dilate(point, 2).sum() == 13
    corner = torch.zeros(1, 4, 4, dtype=torch.bool)
    corner[0, 0, 0] = True  # pixels outside the image do not count
    assert ev.dilate(corner, 1)[0].int().tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_boundary_radius_is_the_toolkits():
    assert ev.boundary_radius((480, 854)) == 8  # ceil(0.008 * 979.7) = ceil(7.84)
    assert ev.boundary_radius((20, 20)) == 1  # ceil(0.008 * 28.3) = ceil(0.23)
    assert ev.boundary_radius((20, 20), bound_th=3) == 3  # bound_th >= 1: pixels


def half_plane(columns, size=20):
    m = torch.zeros(1, size, size, dtype=torch.bool)
    m[..., :columns] = True  # boundary: column columns - 1, all rows
    return m


def test_boundary_f_tolerance_and_hand_cases():
    gt = half_plane(10)  # 20 x 20: the tolerance is 1 px
    assert ev.boundary_f(gt, gt).item() == 1.0
    assert ev.boundary_f(half_plane(11), gt).item() == 1.0  # boundary 1 px off: within the tolerance, all matched
    assert ev.boundary_f(half_plane(9), gt).item() == 1.0
    assert ev.boundary_f(half_plane(12), gt).item() == 0.0  # 2 px off: nothing matched, P = R = 0
    assert ev.boundary_f(half_plane(12), gt, bound_th=2).item() == 1.0  # unless the tolerance is 2 px
    pred = half_plane(10).clone()
    pred[0, 5:7, 16:18] = True  # an extra 2 x 2 blob: 8 boundary pixels (see the seg2bmap case), 6+ px from gt's
    # P = 20 / 28 (gt's 20 boundary pixels matched, the blob's 8 not), R = 20 / 20: F = 2 P R / (P + R) = 5 / 6
    assert ev.boundary_f(pred, gt).item() == pytest.approx(5 / 6)
    empty, full = torch.zeros(1, 20, 20, dtype=torch.bool), torch.ones(1, 20, 20, dtype=torch.bool)
    assert ev.boundary_f(empty, gt).item() == 0.0  # no predicted boundary: P = 1, R = 0
    assert ev.boundary_f(gt, empty).item() == 0.0  # no true boundary: P = 0, R = 1
    assert ev.boundary_f(empty, empty).item() == 1.0 and ev.boundary_f(full, empty).item() == 1.0  # neither has one
    void = torch.zeros(1, 20, 20, dtype=torch.bool)
    void[0, :, 14:] = True  # hides the blob: pred & ~void has gt's boundary only
    assert ev.boundary_f(pred, gt, void).item() == 1.0


def test_score_video_skips_first_and_last_frames_and_means_over_objects():
    gt = torch.zeros(4, 6, 6, dtype=torch.long)
    gt[:, 0:2, 0:2], gt[:, 3:6, 3:6] = 1, 2
    pred = gt.clone()
    pred[0], pred[3] = 0, 0  # wrong only on the frames that are not scored
    pred[2][pred[2] == 1] = 0  # object 1 lost in frame 2
    j, f = ev.score_video(pred, gt, 2)
    assert j.shape == f.shape == (2, 2)  # objects x frames 1..T-2
    assert j.tolist() == [[1.0, 0.0], [1.0, 1.0]] and f.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    # the toolkit's means run over objects, not videos: 1 object at J = 1 and 3 at J = 0 -> J_m = 25 %
    s = ev.summary([torch.tensor([1.0]), torch.zeros(3)], [torch.tensor([1.0]), torch.ones(3)])
    assert (s["J_m"], s["F_m"], s["J&F_m"]) == (25.0, 100.0, 62.5)


# ------------------------------------------------------------------------------------------- label propagation
def test_propagated_labels_follow_the_features():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # a 2 x 4 grid: frame 0 has feature e0 and label 1 on the left half, e1 and label 0 on the right half
    left = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    source = torch.where(left[:, None], e0, e1)  # [8, 2]
    segs = torch.stack([(~left).float(), left.float()])  # [C=2, 8]: label 1 on the left
    target = torch.where(left[:, None], e1, e0)  # the regions swapped sides
    out = ev.propagate_labels(target, source[None], segs[None], topk=4, temperature=0.1)
    assert torch.equal(out, torch.stack([left.float(), (~left).float()]))  # label 1 moved to the right half


def test_topk_weights_are_the_softmax_of_the_kept_similarities():
    angles = torch.tensor([0.0, math.acos(0.8), math.acos(0.6), math.pi / 2])  # cos 1, 0.8, 0.6, 0
    sources = torch.stack([angles.cos(), angles.sin()], 1)[None]  # [1, 4, 2]
    segs = torch.tensor([[[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]])  # labels A, B, B, A
    target = torch.tensor([[1.0, 0.0]])
    for k, kept in ((1, [1.0]), (3, [1.0, 0.8, 0.6]), (4, [1.0, 0.8, 0.6, 0.0])):
        for t in (0.1, 1.0):
            w = [math.exp(c / t) for c in kept]
            a = (w[0] + (w[3] if k == 4 else 0.0)) / sum(w)  # exp(cos / T), normalised over the k kept
            out = ev.propagate_labels(target, sources, segs, topk=k, temperature=t)[:, 0]
            assert out.tolist() == pytest.approx([a, 1 - a], rel=1e-5), (k, t)
    # top-k runs over all context frames together: two frames of one patch each, the better one wins at k = 1
    frames = torch.stack([sources[0, 1:2], sources[0, 0:1]])  # [2, 1, 2]: frame 0 holds the cos-0.8 patch (B)
    frame_segs = torch.tensor([[[0.0], [1.0]], [[1.0], [0.0]]])  # [2, C=2, 1]: frame 1 holds the cos-1 patch (A)
    assert ev.propagate_labels(target, frames, frame_segs, topk=1)[:, 0].tolist() == [1.0, 0.0]


def test_neighbourhood_restricts_the_sources():
    mask = ev.neighbourhood_mask(2, 3, 1)  # patches row-major: (0,0) (0,1) (0,2) (1,0) (1,1) (1,2)
    assert mask[0].int().tolist() == [1, 1, 0, 1, 1, 0] and mask[4].all()
    assert mask.equal(mask.T) and ev.neighbourhood_mask(2, 3, 2).all()
    # a 1 x 5 grid: target patch 0 looks exactly like source patch 4 (label 1); its neighbours 0 and 1 are label 0
    feats = torch.eye(5)
    target = feats.clone()
    target[0] = feats[4]
    segs = torch.tensor([[[1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]]])
    free = ev.propagate_labels(target, feats[None], segs, topk=1)
    near = ev.propagate_labels(target, feats[None], segs, topk=1, allowed=ev.neighbourhood_mask(1, 5, 1))
    assert free[:, 0].tolist() == [0.0, 1.0]  # no window: the far look-alike's label
    assert near[:, 0].tolist() == [1.0, 0.0]  # window of radius 1: only sources 0 and 1, both label 0


def test_labels_from_scores_normalises_each_channel_then_argmax():
    # raw scores would tie (0.5, 0.5) at the right patch; min-max per channel makes channel 1 win there
    seg = torch.tensor([[[0.6, 0.5]], [[0.4, 0.5]]])  # [C=2, h=1, w=2]
    assert ev.labels_from_scores(seg, 1, (2, 4)).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    # patch 2: bilinear upsampling (align_corners False) of [1, 0] gives [1, .75, .25, 0]
    seg = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert ev.labels_from_scores(seg, 2, (2, 4)).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


# ------------------------------------------------------------------------------------------- frames, positions
def test_frame_size_follows_dino():
    assert ev.dino_frame_size(480, 854, 480, 16) == (480, 832)  # DAVIS 480p: long side 854 -> 832 (13 x 64)
    assert ev.dino_frame_size(480, 854, 480, 8) == (480, 832)
    assert ev.dino_frame_size(854, 480, 480, 16) == (832, 480)  # portrait
    assert ev.dino_frame_size(480, 854, 480, 14) == (476, 826)  # then multiples of the patch
    assert ev.dino_frame_size(64, 128, 64, 8) == (64, 128)
    with pytest.raises(ValueError, match="smaller than one"):
        ev.dino_frame_size(64, 96, 8, 16)


def test_resize_labels_maps_pixel_centres():
    labels = torch.arange(6).view(1, 6)
    assert ev.resize_labels(labels, (1, 3)).tolist() == [[1, 3, 5]]  # floor((i + 0.5) * 2): 1, 3, 5
    assert ev.resize_labels(torch.tensor([[0, 1]]), (1, 4)).tolist() == [[0, 0, 1, 1]]


def test_patch_features_match_the_encoder_and_interpolate_positions():
    torch.manual_seed(0)
    vit = common.build_vit("micro", img_size=32).eval()
    imgs = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ev.patch_features(vit, imgs[0]), vit(imgs)[0, 1:], atol=1e-5)  # own grid: unchanged
    pos = ev.interpolate_pos_embed(vit.pos_embed, (3, 6))
    assert pos.shape == (1, 1 + 18, 64) and torch.equal(pos[:, 0], vit.pos_embed[:, 0])  # cls row kept
    const = torch.ones(1, 17, 4) * torch.arange(4.0)  # a constant table stays constant under bicubic resizing
    assert torch.allclose(ev.interpolate_pos_embed(const, (5, 7))[:, 1:], torch.arange(4.0).expand(1, 35, 4))
    assert ev.patch_features(vit, torch.randn(3, 24, 48)).shape == (3 * 6, 64)


# ------------------------------------------------------------------------------------------- synthetic folder
def test_synthetic_davis_is_deterministic_and_well_formed(tmp_path):
    names = ev.write_synthetic_davis(tmp_path / "a", videos=2, objects=3, frames=5, size=(32, 64), seed=3)
    ev.write_synthetic_davis(tmp_path / "b", videos=2, objects=3, frames=5, size=(32, 64), seed=3)
    assert (tmp_path / "a/ImageSets/2017/val.txt").read_text().split() == names == ["synthetic-00", "synthetic-01"]
    videos = ev.davis_videos(tmp_path / "a")
    for name, frames, annotations in videos:
        assert len(frames) == 5 and [f.stem for f in frames] == [a.stem for a in annotations]
        labels, palette = ev.read_annotation(annotations[0])
        assert labels.shape == (32, 64) and sorted(labels.unique().tolist()) == [0, 1, 2, 3]
        assert palette[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # the DAVIS palette: black, dark red, dark green
        for a in annotations:
            assert (tmp_path / "b" / a.relative_to(tmp_path / "a")).read_bytes() == a.read_bytes()
        for f in frames:
            assert (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes() == f.read_bytes()


# ------------------------------------------------------------------------------------------- whole evaluation
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("davis")
    ev.write_synthetic_davis(root, videos=2, objects=2, frames=8, size=(64, 128), seed=0)
    return root


def random_checkpoint(path):
    torch.manual_seed(0)
    train_utils.save_checkpoint(path, train_utils.encoder_export(common.build_vit("micro", img_size=32), "random-init"))
    return path


def evaluate(ckpt, data, output, *flags):
    return ev.main(ev.build_parser().parse_args(["--ckpt", str(ckpt), "--data", str(data), "--short-side", "64",
                                                 "--device", "cpu", "--output", str(output), *flags]))


def test_whole_evaluation_outputs(synthetic, tmp_path, capsys):
    row = evaluate(random_checkpoint(tmp_path / "random.pth"), synthetic, tmp_path / "r.jsonl", "--save-masks",
                   str(tmp_path / "masks"))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.search(r"J&F_m (\d+\.\d)  J_m (\d+\.\d)  F_m (\d+\.\d)", last)
    assert m, last
    jf, j, f = map(float, m.groups())
    assert abs(jf - (j + f) / 2) <= 0.1 and (j, f) == (round(row["J_m"], 1), round(row["F_m"], 1))
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == ["video", "video", "summary"] and rows[-1] == json.loads(json.dumps(row))
    per_object_j = [v for r in rows[:2] for v in r["propagation"]["J"]]  # the toolkit's mean over all objects
    assert len(per_object_j) == row["objects"] == 4 and row["J_m"] == pytest.approx(sum(per_object_j) / 4)
    assert row["J&F_m"] == pytest.approx((row["J_m"] + row["F_m"]) / 2)
    assert row["ckpt_step"] is None and row["topk"] == 5 and row["temperature"] == 0.1
    assert 0 <= row["copy_first"]["J_m"] < 100 and 0 <= row["J_m"] <= 100
    for name, frames, annotations in ev.davis_videos(synthetic):
        saved = sorted((tmp_path / "masks" / name).glob("*.png"))
        assert [p.name for p in saved] == [a.name for a in annotations]
        first, palette = ev.read_annotation(saved[0])
        assert torch.equal(first, ev.read_annotation(annotations[0])[0]) and palette == ev.read_annotation(
            annotations[0])[1]
        assert all(ev.read_annotation(p)[0].shape == first.shape for p in saved)
        assert set(ev.read_annotation(saved[-1])[0].unique().tolist()) <= {0, 1, 2}


def run_cli(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["eval_video.py", *argv])
    with pytest.raises(SystemExit) as e:
        cli.run_main(ev.main, ev.build_parser())
    err = capsys.readouterr().err.strip()
    return e.value.code, err


def test_bad_input_is_one_line(synthetic, tmp_path, monkeypatch, capsys):
    ckpt = random_checkpoint(tmp_path / "random.pth")
    code, err = run_cli(["--ckpt", str(ckpt), "--data", str(tmp_path / "nowhere")], monkeypatch, capsys)
    assert code == 2 and err == f"error: DAVIS folder not found: {tmp_path / 'nowhere'}"
    (tmp_path / "bare").mkdir()
    code, err = run_cli(["--ckpt", str(ckpt), "--data", str(tmp_path / "bare")], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: ") and "has no JPEGImages/480p folder" in err and "\n" not in err
    ev.write_synthetic_davis(tmp_path / "d", videos=2, objects=1, frames=4, size=(32, 64))
    (tmp_path / "d/Annotations/480p/synthetic-01/00000.png").unlink()
    code, err = run_cli(["--ckpt", str(ckpt), "--data", str(tmp_path / "d")], monkeypatch, capsys)
    assert code == 2 and err == (f"error: video synthetic-01: no first-frame annotation "
                                 f"({tmp_path / 'd/Annotations/480p/synthetic-01/00000.png'})")
    (tmp_path / "d/JPEGImages/480p/empty").mkdir()
    code, err = run_cli(["--ckpt", str(ckpt), "--data", str(tmp_path / "d"), "--videos", "empty"], monkeypatch, capsys)
    assert code == 2 and err == f"error: video empty: no frames (*.jpg) in {tmp_path / 'd/JPEGImages/480p/empty'}"
    (tmp_path / "d/ImageSets/2017/val.txt").unlink()
    code, err = run_cli(["--ckpt", str(ckpt), "--data", str(tmp_path / "d")], monkeypatch, capsys)
    assert code == 2 and "has no ImageSets/2017/val.txt" in err and "\n" not in err
    code, err = run_cli(["--data", str(synthetic)], monkeypatch, capsys)
    assert code == 2 and err == "error: --ckpt and --data are required (or --make-synthetic DIR)"


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A micro Latent MIM encoder after 48 steps (the tests' tiny run at 256 synthetic images of 32 px, batch 16,
    3 epochs, lr 1e-3: the tiny run's own lr, blr x 4 / 256, barely moves the weights); about 20 s on CPU."""
    out = tmp_path_factory.mktemp("lmim")
    run_inprocess("latent_mim", out, None, "--synthetic-size", "256", "--batch-size", "16", "--lr", "1e-3",
                  "--epochs", "3")
    return out / "checkpoint.pth"


@pytest.mark.slow
def test_trained_encoder_propagation_beats_copying_the_first_frame(trained_checkpoint, synthetic, tmp_path):
    trained = evaluate(trained_checkpoint, synthetic, tmp_path / "t.jsonl")
    random_init = evaluate(random_checkpoint(tmp_path / "random.pth"), synthetic, tmp_path / "r.jsonl")
    print(f"\nsynthetic DAVIS J&F_m: trained micro Latent MIM {trained['J&F_m']:.1f}, random init "
          f"{random_init['J&F_m']:.1f}, copy-first {trained['copy_first']['J&F_m']:.1f}")
    assert trained["ckpt_step"] == 48  # 256 images / batch 16 x 3 epochs
    assert trained["copy_first"] == random_init["copy_first"]  # the baseline does not depend on the encoder
    assert trained["J&F_m"] > trained["copy_first"]["J&F_m"] + 10
