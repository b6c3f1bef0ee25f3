"""The image loader against bad files: decompression bombs, FIFOs and other non-regular files, unreadable class
folders, 16-bit images, extensions it does not read, and data so broken that the run must stop (fast, one line);
plus the k-NN clamp and the checkpoint position in eval_probe.py's results."""
import importlib
import json
import os
import signal
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import train_log
import train_utils
import eval_probe as ep
from common import DataError, ImageFolder, SeededDataset

SIZE = 32


def make_class(folder, count, color=(200, 90, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (40, 40), (color[0], color[1], 20 * i)).save(folder / f"{i}.jpg")


def png_header(path, width, height):
    """A tiny PNG whose header (IHDR) claims width x height pixels: Pillow refuses it at open time."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def dataset(folder):
    return SeededDataset(folder, common.image_transform(common.eval_transform(SIZE)))


@pytest.fixture
def deadline():
    """Fail a test that would hang (a FIFO opened for reading waits for a writer) instead of blocking the suite."""
    def on_alarm(*_):
        raise TimeoutError("the loader hung")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(120)  # generous: the suite may share a busy machine
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------- bombs and non-regular files
def test_bomb_png_is_skipped_reported_and_replaced_within_its_class(tmp_path, capsys):
    make_class(tmp_path / "a", 2)
    make_class(tmp_path / "b", 2, color=(10, 250, 0))
    png_header(tmp_path / "a" / "bomb.png", 20000, 20000)  # 4e8 pixels > 2 x PIL.Image.MAX_IMAGE_PIXELS
    folder = ImageFolder(tmp_path)
    bomb = [Path(p).name for p, _ in folder.samples].index("bomb.png")
    assert folder.samples[bomb][1] == 0 and folder.class_range(bomb) == (0, 3)
    with pytest.raises(OSError, match="bomb.png.*exceeds limit.*MAX_IMAGE_PIXELS"):
        folder.load(bomb)
    x, label, bad = dataset(folder)[bomb]
    assert (label, bad) == (0, bomb) and x.shape == (3, SIZE, SIZE)
    # replaced by the next image of class a, wrapping around: a/0.jpg, not b/0.jpg (the next file of the dataset)
    assert torch.equal(x, dataset(folder)[0][0])
    logger = train_log.StepLogger(train_utils.Dist("cpu"), tmp_path, every=1)
    logger.note_bad(torch.tensor([-1, bomb, bomb]), dataset(folder))
    assert capsys.readouterr().err.count("skipped unreadable image") == 1 and logger.bad_in_epoch == 2


def test_fifo_is_skipped_at_scan_time_and_refused_at_read_time(tmp_path, deadline, capsys):
    make_class(tmp_path / "a", 3)
    os.mkfifo(tmp_path / "a" / "x.jpg")  # no writer: a plain open() would wait forever
    os.symlink(tmp_path / "missing.jpg", tmp_path / "a" / "dangling.jpg")
    os.symlink("/dev/zero", tmp_path / "a" / "device.jpg")  # endless: it would be read until memory runs out
    folder = ImageFolder(tmp_path)
    assert len(folder) == 3 and folder.skipped == {"not a regular file": 3}
    assert "skipped 3 entries" in capsys.readouterr().err
    with pytest.raises(OSError, match="device.jpg: not a regular file"):
        common.read_image(tmp_path / "a" / "device.jpg")
    # a file replaced by a FIFO after the scan: refused without blocking, and the sample replaced
    os.remove(tmp_path / "a" / "1.jpg")
    os.mkfifo(tmp_path / "a" / "1.jpg")
    t0 = time.perf_counter()
    with pytest.raises(OSError, match="not a regular file"):
        folder.load(1)
    x, label, bad = dataset(folder)[1]
    assert (label, bad) == (0, 1) and time.perf_counter() - t0 < 5
    assert torch.equal(x, dataset(folder)[2][0])


# ----------------------------------------------------------------------------------------- unreadable class folder
def deny(monkeypatch, folder_name):
    """Reads of files under the folder `folder_name` fail as after `chmod 000` (which does not stop root)."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if f"{os.sep}{folder_name}{os.sep}" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", fake_open)


def test_an_unreadable_file_is_replaced_by_an_image_of_the_same_class(tmp_path, monkeypatch):
    make_class(tmp_path / "a", 3)
    make_class(tmp_path / "b", 3, color=(10, 250, 0))
    folder, calls = ImageFolder(tmp_path), []
    reference = [dataset(folder)[i][0] for i in range(6)]
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):  # a/2.jpg, the last file of class a, cannot be read
        calls.append(path)
        if str(path).endswith(f"a{os.sep}2.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", fake_open)
    x, label, bad = dataset(folder)[2]
    assert (label, bad) == (0, 2)
    assert torch.equal(x, reference[0])  # a/0.jpg (wrapped within the class), not b/0.jpg, the dataset's next file
    assert dataset(folder)[3][2] == -1  # other files are unaffected


def test_a_whole_unreadable_class_stops_with_a_clear_error(tmp_path, monkeypatch):
    make_class(tmp_path / "a", 3)
    make_class(tmp_path / "b", 4, color=(10, 250, 0))
    folder = ImageFolder(tmp_path)
    deny(monkeypatch, "b")
    assert dataset(folder)[0][2] == -1  # class a still reads
    with pytest.raises(DataError) as info:
        dataset(folder)[4]
    message = str(info.value)
    assert "none of the 4 images of the class of" in message and "Permission denied" in message
    assert "\n" not in message and isinstance(info.value, ValueError)  # one line, exit code 2 (run_main)


def test_an_unreadable_class_folder_at_start_up_is_a_user_error(tmp_path, monkeypatch):
    make_class(tmp_path / "a", 2)
    make_class(tmp_path / "b", 2)
    real_scandir = os.scandir

    def fake_scandir(path="."):
        if str(path).endswith(f"{os.sep}b"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", fake_scandir)
    with pytest.raises(ValueError, match="cannot read class folder .*b \\(Permission denied\\)"):
        ImageFolder(tmp_path)


# ------------------------------------------------------------------------------------------------ bounded retries
def broken_folder(root, classes=2, per_class=30):
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{c}" / f"{i:02d}.jpg").write_text("not a JPEG")
    return root


def test_every_image_broken_fails_fast_after_bounded_retries(tmp_path, monkeypatch):
    folder = ImageFolder(broken_folder(tmp_path / "data"))
    tried = []
    real_read = common.read_image
    monkeypatch.setattr(common, "read_image", lambda path: tried.append(path) or real_read(path))
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="neither .*00.jpg nor the next 9 images of its class can be read"):
        dataset(folder)[0]
    assert len(tried) == common.MAX_READ_TRIES == 10 and time.perf_counter() - t0 < 2
    assert all(f"c0{os.sep}" in p for p in tried)  # never another class's file


def test_data_error_from_a_loader_worker_keeps_its_one_line_message(tmp_path):
    folder = ImageFolder(broken_folder(tmp_path / "data", classes=1, per_class=3))
    loader = common.make_loader(dataset(folder), batch_size=2, num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    assert str(info.value) == (f"none of the 3 images of the class of {folder.path(0)} can be read (last: "
                               f"unreadable image {folder.path(2)}: cannot identify image file (not an image, or a "
                               f"format Pillow does not read)); fix or remove the unreadable files")


def test_too_large_a_share_of_unreadable_samples_stops_the_run(tmp_path):
    folder = ImageFolder(broken_folder(tmp_path / "data", classes=1, per_class=3))
    logger = train_log.StepLogger(train_utils.Dist("cpu"), tmp_path, every=1)
    logger.note_bad(torch.zeros(100, dtype=torch.long), dataset(folder))  # a first batch of bad images only
    for _ in range(8):  # 100 of 900 samples, but fewer than BAD_MIN_SAMPLES = 1000 read: goes on
        logger.note_bad(torch.full((100,), -1), dataset(folder))
    with pytest.raises(DataError, match="110 of the 1000 images read so far were unreadable \\(more than 10%\\)"):
        logger.note_bad(torch.tensor([0] * 10 + [-1] * 90), dataset(folder))
    ok = train_log.StepLogger(train_utils.Dist("cpu"), tmp_path, every=1)
    for _ in range(10):
        ok.note_bad(torch.tensor([0] * 10 + [-1] * 90), dataset(folder))  # exactly 10%: not more, goes on
    assert ok.bad_read == 100 and ok.samples_read == 1000


# ------------------------------------------------------------------------------------------------- 16-bit images
@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I", ".tif"), ("I;16B", ".tif")])
def test_16_bit_images_are_scaled_to_8_bits(tmp_path, mode, suffix):
    values = np.array([[0, 257, 1000, 32768, 65535]])
    if mode == "I;16B":
        img = Image.frombytes(mode, (5, 1), values.astype(">u2").tobytes())
    else:
        img = Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.int32))
    path = tmp_path / f"deep{suffix}"
    img.save(path)
    assert Image.open(path).mode == mode
    rgb = np.asarray(common.read_image(path))
    assert rgb.shape == (1, 5, 3) and (rgb == rgb[..., :1]).all()
    assert rgb[0, :, 0].tolist() == [0, 1, 4, 128, 255]  # round(v / 257), not clipped to 255


def test_8_bit_images_read_as_before(tmp_path):
    make_class(tmp_path / "a", 1)
    Image.new("L", (9, 7), 77).save(tmp_path / "a" / "grey.png")
    Image.new("P", (9, 7), 3).save(tmp_path / "a" / "palette.png")
    for name in ("0.jpg", "grey.png", "palette.png"):
        with Image.open(tmp_path / "a" / name) as img:
            assert common.read_image(tmp_path / "a" / name).tobytes() == img.convert("RGB").tobytes()


# ------------------------------------------------------------------------------------------- skipped extensions
def test_files_not_read_are_counted_by_kind_and_reported_once(tmp_path, capsys, monkeypatch):
    make_class(tmp_path / "a", 2)
    make_class(tmp_path / "b", 2)
    for name in ("x.gif", "y.GIF", "notes.txt"):
        (tmp_path / "a" / name).write_bytes(b"")
    (tmp_path / "b" / "README").write_text("")
    (tmp_path / "b" / "nested").mkdir()
    os.mkfifo(tmp_path / "b" / "pipe.png")
    folder = ImageFolder(tmp_path)
    assert len(folder) == 4
    assert folder.skipped == {".gif": 2, ".txt": 1, "no extension": 1, "not a regular file": 1, "sub-folder": 1}
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: {tmp_path}: skipped 6 entries of the class folders (.gif: 2, .txt: 1, no extension: 1, "
                   f"not a regular file: 1, sub-folder: 1); read are regular files with the extensions .jpg .jpeg "
                   f".png .ppm .bmp .pgm .tif .tiff .webp"]
    monkeypatch.setenv("RANK", "1")  # other processes of a torchrun do not repeat it
    ImageFolder(tmp_path)
    assert capsys.readouterr().err == ""
    clean = tmp_path / "clean"
    make_class(clean / "a", 1)
    assert ImageFolder(clean).skipped == {} and capsys.readouterr().err == ""
    (clean / "gifs").mkdir()
    (clean / "gifs" / "x.gif").write_bytes(b"")
    with pytest.raises(ValueError, match="gifs contains no images \\(1 other entries; read are regular files with "):
        ImageFolder(clean)


# ------------------------------------------------------------------------------ eval_probe: k-NN k and checkpoint
def probe(ckpt, tmp_path, *flags):
    args = ["--ckpt", str(ckpt), "--data", "synthetic", "--synthetic-size", "48", "--num-workers", "0",
            "--batch-size", "16", "--device", "cpu", "--mode", "knn", "--output", str(tmp_path / "p.jsonl"), *flags]
    return ep.main(ep.build_parser().parse_args(args))


def test_knn_k_beyond_the_training_set_is_clamped_and_recorded(tmp_path, capsys):
    torch.manual_seed(0)
    vit = common.build_vit("micro", img_size=SIZE)
    ours = tmp_path / "ours.pth"
    train_utils.save_checkpoint(ours, {"step": 7, "epoch": 2, **train_utils.encoder_export(vit, "pcae")})
    row = probe(ours, tmp_path, "--nb-knn", "5", "100", "200")  # 48 training images
    assert sorted(row["knn"], key=int) == ["1", "5", "48"] and row["k"] == 48 and row["nb_knn"] == [5, 100, 200]
    err = capsys.readouterr().err
    assert "warning: k-NN: only 48 training images can vote; k = 100, 200 clamped to 48" in err
    assert (row["ckpt_step"], row["ckpt_epoch"]) == (7, 2)
    loo = probe(ours, tmp_path, "--loo", "--nb-knn", "20")  # 12 val images, 11 others each
    assert sorted(loo["knn"], key=int) == ["1", "11"] and loo["k"] == 1
    assert "only 11 other val images can vote" in capsys.readouterr().err
    public = tmp_path / "public.pth"
    torch.save({"model": vit.state_dict(), "epoch": 799}, public)  # MAE's layout: its epoch is not our position
    row = probe(public, tmp_path, "--nb-knn", "3", "--num-heads", "4")
    assert row["ckpt_step"] is None and row["ckpt_epoch"] is None
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(r["ckpt_step"], r["ckpt_epoch"]) for r in lines] == [(7, 2), (7, 2), (None, None)]


def test_knn_votes_refuses_more_neighbours_than_it_has():
    feats, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    assert set(ep.knn_votes(feats, labels, feats, [1, 4])) == {1, 4}
    with pytest.raises(ValueError, match="k = 5 but only 4"):
        ep.knn_votes(feats, labels, feats, [5])
    with pytest.raises(ValueError, match="k = 4 but only 3"):
        ep.knn_votes(feats, labels, feats, [4], exclude_self=True)


# ------------------------------------------------------------------------------------ end to end, one training run
def test_training_run_over_bad_files_reports_and_counts_them(tmp_path, capsys, deadline):
    from conftest import argv
    root = tmp_path / "data"
    make_class(root / "train" / "a", 6)
    make_class(root / "train" / "b", 6, color=(10, 250, 0))
    png_header(root / "train" / "a" / "bomb.png", 20000, 20000)
    os.mkfifo(root / "train" / "a" / "pipe.jpg")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(root / "train" / "b" / "deep.png")
    (root / "train" / "b" / "anim.gif").write_bytes(b"")
    module = importlib.import_module("pcae")
    module.main(module.build_parser().parse_args(argv("pcae", tmp_path / "out", "", "--batch-size", "7",
                                                      data=str(root))))  # 14 images: all read in both epochs
    err = capsys.readouterr().err
    assert f"note: {root / 'train'}: skipped 2 entries of the class folders (.gif: 1, not a regular file: 1)" in err
    assert err.count(f"skipped unreadable image {root / 'train' / 'a' / 'bomb.png'}") == 1
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [row["bad_images"] for row in log] == [1, 1]


def test_a_link_loop_is_skipped_like_a_broken_link(tmp_path, capsys):
    make_class(tmp_path / "a", 2)
    os.symlink(tmp_path / "a" / "loop.jpg", tmp_path / "a" / "loop.jpg")  # a link to itself: ELOOP when followed
    os.symlink(tmp_path / "loop", tmp_path / "loop")  # and one where a class folder would be
    folder = ImageFolder(tmp_path)
    assert (folder.classes, len(folder), folder.skipped) == (["a"], 2, {"unreadable entry": 1})
    assert "skipped 1 entries of the class folders (unreadable entry: 1)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ names that are not UTF-8
@pytest.mark.parametrize("name", ["latent_mim", "pcae", "semmae-parts", "semmae", "finetune"])
def test_a_file_name_that_is_not_utf8_trains_saves_and_resumes(name, tmp_path, capsys):
    """POSIX names are bytes: a Latin-1 name (b'caf\\xe9.jpg') reaches Python as a str with a surrogate escape, which
    .encode() refuses. Every training mode reads such a file, writes its checkpoints (whose image-name hash takes the
    name's bytes) and resumes from them."""
    from conftest import argv, write_parts_file
    import finetune
    root = tmp_path / "data"
    for split in ("train", "val"):
        make_class(root / split / "a", 6)
        make_class(root / split / "b", 6, color=(10, 250, 0))
    latin1 = os.fsencode(root / "train" / "a") + b"/caf\xe9.jpg"
    os.rename(os.fsencode(root / "train" / "a" / "0.jpg"), latin1)
    out = tmp_path / "out"
    if name == "finetune":
        ckpt = tmp_path / "encoder.pth"
        train_utils.save_checkpoint(ckpt, train_utils.encoder_export(common.build_vit("micro", img_size=SIZE), "pcae"))
        flags = ["--ckpt", str(ckpt), "--data", str(root), "--epochs", "2", "--warmup-epochs", "1", "--batch-size",
                 "4", "--num-workers", "0", "--output-dir", str(out)]
        run = lambda *extra: finetune.main(finetune.build_parser().parse_args([*flags, *extra]))
    else:
        parts = ""
        if name == "semmae":  # a parts file of this folder: 12 images, 4 x 4 patches
            folder = ImageFolder(root / "train")
            parts = write_parts_file(tmp_path / "parts.pt")
            ckpt = train_utils.load_checkpoint(parts)
            train_utils.save_checkpoint(parts, {**ckpt, "part_ids": ckpt["part_ids"][:12],
                                           "paths": [folder.path(i) for i in range(12)]})
        module = importlib.import_module("semmae" if name.startswith("semmae") else name)
        run = lambda *extra: module.main(module.build_parser().parse_args(argv(name, out, parts, *extra,
                                                                               data=str(root))))
    run("--max-steps", "2")
    assert train_utils.load_checkpoint(out / "checkpoint.pth")["step"] == 2
    run()  # resumes from it: the image names hash the same
    done = train_utils.load_checkpoint(out / "checkpoint.pth")
    assert done["epoch"] == 2 and done["images"]["count"] == 12
