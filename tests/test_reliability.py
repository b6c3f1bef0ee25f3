"""Long-run reliability of every training script: kill and resume without loss, DDP equals one process, non-finite
losses stop the run, bad input gets a one-line error, unreadable images are skipped and reported."""
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import cli
import train_utils
from conftest import (SCRIPTS, argv, assert_equivalent_runs, assert_same_state, run_inprocess, script_cmd,
                      subprocess_env)


# ------------------------------------------------------------------------------------------------- kill and resume
@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(name, tmp_path, parts_file):
    reference = run_inprocess(name, tmp_path / "straight", parts_file)
    assert reference["step"] == 2 * 48 // 4 and reference["epoch"] == 2

    out = tmp_path / "killed"
    cmd = [sys.executable, *script_cmd(name), *argv(name, out, parts_file, "--save-every", "1")]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, deadline = out / "checkpoint.pth", time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill once the run is a few steps into epoch 0
        if ckpt.exists() and train_utils.load_checkpoint(ckpt)["step"] >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed = train_utils.load_checkpoint(ckpt)
    assert 3 <= killed["step"] < reference["step"]  # a mid-run checkpoint, not the final one

    resumed = run_inprocess(name, out, parts_file, "--save-every", "1")  # the same command again
    assert_same_state(reference, resumed)
    assert not list(out.glob(".checkpoint*.tmp*"))  # the half-written file of the kill is cleaned up


# --------------------------------------------------------------------------------------------- DDP == one process
@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_two_processes_equal_one_process_with_double_batch(name, tmp_path, parts_file):
    steps = ["--max-steps", "3"]
    one = run_inprocess(name, tmp_path / "one", parts_file, *steps, "--batch-size", "8")
    accum = run_inprocess(name, tmp_path / "accum", parts_file, *steps, "--batch-size", "4", "--accum", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *script_cmd(name), *argv(name, tmp_path / "ddp", parts_file, *steps, "--batch-size", "4")]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = train_utils.load_checkpoint(tmp_path / "ddp" / "checkpoint.pth")
    assert one["step"] == ddp["step"] == accum["step"] == 3
    assert_equivalent_runs(one, ddp)
    assert_equivalent_runs(one, accum)
    if name == "semmae-parts":  # stage A's part ids are computed by both processes and gathered
        assert torch.equal(train_utils.load_checkpoint(tmp_path / "one" / "parts.pt")["part_ids"],
                           train_utils.load_checkpoint(tmp_path / "ddp" / "parts.pt")["part_ids"])


# ------------------------------------------------------------------------------------------------ non-finite loss
MODELS = {"latent_mim": ("latent_mim", "LatentMIM"), "pcae": ("pcae", "PCAE"), "semmae": ("semmae", "SemMAE"),
          "semmae-parts": ("semmae", "PartLearner")}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(name, tmp_path, parts_file,
                                                                                 monkeypatch, capsys):
    module, cls_name = MODELS[name]
    cls = getattr(importlib.import_module(module), cls_name)
    original, calls = cls.forward, []

    def poisoned(self, *args, **kwargs):  # the loss of the third training step (step 2) is NaN
        loss, metrics = original(self, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), metrics
    monkeypatch.setattr(cls, "forward", poisoned)
    monkeypatch.setattr(sys, "argv", ["prog", *argv(name, tmp_path, parts_file, "--save-every", "1")])
    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(mod.main, mod.build_parser())
    assert exit_info.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: non-finite loss at step 2; training stopped, the checkpoint on disk is the last good "
                       "one")
    assert len(calls) == 3  # stopped at once: no fourth step
    ckpt = train_utils.load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["step"] == 2  # written after steps 0 and 1, never after the NaN step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_non_finite_loss_exit_code_from_the_command_line(tmp_path, root):
    # a learning rate that blows the weights up: the real command exits non-zero with the one-line message
    cmd = [sys.executable, str(root / "pcae.py"), *argv("pcae", tmp_path, ""), "--lr", "1e30", "--save-every", "1"]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite") and "training stopped" in last
    ckpt = train_utils.load_checkpoint(tmp_path / "checkpoint.pth")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# --------------------------------------------------------------------------------------------------- bad input
def make_folder(root, classes=("a", "b"), per_class=3, size=40):
    from PIL import Image
    for c, name in enumerate(classes):
        (root / "train" / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (40 * c + 20 * i, 90, 200)).save(root / "train" / name / f"{i}.jpg")
    return root


def cli_error(monkeypatch, capsys, module, args):
    """Run a script's CLI in-process; returns (exit code, stderr lines)."""
    mod = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", ["prog", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(mod.main, mod.build_parser())
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def bad_input_cases(tmp):
    """(name, module, arguments, expected words of the message) for every bad input of the issue."""
    empty_class = make_folder(tmp / "emptyclass")
    (empty_class / "train" / "c").mkdir()
    (tmp / "noclasses" / "train").mkdir(parents=True)
    (tmp / "notes.txt").write_text("not a checkpoint")
    other = tmp / "other.pth"  # a checkpoint of another architecture (a tiny ViT, not micro)
    train_utils.save_checkpoint(other, {"model": {}, "optimizer": {}, "method": "pcae", "epoch": 0, "samples": 0, "step": 0,
                                   **train_utils.encoder_export(common.build_vit("tiny", img_size=32), "pcae")})
    blocker = tmp / "file"
    blocker.write_text("x")
    good = make_folder(tmp / "good")
    pc, lm = ["--model", "micro", "--input-size", "32", "--num-workers", "0"], ["--model", "micro", "--input-size", "32"]
    return [
        ("missing data", "pcae", ["--data", str(tmp / "nope"), *pc], "not found"),
        ("no train folder", "latent_mim", ["--data", str(tmp), *lm], "has no 'train' folder"),
        ("no class folders", "pcae", ["--data", str(tmp / "noclasses"), *pc], "no class sub-folders"),
        ("empty class", "semmae", ["pretrain", "--data", str(empty_class), "--masking", "random", *pc],
         "contains no images"),
        ("size vs patch", "pcae", ["--data", "synthetic", "--model", "micro", "--input-size", "30"], "not divisible"),
        ("size vs patch", "semmae", ["pretrain", "--data", "synthetic", "--masking", "random", "--model", "micro",
                                     "--input-size", "30"], "not divisible"),
        ("size vs patch+gap", "latent_mim", ["--data", "synthetic", *lm, "--gap", "2", "--crop-size", "32"],
         "inconsistent"),
        ("mask ratio", "pcae", ["--data", "synthetic", *pc, "--mask-ratio", "1.2"], "--mask-ratio"),
        ("mask ratio", "latent_mim", ["--data", "synthetic", *lm, "--mask-ratio", "0"], "--mask-ratio"),
        ("mask ratio", "semmae", ["pretrain", "--data", "synthetic", "--masking", "random", "--mask-ratio", "-1"],
         "--mask-ratio"),
        ("keep ratio", "pcae", ["--data", "synthetic", *pc, "--keep-ratio", "1.5"], "--keep-ratio"),
        ("keep ratio", "pcae", ["--data", "synthetic", *pc, "--keep-ratio", "0"], "--keep-ratio"),
        ("drop stages", "pcae", ["--data", "synthetic", *pc, "--drop-after", "0,1,2,3,4"], "--drop-after"),
        ("parts file", "semmae", ["pretrain", "--data", str(good), "--parts", str(tmp / "wrong_parts.pt"), *pc],
         "parts for 48 images but the dataset has 6"),
        ("resume not a checkpoint", "pcae", ["--data", "synthetic", *pc, "--resume", str(tmp / "notes.txt")],
         "not a readable PyTorch checkpoint"),
        ("resume other architecture", "pcae", ["--data", "synthetic", *pc, "--resume", str(other),
                                               "--output-dir", str(tmp / "o1")], "does not match this model"),
        ("resume missing", "latent_mim", ["--data", "synthetic", *lm, "--resume", str(tmp / "none.pth"),
                                          "--output-dir", str(tmp / "o2")], "checkpoint not found"),
        ("teacher not a checkpoint", "semmae", ["parts", "--data", "synthetic", "--teacher", str(tmp / "notes.txt"),
                                                "--out", str(tmp / "p.pt")], "not a readable PyTorch checkpoint"),
        ("teacher other size", "semmae", ["parts", "--data", "synthetic", "--teacher", str(other), "--out",
                                          str(tmp / "p.pt"), "--input-size", "64"], "pass --input-size 32"),
        ("output not writable", "latent_mim", ["--data", "synthetic", *lm, "--output-dir", str(blocker / "out")],
         "not writable"),
        ("probe not a checkpoint", "eval_probe", ["--ckpt", str(tmp / "notes.txt"), "--data", "synthetic"],
         "not a readable PyTorch checkpoint"),
        ("probe other architecture", "eval_probe", ["--ckpt", str(other), "--data", "synthetic", "--input-size", "64"],
         "was built for 32 px"),
        *flag_and_data_cases(tmp, pc, lm),
    ]


def flag_and_data_cases(tmp, pc, lm):
    """Flags that used to give a traceback or be accepted, and data that cannot be read at all (fails fast)."""
    broken = tmp / "broken" / "train" / "a"
    broken.mkdir(parents=True)
    for i in range(3):
        (broken / f"{i}.jpg").write_text("not a JPEG")
    probe = ["--ckpt", str(tmp / "notes.txt"), "--data", "synthetic"]
    semmae = ["pretrain", "--data", "synthetic", "--masking", "random", *pc]
    cases = [
        ("lr nan", "latent_mim", ["--data", "synthetic", *lm, "--lr", "nan"], "--lr must be a finite positive number"),
        ("negative lr", "pcae", ["--data", "synthetic", *pc, "--lr", "-0.1"], "--lr must be a finite positive number"),
        ("blr inf", "semmae", [*semmae, "--blr", "inf"], "--blr must be a finite positive number"),
        ("weight decay nan", "pcae", ["--data", "synthetic", *pc, "--weight-decay", "nan"], "--weight-decay must be"),
        ("warmup nan", "pcae", ["--data", "synthetic", *pc, "--warmup-epochs", "nan"], "--warmup-epochs must be"),
        ("patch size 0", "pcae", ["--data", "synthetic", *pc, "--patch-size", "0"], "--patch-size must be at least 1"),
        ("patch size 0", "latent_mim", ["--data", "synthetic", *lm, "--patch-size", "0"], "--patch-size must be"),
        ("decoder heads 0", "pcae", ["--data", "synthetic", *pc, "--decoder-heads", "0"], "--decoder-heads"),
        ("decoder heads 0", "semmae", [*semmae, "--decoder-heads", "0"], "--decoder-heads"),
        ("decoder heads 0", "latent_mim", ["--data", "synthetic", *lm, "--decoder-heads", "0"], "--decoder-heads"),
        ("decoder dim vs heads", "semmae", [*semmae, "--decoder-dim", "30", "--decoder-heads", "4"], "--decoder-dim"),
        ("parts decoder channels", "semmae", ["parts", "--data", "synthetic", "--teacher", "random", "--out",
                                              str(tmp / "p.pt"), "--dec-channels", "0"], "--dec-channels"),
        ("negative synthetic size", "latent_mim", ["--data", "synthetic", *lm, "--synthetic-size", "-5"],
         "--synthetic-size must be at least 1"),
        ("keep every -1", "pcae", ["--data", "synthetic", *pc, "--keep-every", "-1"], "--keep-every"),
        ("every image unreadable", "pcae", ["--data", str(tmp / "broken"), *pc, "--batch-size", "2",
                                            "--output-dir", str(tmp / "o3")],
         f"none of the 3 images of the class of {broken}{os.sep}"),
        ("probe lr nan", "eval_probe", [*probe, "--lr", "nan"], "--lr must be a finite positive number"),
        ("probe temperature nan", "eval_probe", [*probe, "--temperature", "nan"], "--temperature positive"),
        ("probe heads 0", "eval_probe", [*probe, "--num-heads", "0"], "--num-heads must be at least 1"),
    ]
    if not torch.cuda.is_available():
        cases += [("cuda without a GPU", "pcae", ["--data", "synthetic", *pc, "--device", "cuda"], "no CUDA GPU"),
                  ("cuda without a GPU", "eval_probe", [*probe, "--device", "cuda"], "no CUDA GPU")]
    return cases


def test_bad_input_gets_a_one_line_error(tmp_path, parts_file, monkeypatch, capsys):
    os.rename(parts_file, tmp_path / "wrong_parts.pt")  # made for 48 synthetic images, not the 6-image folder
    monkeypatch.chdir(tmp_path)  # default output directories land here
    for case, module, args, words in bad_input_cases(tmp_path):
        code, err = cli_error(monkeypatch, capsys, module, args)
        assert code == 2, case
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (case, err)


@pytest.mark.slow
def test_bad_flag_from_the_command_line_has_no_traceback(tmp_path, root):
    done = subprocess.run([sys.executable, str(root / "latent_mim.py"), "--data", str(tmp_path / "missing")],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == f"error: data directory not found: {tmp_path / 'missing'}"


# ------------------------------------------------------------------------------------------- unreadable images
@pytest.mark.parametrize("name", ["latent_mim", "pcae", "semmae"])
def test_corrupt_images_are_skipped_reported_once_and_counted(name, tmp_path, capsys):
    root = make_folder(tmp_path / "data", per_class=6)  # 12 good images
    cat = root / "train" / "a"
    (cat / "zero.jpg").write_bytes(b"")
    (cat / "text.jpg").write_text("this is not a JPEG")
    (cat / "truncated.jpg").write_bytes((cat / "0.jpg").read_bytes()[:200])
    flags = argv(name, tmp_path / "out", "", "--batch-size", "5", data=str(root))
    if name == "semmae":  # plain MAE: no parts file for this folder
        flags = flags[:flags.index("--parts")] + flags[flags.index("--parts") + 2:] + ["--masking", "random"]
    module = importlib.import_module(SCRIPTS[name][0])
    module.main(module.build_parser().parse_args(flags))  # 15 images, batch 5: every image read in both epochs
    err = capsys.readouterr().err
    for bad in ("zero.jpg", "text.jpg", "truncated.jpg"):
        assert err.count(f"skipped unreadable image {cat / bad}") == 1, bad  # reported once, not once per epoch
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [row["bad_images"] for row in log] == [3, 3]  # counted in every epoch's log line
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in log)
