"""--decode device against the CPU path (SeededDataset with the same transform), on the CPU, where the device
path runs the same code as on a GPU: the same crop boxes and flips for the same seeds (against a hand-written copy
of torchvision's documented draw and through the CPU transforms themselves), the same pixels on JPEGs (libjpeg-turbo
decodes as Pillow does), odd files (PNG, CMYK, grayscale, progressive, truncated, a corrupt body, a FIFO), SemMAE's
part ids, the fine-tuning and linear-probe transforms, and determinism across runs and worker counts."""
import functools
import io
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import device_decode as dd
import eval_probe
import finetune
import semmae
import cli
import train_utils
from common import (DataError, ImageFolder, ResumableSampler, SeededDataset, SyntheticShapes, eval_transform,
                    image_transform, make_loader, pretrain_transform, seeded_draws)
from tools.bench import make_jpeg_folder

SIZE = 32


def smooth_image(seed, height, width):
    """An RGB PIL image with smooth colour fields plus grain (JPEG-friendly, no symmetry)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 4, 5, generator=g)
    img = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0] * 255
    img = (img + 10 * torch.randn(3, height, width, generator=g)).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def jpeg_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def make_odd_folder(root):
    """Class a: plain JPEGs and every odd case; class b: plain JPEGs. Returns {case: file name in a/}."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    cases = {"plain0": "a0.jpg", "plain1": "a1.jpg", "png": "b_png.jpg", "cmyk": "c_cmyk.jpg",
             "gray": "d_gray.jpg", "progressive": "e_prog.jpg", "truncated": "f_trunc.jpg",
             "corrupt_body": "g_dht.jpg", "plain2": "h2.jpg"}
    for k, (case, name) in enumerate(cases.items()):
        img = smooth_image(k, 48 + 7 * k, 64 - 3 * k)
        path = root / "a" / name
        if case == "png":  # a PNG named .jpg: decided by its magic bytes, not its extension
            img.save(path, format="PNG")
        elif case == "cmyk":
            path.write_bytes(jpeg_bytes(img.convert("CMYK")))
        elif case == "gray":
            path.write_bytes(jpeg_bytes(img.convert("L")))
        elif case == "progressive":
            path.write_bytes(jpeg_bytes(img, progressive=True))
        elif case == "truncated":  # good header, body cut (no end-of-image marker)
            data = jpeg_bytes(img)
            path.write_bytes(data[:len(data) // 2])
        elif case == "corrupt_body":  # header and end marker fine, Huffman table bogus: decoding fails
            data = bytearray(jpeg_bytes(img))
            at = data.index(b"\xff\xc4")
            data[at + 5:at + 21] = b"\xff" * 16
            path.write_bytes(bytes(data))
        else:
            path.write_bytes(jpeg_bytes(img))
    for k in range(5):
        (root / "b" / f"b{k}.jpg").write_bytes(jpeg_bytes(smooth_image(100 + k, 40 + 5 * k, 70)))
    return cases


def cpu_batches(dataset, batch, workers=0, seed=0):
    sampler = ResumableSampler(len(dataset), batch, seed=seed)
    return list(make_loader(dataset, batch, workers, sampler))


def device_batches(dataset, batch, workers=0, seed=0):
    sampler = ResumableSampler(len(dataset), batch, seed=seed)
    loader = make_loader(dataset, batch, workers, sampler)
    return list(dd.DeviceDecoder(dataset, "cpu").batches(iter(loader)))


def assert_same_batches(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
            assert torch.equal(x, y)


def rrc_box_by_hand(height, width, scale, ratio):
    """torchvision's RandomResizedCrop draw as its documentation and code describe it: up to 10 tries of an area
    share ~ U(scale) and a log aspect ratio ~ U(log ratio), sides rounded; the first box that fits takes a top-left
    corner ~ U{0..H-h}, then U{0..W-w}; else the centre crop clamped to the ratio range."""
    for _ in range(10):
        area = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        r = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w, h = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            return top, torch.randint(0, width - w + 1, size=(1,)).item(), h, w
    w, h = width, height
    if width / height < min(ratio):
        h = int(round(w / min(ratio)))
    elif width / height > max(ratio):
        w = int(round(h * max(ratio)))
    return (height - h) // 2, (width - w) // 2, h, w


# ------------------------------------------------------------------------------------------ boxes and flips
@pytest.mark.parametrize("height,width", [(375, 500), (61, 47), (20, 400), (400, 20)])  # last two: centre fallback
def test_boxes_and_flips_are_the_cpu_transforms(height, width):
    geometry = dd.Geometry(pretrain_transform(SIZE))
    cpu = pretrain_transform(SIZE)
    img = torch.randint(256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    flips = 0
    for seed in range(40):
        with seeded_draws(seed):
            box, flipped = geometry.draw(height, width)
        with seeded_draws(seed):
            hand = rrc_box_by_hand(height, width, (0.2, 1.0), (3 / 4, 4 / 3))
            hand_flip = torch.rand(1).item() < 0.5  # RandomHorizontalFlip(p=0.5): flips when rand < p
        assert (box, flipped) == (hand, hand_flip)
        with seeded_draws(seed):  # the CPU transform on a noise image: only this box and flip give its output
            expected = cpu(img)
        assert torch.equal(geometry.rest(geometry.apply(img, box, flipped)), expected)
        flips += flipped
    assert 0 < flips < 40


def test_tf_crop_box_through_the_probe_transform():
    crop = eval_probe.TFRandomResizedCrop(SIZE)
    geometry = dd.Geometry(eval_probe.probe_train_transform(SIZE),
                           box=functools.partial(eval_probe.tf_crop_params, scale=crop.scale, ratio=crop.ratio))
    img = torch.randint(256, (3, 70, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    cpu = eval_probe.probe_train_transform(SIZE)
    for seed in range(30):
        with seeded_draws(seed):
            box, flipped = geometry.draw(70, 90)
        with seeded_draws(seed):
            assert box == eval_probe.tf_crop_params(70, 90)
        with seeded_draws(seed):
            expected = cpu(img)
        assert torch.equal(geometry.rest(geometry.apply(img, box, flipped)), expected)


# --------------------------------------------------------------------------------------------------- pixels
def test_jpeg_folder_same_pixels_shapes_and_dtypes_as_the_cpu_path(tmp_path):
    """libjpeg-turbo decodes as Pillow does (checked first: if it did not, the bound below would not hold), and the
    crop, resize, flip and normalisation are the CPU path's kernels, so the bound on the difference is 0."""
    make_jpeg_folder(tmp_path, 24)
    folder = ImageFolder(tmp_path)
    transform = pretrain_transform(SIZE)
    decoder = dd.DeviceDecoder(dd.DecodeDataset(folder, transform), "cpu")
    for i in range(3):
        pil = torch.from_numpy(np.array(folder.load(i)[0])).permute(2, 0, 1)
        with open(folder.path(i), "rb") as f:
            assert torch.equal(decoder.decode([dd.tensor_of_bytes(f.read())])[0], pil)
    cpu = SeededDataset(folder, image_transform(transform))
    expected, got = cpu_batches(cpu, 8), device_batches(dd.DecodeDataset(folder, transform), 8)
    difference = torch.cat([(a[0] - b[0]).abs().flatten() for a, b in zip(expected, got)]).mean()
    print(f"mean |device - cpu| = {difference.item()} (normalised units)")
    assert difference == 0
    assert_same_batches(expected, got)
    assert got[0][0].shape == (8, 3, SIZE, SIZE) and got[0][0].dtype == torch.float32


# ----------------------------------------------------------------------------------------------- odd files
def test_odd_files_decode_and_the_corrupt_ones_are_replaced_as_on_the_cpu_path(tmp_path):
    cases = make_odd_folder(tmp_path)
    folder = ImageFolder(tmp_path)
    index = {case: folder.samples.index((str(tmp_path / "a" / name), 0)) for case, name in cases.items()}
    transform = pretrain_transform(SIZE)
    dataset = dd.DecodeDataset(folder, transform)
    on_device = {case: bool(dataset[(i, 7)]["jpeg"]) for case, i in index.items()}
    assert on_device == {"plain0": True, "plain1": True, "png": False, "cmyk": False, "gray": True,
                         "progressive": True, "truncated": False, "corrupt_body": True, "plain2": True}
    expected = cpu_batches(SeededDataset(folder, image_transform(transform)), len(folder))
    got = device_batches(dataset, len(folder))
    assert_same_batches(expected, got)
    bad = got[0][-1]
    assert sorted(bad[bad >= 0].tolist()) == sorted([index["truncated"], index["corrupt_body"]])


def test_a_file_turned_fifo_is_refused_without_waiting(tmp_path):
    make_odd_folder(tmp_path)
    folder = ImageFolder(tmp_path)
    victim = folder.samples.index((str(tmp_path / "a" / "a1.jpg"), 0))
    os.unlink(folder.path(victim))
    os.mkfifo(folder.path(victim))  # after the scan: a reader that waited for a writer would hang the loader
    signal.alarm(60)
    try:
        payload = dd.DecodeDataset(folder, pretrain_transform(SIZE))[(victim, 3)]
    finally:
        signal.alarm(0)
    assert payload["bad"] == victim and payload["jpeg"] == b""


def test_an_unreadable_class_stops_both_paths_with_the_same_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for k in range(2):
        data = jpeg_bytes(smooth_image(k, 40, 40))
        (tmp_path / "a" / f"{k}.jpg").write_bytes(data[:len(data) // 2])
        (tmp_path / "b" / f"{k}.jpg").write_bytes(data)
    folder = ImageFolder(tmp_path)
    transform = pretrain_transform(SIZE)
    with pytest.raises(DataError) as on_cpu:
        SeededDataset(folder, image_transform(transform))[(0, 5)]
    with pytest.raises(DataError) as on_device:
        dd.DecodeDataset(folder, transform)[(0, 5)]
    assert str(on_device.value) == str(on_cpu.value) and "none of the 2 images" in str(on_cpu.value)


# --------------------------------------------------------------------------------------- SemMAE, fine-tuning
def test_semmae_part_ids_and_images_equal_the_joint_transforms(tmp_path):
    make_odd_folder(tmp_path)
    folder = ImageFolder(tmp_path)
    ids = torch.randint(3, (len(folder), 4, 4), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    cpu = SeededDataset(semmae.WithParts(folder, ids), semmae.joint_transform(SIZE, 8, 3))
    dataset = dd.DecodeDataset(folder, pretrain_transform(SIZE), cpu, parts=(ids, 8, 3))
    expected, got = cpu_batches(cpu, 7), device_batches(dataset, 7)
    assert_same_batches(expected, got)
    assert got[0][1].shape == (7, (SIZE // 8) ** 2) and len(set(got[0][1].flatten().tolist())) > 1


@pytest.mark.parametrize("reprob", [0.25, 1.0])
def test_finetune_transform_is_the_cpu_paths_and_leaves_the_generator_alone(tmp_path, reprob):
    make_jpeg_folder(tmp_path, 16)
    folder = ImageFolder(tmp_path)
    transform = finetune.finetune_train_transform(SIZE, reprob=reprob)
    dataset = dd.DecodeDataset(folder, transform)
    assert not dataset.geometry.per_pixel and dataset.rng_bytes > 0
    torch.manual_seed(123)
    state = torch.get_rng_state()
    got = device_batches(dataset, 8)
    assert torch.equal(torch.get_rng_state(), state)  # the main process's draws are not disturbed
    expected = cpu_batches(SeededDataset(folder, image_transform(transform)), 8)
    assert_same_batches(expected, got)
    assert_same_batches(got, device_batches(dataset, 8))  # a pure function of (seed, sample)


# ------------------------------------------------------------------------------------------- determinism
def test_same_seeds_same_batches_for_0_and_2_workers(tmp_path):
    make_odd_folder(tmp_path)
    folder = ImageFolder(tmp_path)
    dataset = dd.DecodeDataset(folder, pretrain_transform(SIZE))
    first = device_batches(dataset, 4, workers=0, seed=3)
    assert_same_batches(first, device_batches(dataset, 4, workers=0, seed=3))
    assert_same_batches(first, device_batches(dataset, 4, workers=2, seed=3))
    other = device_batches(dataset, 4, workers=0, seed=4)
    assert not torch.equal(first[0][0], other[0][0])  # another seed: other samples and crops


# ------------------------------------------------------------------------------------------------ errors
def test_synthetic_data_and_other_transforms_are_refused():
    with pytest.raises(ValueError, match=r"^--decode device reads JPEG files; --data synthetic has none"):
        dd.check_device_decode("synthetic")
    dd.check_device_decode("/data/imagenet")  # a folder: fine
    with pytest.raises(ValueError, match="image folder"):
        dd.DecodeDataset(SyntheticShapes(32, 8), pretrain_transform(SIZE))
    with pytest.raises(ValueError, match="RandomHorizontalFlip"):
        dd.Geometry(eval_transform(SIZE))
    with pytest.raises(ValueError, match="box="):  # a crop whose box the workers cannot draw
        dd.Geometry(v2.Compose([v2.ToImage(), v2.RandomCrop(SIZE), v2.RandomHorizontalFlip()]))
    probe = dd.Geometry(eval_probe.probe_train_transform(SIZE))  # the TF-style crop gives its own box draw
    with seeded_draws(7):
        drawn = probe.draw(300, 500)[0]
    with seeded_draws(7):
        assert drawn == eval_probe.tf_crop_params(300, 500)
    assert isinstance(dd.Geometry(pretrain_transform(SIZE)).crop, v2.RandomResizedCrop)


# ------------------------------------------------------------------------------------------------- training runs
def pcae_run(data, out, *extra):
    """The tiny pcae run of the other tests on an image folder; returns its checkpoint."""
    import pcae
    from conftest import argv
    pcae.main(pcae.build_parser().parse_args(argv("pcae", out, "", *extra, data=str(data))))
    return train_utils.load_checkpoint(out / "checkpoint.pth")


def test_a_device_decode_run_trains_as_the_cpu_path_and_reports_the_unreadable_files(tmp_path, capsys):
    """pcae on a folder with a PNG, a CMYK, a grayscale, a progressive, a truncated and a corrupt JPEG: --decode device
    (decoding on the CPU here) trains the same weights as --decode cpu, bit for bit; the two unreadable files are
    reported once each and counted as the CPU path counts them; a stop and resume, also switching the path, changes
    nothing."""
    from conftest import assert_same_state
    make_odd_folder(tmp_path / "data" / "train")  # 14 images, batch 4: 3 steps per epoch
    data = tmp_path / "data"
    cpu = pcae_run(data, tmp_path / "cpu")
    capsys.readouterr()
    device = pcae_run(data, tmp_path / "device", "--decode", "device")
    err = capsys.readouterr().err
    assert_same_state(cpu, device)
    for name in ("f_trunc.jpg", "g_dht.jpg"):
        assert err.count(f"warning: skipped unreadable image {data / 'train' / 'a' / name}") == 1
    logs = {d: [json.loads(line)["bad_images"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("cpu", "device")}
    assert logs["device"] == logs["cpu"] and logs["device"][0] == 2  # 12 of the 14 images per epoch: both read
    pcae_run(data, tmp_path / "switched", "--max-steps", "4")  # epoch 1, step 1: the CPU path ...
    assert_same_state(cpu, pcae_run(data, tmp_path / "switched", "--decode", "device"))  # ... resumed on the device's


def test_decode_device_needs_image_files(monkeypatch, capsys):
    import pcae
    monkeypatch.setattr(sys, "argv", ["pcae.py", "--data", "synthetic", "--model", "micro", "--input-size", "32",
                                      "--decode", "device"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(pcae.main, pcae.build_parser())
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "error: --decode device reads JPEG files; --data synthetic has none (use --decode cpu)"]


@pytest.mark.slow
def test_two_processes_decoding_on_the_device_equal_one(tmp_path):
    from conftest import argv, assert_equivalent_runs, script_cmd, subprocess_env
    make_odd_folder(tmp_path / "data" / "train")
    data = tmp_path / "data"
    one = pcae_run(data, tmp_path / "one", "--decode", "device", "--batch-size", "4")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *script_cmd("pcae"), *argv("pcae", tmp_path / "ddp", "", "--decode", "device", "--batch-size", "2",
                                      data=str(data))]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_equivalent_runs(one, train_utils.load_checkpoint(tmp_path / "ddp" / "checkpoint.pth"))


def test_every_training_path_decodes_on_the_device_as_on_the_cpu(tmp_path):
    """SemMAE's semantic pretraining (part ids cropped in the workers), fine-tuning (RandAugment, erasing) and the
    full linear probe (the TF-style crop): --decode device (on the CPU) equals --decode cpu bit for bit."""
    import finetune
    from conftest import argv, assert_same_state
    for split in ("train", "val"):
        make_odd_folder(tmp_path / "data" / split)
    data = tmp_path / "data"
    semmae.main(semmae.build_parser().parse_args(argv("semmae-parts", tmp_path / "parts", "", "--epochs", "1",
                                                      data=str(data))))
    parts = tmp_path / "parts" / "parts.pt"
    runs = {}
    for decode in ("cpu", "device"):
        flags = ["--decode", decode, "--max-steps", "2"]
        semmae.main(semmae.build_parser().parse_args(argv("semmae", tmp_path / f"sem-{decode}", parts, *flags,
                                                          data=str(data))))
        ckpt = tmp_path / f"sem-{decode}" / "checkpoint.pth"
        finetune.main(finetune.build_parser().parse_args(
            ["--ckpt", str(ckpt), "--data", str(data), "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4",
             "--num-workers", "0", "--output-dir", str(tmp_path / f"ft-{decode}"), *flags]))
        row = eval_probe.main(eval_probe.build_parser().parse_args(
            ["--ckpt", str(ckpt), "--data", str(data), "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "4",
             "--num-workers", "0", "--decode", decode, "--output", str(tmp_path / f"probe-{decode}.jsonl")]))
        runs[decode] = [train_utils.load_checkpoint(tmp_path / f"{d}-{decode}" / "checkpoint.pth")
                        for d in ("sem", "ft")] + [row["history"]]
    for cpu, device in zip(runs["cpu"][:2], runs["device"][:2]):
        assert_same_state(cpu, device)
    assert runs["cpu"][2] == runs["device"][2]  # the probe's per-epoch loss and accuracy
