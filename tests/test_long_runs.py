"""Week-long jobs: a resume in another layout of the same effective batch is exact, a changed training flag or dataset
is refused, --resume only seeds a new run, SIGTERM / SIGUSR1 save the current step and exit 75 on every process, one
run per output folder (a lock), a full disk gives one line and no partial file, every process agrees on the resume and
on a non-finite loss under torchrun (no hang, no traceback)."""
import errno
import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import common
import cli as cli_module
import output_lock
import train_utils
from conftest import (ROOT, SCRIPTS, argv, assert_equivalent_runs, assert_same_state, run_inprocess, script_cmd,
                      subprocess_env)

MODELS = {"latent_mim": ("latent_mim", "LatentMIM"), "pcae": ("pcae", "PCAE"), "semmae": ("semmae", "SemMAE"),
          "semmae-parts": ("semmae", "PartLearner")}


def cli(monkeypatch, capsys, name, out, parts, *extra, data="synthetic"):
    """The tiny run's command line, in-process through run_main -> (exit code, stderr lines, stdout)."""
    module = importlib.import_module(SCRIPTS[name][0])
    monkeypatch.setattr(sys, "argv", ["prog", *argv(name, out, parts, *extra, data=data)])
    capsys.readouterr()
    try:
        cli_module.run_main(module.main, module.build_parser())
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def run_on(data, out, *extra):
    """The tiny pcae run on an image folder; returns its checkpoint."""
    import pcae
    pcae.main(pcae.build_parser().parse_args(argv("pcae", out, "", *extra, data=str(data))))
    return train_utils.load_checkpoint(out / "checkpoint.pth")


def image_folder(root, per_class=6):
    from PIL import Image
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 40), (40 * i, 90 if c == "a" else 200, 30)).save(root / "train" / c / f"{i}.jpg")
    return root


# ------------------------------------------------------------------------------ position, layout, flags, dataset
def test_resume_in_another_layout_of_the_same_effective_batch_is_exact(tmp_path, monkeypatch, capsys):
    reference = run_inprocess("pcae", tmp_path / "straight", "", "--batch-size", "8")
    out = tmp_path / "run"
    stopped = run_inprocess("pcae", out, "", "--batch-size", "8", "--max-steps", "8")  # 1 x 8 x accum 1
    assert (stopped["epoch"], stopped["step"], stopped["samples"], stopped["effective_batch"]) == (1, 8, 16, 8)
    code, err, _ = cli(monkeypatch, capsys, "pcae", out, "", "--batch-size", "4")  # effective batch 4: refused
    assert code == 2 and err == [f"error: {out / 'checkpoint.pth'} was trained with other settings: effective batch "
                                 f"8 -> 4 (processes x --batch-size x --accum); continue it with its own settings, or "
                                 f"start a new run in another --output-dir"]
    resumed = run_inprocess("pcae", out, "", "--batch-size", "4", "--accum", "2")  # 1 x 4 x accum 2: the same 8
    assert_equivalent_runs(reference, resumed)  # ends at step 12, not later, on the same data


@pytest.mark.parametrize("name, change, named", [
    ("pcae", ["--mask-ratio", "0.9", "--seed", "1"], ["--mask-ratio 0.75 -> 0.9", "--seed 0 -> 1"]),
    ("latent_mim", ["--loss", "mse"], ["--loss patchdisc -> mse"])])
def test_resume_refuses_flags_that_change_training_and_names_them(name, change, named, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run_inprocess(name, out, "", "--max-steps", "2")
    code, err, _ = cli(monkeypatch, capsys, name, out, "", *change)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {out / 'checkpoint.pth'} was trained with other "
                                                             f"settings: ")
    assert all(flag in err[0] for flag in named), err
    assert train_utils.load_checkpoint(out / "checkpoint.pth")["step"] == 2  # untouched
    free = ["--max-steps", "4", "--save-every", "3", "--log-every", "5", "--keep-every", "1", "--device", "cpu",
            "--num-workers", "0", "--resume", str(out / "checkpoint.pth")]
    assert run_inprocess(name, out, "", *free)["step"] == 4  # flags that do not change what is trained may change


def test_a_moved_dataset_resumes_and_another_one_is_refused(tmp_path, monkeypatch, capsys):
    data = image_folder(tmp_path / "data")  # 12 images, batch 4: 3 steps per epoch
    reference = run_on(data, tmp_path / "straight")
    run_on(data, tmp_path / "run", "--max-steps", "2")
    moved = shutil.move(data, tmp_path / "elsewhere")  # e.g. staged to another node's local disk
    assert_same_state(reference, run_on(moved, tmp_path / "run"))

    run_on(moved, tmp_path / "other", "--max-steps", "2")
    os.rename(Path(moved) / "train" / "b" / "5.jpg", Path(moved) / "train" / "b" / "6.jpg")
    code, err, _ = cli(monkeypatch, capsys, "pcae", tmp_path / "other", "", data=str(moved))
    assert code == 2 and len(err) == 1 and "training images 12 -> 12 (other names)" in err[0]


def test_a_requeued_resume_command_continues_its_own_checkpoint(tmp_path, monkeypatch, capsys):
    reference = run_inprocess("pcae", tmp_path / "straight", "")
    assert run_inprocess("pcae", tmp_path / "a", "", "--max-steps", "3")["step"] == 3
    seed = ["--resume", str(tmp_path / "a" / "checkpoint.pth")]
    out = tmp_path / "b"
    assert run_inprocess("pcae", out, "", *seed, "--max-steps", "7")["step"] == 7  # seeded by a; stopped at step 7
    code, _, printed = cli(monkeypatch, capsys, "pcae", out, "", *seed)  # the same command again (a requeue)
    assert code == 0
    assert (f"{out / 'checkpoint.pth'} exists: continuing this run from it (--resume {seed[1]} only seeds a new run)"
            in printed)
    assert f"resumed from {out / 'checkpoint.pth'}: epoch 0, step 7" in printed
    assert_same_state(reference, train_utils.load_checkpoint(out / "checkpoint.pth"))
    assert train_utils.load_checkpoint(tmp_path / "a" / "checkpoint.pth")["step"] == 3  # the seed is untouched


# ----------------------------------------------------------------------------------------------- SIGTERM / SIGUSR1
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_sigterm_finishes_the_step_saves_it_and_exits_75(name, tmp_path, parts_file, monkeypatch, capsys):
    reference = run_inprocess(name, tmp_path / "straight", parts_file)
    module, cls_name = MODELS[name]
    cls = getattr(importlib.import_module(module), cls_name)
    original, calls = cls.forward, []

    def forward(self, *args, **kwargs):  # the cluster's notice arrives during step 4 (of 12 in epoch 0)
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    def not_caught(*_):
        raise AssertionError("run_main did not catch SIGTERM")
    monkeypatch.setattr(cls, "forward", forward)
    previous = signal.signal(signal.SIGTERM, not_caught)  # the test's own: run_main replaces it, then restores it
    try:
        code, err, _ = cli(monkeypatch, capsys, name, tmp_path / "stopped", parts_file)
    finally:
        assert signal.signal(signal.SIGTERM, previous) is not_caught
    ckpt_path = tmp_path / "stopped" / "checkpoint.pth"
    assert code == cli_module.EXIT_REQUEUE == 75
    assert err[-1] == f"stopped: SIGTERM after step 4; {ckpt_path} holds it: run the same command to continue"
    assert len(calls) == 5  # no step after the one that was running
    stopped = train_utils.load_checkpoint(ckpt_path)
    assert (stopped["step"], stopped["samples"]) == (5, 20)  # step 4 finished and saved: no step lost
    assert not (tmp_path / "stopped" / ".lock").exists()
    monkeypatch.setattr(cls, "forward", original)
    resumed = run_inprocess(name, tmp_path / "stopped", parts_file)  # the requeue
    assert_same_state(reference, resumed)


def test_sigusr1_is_a_stop_request_too(tmp_path, monkeypatch, capsys):
    import pcae
    original = pcae.PCAE.forward

    def forward(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(pcae.PCAE, "forward", forward)
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # if run_main did not catch it: ignored, test fails
    try:
        code, err, _ = cli(monkeypatch, capsys, "pcae", tmp_path, "")
    finally:
        assert signal.signal(signal.SIGUSR1, previous) == signal.SIG_IGN
    assert code == 75 and err[-1].startswith("stopped: SIGUSR1 after step 0; ")
    assert train_utils.load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 1
    assert cli_module.stop_signal() is None  # reset for the next run of this process


# ------------------------------------------------------------------------------------------------ Ctrl-C (SIGINT)
def interrupt_at_forward(monkeypatch, cls, at, times=1):
    """cls.forward sends this process `times` SIGINTs at its call number `at` (during step at - 1)."""
    original, calls = cls.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(cls, "forward", forward)
    return calls


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_ctrl_c_finishes_the_step_saves_it_and_exits_75(name, tmp_path, parts_file, monkeypatch, capsys):
    """A first Ctrl-C during training is a stop request as SIGTERM is: step 4 finishes and is saved, one line, exit
    75, and the same command ends with the weights of a run that was never interrupted."""
    reference = run_inprocess(name, tmp_path / "straight", parts_file)
    module, cls_name = MODELS[name]
    cls = getattr(importlib.import_module(module), cls_name)
    original = cls.forward
    calls = interrupt_at_forward(monkeypatch, cls, at=5)  # during step 4 (of 12 in epoch 0)

    def not_caught(*_):
        raise AssertionError("run_main did not catch SIGINT")
    previous = signal.signal(signal.SIGINT, not_caught)
    try:
        code, err, _ = cli(monkeypatch, capsys, name, tmp_path / "stopped", parts_file)
    finally:
        assert signal.signal(signal.SIGINT, previous) is not_caught  # restored after the run
    ckpt_path = tmp_path / "stopped" / "checkpoint.pth"
    assert code == cli_module.EXIT_REQUEUE
    assert err[-1] == f"stopped: SIGINT after step 4; {ckpt_path} holds it: run the same command to continue"
    assert all(line.startswith("warning: ") for line in err[:-1])  # (stage A's random teacher) and no traceback
    assert len(calls) == 5 and train_utils.load_checkpoint(ckpt_path)["step"] == 5
    assert not (tmp_path / "stopped" / ".lock").exists()
    monkeypatch.setattr(cls, "forward", original)
    assert_same_state(reference, run_inprocess(name, tmp_path / "stopped", parts_file))


@pytest.mark.parametrize("save_every, lost", [("0", None), ("3", "step 3 is lost, ")])
def test_a_second_ctrl_c_stops_at_once_and_says_what_is_lost(save_every, lost, tmp_path, monkeypatch, capsys):
    import pcae
    calls = interrupt_at_forward(monkeypatch, pcae.PCAE, at=5, times=2)  # both during step 4
    out = tmp_path / "new" / "run"
    code, err, _ = cli(monkeypatch, capsys, "pcae", out, "", "--save-every", save_every)
    assert code == cli_module.EXIT_INTERRUPTED == 130 and len(calls) == 5  # step 4 was not finished
    ckpt = out / "checkpoint.pth"
    if lost is None:  # nothing saved: the folders the run made are gone again
        assert err == [f"interrupted: stopped at once by a second Ctrl-C during step 4; nothing was saved yet ({ckpt} "
                       f"is written at the end of every epoch and every --save-every steps): the same command starts "
                       f"the run again"]
        assert not (tmp_path / "new").exists()
    else:  # saved after step 2 (3 steps done); step 3 was finished since
        assert err == [f"interrupted: stopped at once by a second Ctrl-C during step 4; {lost}{ckpt} holds the run up "
                       f"to step 2: run the same command to continue there"]
        assert train_utils.load_checkpoint(ckpt)["step"] == 3 and sorted(os.listdir(out)) == ["checkpoint.pth"]
    assert cli_module.stop_signal() is None


def test_ctrl_c_outside_a_training_loop_is_one_line(tmp_path, monkeypatch, capsys):
    """An evaluation has nothing to save: Ctrl-C ends it at once with one line and exit 130."""
    import eval_probe
    import eval_utils
    ckpt = run_inprocess("pcae", tmp_path / "run", "", "--max-steps", "2")
    extract = eval_utils.extract

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return extract(*args, **kwargs)
    monkeypatch.setattr(eval_utils, "extract", interrupted)
    monkeypatch.setattr(sys, "argv", ["eval_probe.py", "--ckpt", str(tmp_path / "run" / "checkpoint.pth"), "--data",
                                      "synthetic", "--synthetic-size", "48", "--mode", "knn", "--num-workers", "0"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_module.run_main(eval_probe.main, eval_probe.build_parser())
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 130 and ckpt["step"] == 2
    assert err == ["interrupted: Ctrl-C; stopped at once (no training step was running: nothing to save)"]


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_with_loader_workers(tmp_path):
    """The real thing: SIGINT to the whole process group (what a terminal's Ctrl-C does), with a loader worker
    process that gets it too: the step is saved, one line, no traceback from any process; the same command then
    ends with the weights of a run that was never interrupted."""
    reference = run_inprocess("pcae", tmp_path / "straight", "", "--num-workers", "1")
    out, log = tmp_path / "run", tmp_path / "log.txt"
    cmd = [sys.executable, *script_cmd("pcae"), *argv("pcae", out, "", "--num-workers", "1")]
    with open(log, "w") as f:
        run = subprocess.Popen(cmd, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "step 3/24" not in log.read_text() and run.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(run.pid, signal.SIGINT)
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    lines = log.read_text().strip().splitlines()
    assert run.returncode == 75 and "Traceback" not in log.read_text()
    assert "Ctrl-C: stopping after this step, which is saved (Ctrl-C again stops at once, without saving)" in lines
    step = int(lines[-1].split()[4].rstrip(";"))
    assert lines[-1] == (f"stopped: SIGINT after step {step}; {out / 'checkpoint.pth'} holds it: run the same command "
                         f"to continue")
    assert train_utils.load_checkpoint(out / "checkpoint.pth")["step"] == step + 1
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_state(reference, train_utils.load_checkpoint(out / "checkpoint.pth"))


# ---------------------------------------------------------------------------------------- a finished run, again
def test_rerunning_a_finished_run_says_it_is_complete_and_how_to_evaluate_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run_inprocess("pcae", out, "")
    before = (out / "checkpoint.pth").stat().st_mtime_ns, (out / "log.jsonl").read_text()
    code, err, printed = cli(monkeypatch, capsys, "pcae", out, "")
    ckpt = out / "checkpoint.pth"
    assert code == 0 and err == []
    assert printed.splitlines()[-2:] == [
        f"resumed from {ckpt}: epoch 2, step 24",
        f"this run is complete: {ckpt} holds its 2 epochs (24 steps; log: {out / 'log.jsonl'}); evaluate it: python "
        f"eval_probe.py --ckpt {ckpt} --data synthetic --mode knn"]
    assert ((out / "checkpoint.pth").stat().st_mtime_ns, (out / "log.jsonl").read_text()) == before  # untouched
    import eval_probe  # the advice works
    command = printed.splitlines()[-1].split("evaluate it: python eval_probe.py ")[1].split()
    assert eval_probe.main(eval_probe.build_parser().parse_args([*command, "--synthetic-size", "48",
                                                                 "--num-workers", "0"]))["top1"] >= 0
    code, _, printed = cli(monkeypatch, capsys, "pcae", tmp_path / "short", "", "--max-steps", "3")
    code, _, printed = cli(monkeypatch, capsys, "pcae", tmp_path / "short", "", "--max-steps", "3")
    assert code == 0 and printed.splitlines()[-1] == (
        f"nothing to train: {tmp_path / 'short' / 'checkpoint.pth'} is at step 3, the --max-steps 3 of this command; "
        f"raise --max-steps, or leave it out, to go on")


def test_rerunning_a_finished_fine_tuning_says_where_its_results_are(tmp_path, monkeypatch, capsys):
    import finetune
    torch.manual_seed(0)
    encoder = tmp_path / "encoder.pth"
    train_utils.save_checkpoint(encoder, train_utils.encoder_export(common.build_vit("micro", img_size=32), "test"))
    out = tmp_path / "ft"
    flags = ["finetune.py", "--ckpt", str(encoder), "--data", "synthetic", "--synthetic-size", "48", "--epochs", "1",
             "--warmup-epochs", "0", "--batch-size", "8", "--num-workers", "0", "--output-dir", str(out)]
    monkeypatch.setattr(sys, "argv", flags)
    cli_module.run_main(finetune.main, finetune.build_parser())
    capsys.readouterr()
    cli_module.run_main(finetune.main, finetune.build_parser())
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"this run is complete: {out / 'checkpoint.pth'} holds its 1 epoch (6 steps; log: {out / 'log.jsonl'}); "
        f"evaluate it: python eval_probe.py --ckpt {out / 'checkpoint.pth'} --data synthetic --mode knn")
    assert (out / "checkpoint-best.pth").is_file() and json.loads((out / "log.jsonl").read_text())["top1"] >= 0


# ----------------------------------------------------------------------------------- refused runs leave no folder
def test_a_refused_run_leaves_no_folder_behind(tmp_path, monkeypatch, capsys):
    """The output folder (and the parents it needed) are made before the resume check and the first step; a run
    refused or failed before it wrote anything removes them again; a folder that was there stays."""
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("not a checkpoint")
    code, err, _ = cli(monkeypatch, capsys, "pcae", tmp_path / "a" / "b" / "run", "", "--resume", str(not_a_checkpoint))
    assert code == 2 and err == [f"error: {not_a_checkpoint} is not a readable PyTorch checkpoint (UnpicklingError)"]
    assert sorted(os.listdir(tmp_path)) == ["notes.pth"]
    (tmp_path / "mine").mkdir()
    code, _, _ = cli(monkeypatch, capsys, "pcae", tmp_path / "mine", "", "--resume", str(not_a_checkpoint))
    assert code == 2 and (tmp_path / "mine").is_dir() and not os.listdir(tmp_path / "mine")
    monkeypatch.setattr(common.SyntheticShapes, "load", lambda self, i: (_ for _ in ()).throw(OSError("unreadable")))
    code, err, _ = cli(monkeypatch, capsys, "pcae", tmp_path / "c", "")  # every image unreadable: the first step fails
    assert code == 2 and err[-1].startswith("error: ") and not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------------- the folder lock
def write_lock(folder, age=0.0, **owner):
    path = folder / output_lock.LOCK_FILE
    path.write_text(json.dumps(owner))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_the_output_lock_takes_over_only_the_locks_of_ended_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(output_lock, "LOCK_HEARTBEAT_S", 0.05)
    lock = output_lock.OutputLock(tmp_path)
    lock.start()
    me = json.loads((tmp_path / ".lock").read_text())
    assert (me["host"], me["pid"]) == (socket.gethostname(), os.getpid())
    os.utime(tmp_path / ".lock", (0, 0))
    time.sleep(0.3)
    assert time.time() - (tmp_path / ".lock").stat().st_mtime < 5  # the heartbeat
    lock.release()
    assert not (tmp_path / ".lock").exists()

    parent = os.getppid()  # alive, and not us
    live = {**me, "pid": parent, "start": output_lock.process_start(parent)[1]}
    write_lock(tmp_path, **live)
    with pytest.raises(ValueError, match=f"is in use by another run: host {me['host']}, pid {parent}, started "):
        output_lock.OutputLock(tmp_path)
    ended = subprocess.Popen(["true"])
    ended.wait()
    for owner in ({**live, "pid": ended.pid}, {**live, "start": "0"}, {**live, "boot": "another boot"},
                  {**me, "host": "other-node"}):  # pid gone, pid reused, host rebooted, another host's stale lock
        write_lock(tmp_path, age=output_lock.LOCK_STALE_S + 1, **owner)
        output_lock.OutputLock(tmp_path).release()
        assert "warning: taking over the lock of host " in capsys.readouterr().err

    monkeypatch.setattr(output_lock, "LOCK_STALE_S", 0.5)
    path = write_lock(tmp_path, **{**me, "host": "other-node"})  # fresh: its owner may be alive on the other node
    t0 = time.time()
    output_lock.OutputLock(tmp_path).release()  # waited for the heartbeat to stop, then took it over
    assert 0.4 < time.time() - t0 < 5 and "waiting up to 0.5 s for its heartbeat to stop" in capsys.readouterr().out
    write_lock(tmp_path, **{**me, "host": "other-node"})
    stop = threading.Event()
    threading.Thread(target=output_lock.lock_heartbeat, args=(path, stop), daemon=True).start()  # alive over there
    try:
        with pytest.raises(ValueError, match="is in use by another run: host other-node"):
            output_lock.OutputLock(tmp_path)
    finally:
        stop.set()


@pytest.mark.slow
def test_a_second_run_in_the_same_folder_is_refused_while_the_first_goes_on(tmp_path, monkeypatch, capsys):
    out, log = tmp_path / "run", tmp_path / "first.err"
    flags = ["--epochs", "1000", "--save-every", "5"]
    with open(log, "w") as stderr:
        first = subprocess.Popen([sys.executable, *script_cmd("pcae"), *argv("pcae", out, "", *flags)],
                                 env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pth").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        leftover = out / ".checkpoint.pth.tmp-being-written"
        leftover.write_bytes(b"half a checkpoint")
        code, err, _ = cli(monkeypatch, capsys, "pcae", out, "", *flags)
        assert code == 2 and len(err) == 1
        assert err[0].startswith(f"error: {out} is in use by another run: host {socket.gethostname()}, pid "
                                 f"{first.pid}, started ")
        assert leftover.exists()  # the refused run removed nothing
        assert first.poll() is None  # and the first one goes on
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    last = log.read_text().strip().splitlines()[-1]
    assert first.returncode == 75 and last.startswith("stopped: SIGTERM after step "), last
    assert train_utils.load_checkpoint(out / "checkpoint.pth")["step"] == int(last.split()[4].rstrip(";")) + 1
    assert not (out / ".lock").exists()


# ------------------------------------------------------------------------------------------------------ full disk
def test_a_full_disk_gives_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    train_utils.save_checkpoint(path, {"step": 1})
    real_save = torch.save

    def disk_full(state, f, *args, **kwargs):
        f.write(b"x" * 2 ** 20)
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(ValueError) as error:
        train_utils.save_checkpoint(path, {"step": 2, "w": torch.zeros(2 ** 20)})
    assert re.fullmatch(rf"no space left to write {re.escape(str(path))}: it needs about 4\.0 MiB, [\d.]+ [MG]iB are "
                        r"free \(the write failed after 1\.0 MiB\); free some space or use another --output-dir",
                        str(error.value))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"] and torch.load(path)["step"] == 1

    def unexpected_pos(state, f, *args, **kwargs):  # what torch.save raises on a really full disk
        f.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", unexpected_pos)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=2 ** 30, used=2 ** 30 - 500, free=500))
    with pytest.raises(ValueError, match=r"needs about 4\.0 MiB, 0\.0 MiB are free"):
        train_utils.save_checkpoint(path, {"w": torch.zeros(2 ** 20)})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
    monkeypatch.setattr(torch, "save", real_save)


def test_a_full_disk_stops_training_with_one_line_and_the_restart_cleans_up_first(tmp_path, monkeypatch, capsys):
    out, real_save, saves = tmp_path / "run", torch.save, []

    def third_save_fills_the_disk(state, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 3:
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", third_save_fills_the_disk)
    code, err, _ = cli(monkeypatch, capsys, "pcae", out, "", "--save-every", "1")
    assert code == 2 and err[-1].startswith(f"error: no space left to write {out / 'checkpoint.pth'}: it needs about ")
    assert not list(out.glob(".checkpoint*.tmp*")) and train_utils.load_checkpoint(out / "checkpoint.pth")["step"] == 2
    monkeypatch.setattr(torch, "save", real_save)

    leftover = out / ".checkpoint.pth.tmp4242"  # a save killed half-way filled the disk
    leftover.write_bytes(b"x" * 1000)
    write_text = Path.write_text

    def no_space_while_the_leftover_is_there(self, *args, **kwargs):
        if list(self.parent.glob(".checkpoint*.tmp*")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", no_space_while_the_leftover_is_there)
    assert run_inprocess("pcae", out, "", "--save-every", "1")["step"] == 24  # the restart: clean-up, then checks
    assert not leftover.exists()


# ------------------------------------------------------------------------------------------ several processes
WORKER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import cli as cli_module, common, pcae, train_utils
rank, inject, at = int(os.environ["RANK"]), os.environ.get("INJECT", ""), int(os.environ.get("INJECT_AT", 0))
os.chdir(os.environ.get("RANK_CWD", ".").format(rank=rank))  # per-node output folders
forward, calls = pcae.PCAE.forward, []

def injected(self, *args, **kwargs):  # process 1 only: a SIGTERM, or a NaN loss, at its forward number `at`
    loss, metrics = forward(self, *args, **kwargs)
    calls.append(1)
    if rank == 1 and len(calls) == at and inject == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    if rank == 1 and len(calls) == at and inject == "nan":
        loss = loss * float("nan")
    return loss, metrics

load = common.SyntheticShapes.load

def unreadable(self, i):  # process 1 only: images 0..19 cannot be read (a whole stretch of the data)
    if i < 20:
        raise OSError(f"unreadable image synthetic:0:{{i}}: injected")
    return load(self, i)

pcae.PCAE.forward = injected
if rank == 1 and inject == "unreadable":
    common.SyntheticShapes.load = unreadable
cli_module.run_main(pcae.main, pcae.build_parser())
"""


def torchrun(tmp_path, flags, **env):
    """pcae.py on 2 processes (batch 4 each) through the worker above -> (torchrun's exit code, the workers' exit
    codes from its summary, {rank: that worker's stderr})."""
    worker, logs = tmp_path / "worker.py", tmp_path / "logs"
    worker.write_text(WORKER.format(root=str(ROOT)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--log-dir",
           str(logs), "--redirects", "3", str(worker), *flags, "--batch-size", "4"]
    done = subprocess.run(cmd, env={**subprocess_env(), **env}, capture_output=True, text=True, timeout=180)
    codes = {int(r): int(c) for r, c in re.findall(r"rank\s*: (\d+) .*\n\s*exitcode\s*: (-?\d+)", done.stderr)}
    return done.returncode, codes, {int(p.parent.name): p.read_text() for p in logs.glob("**/stderr.log")}


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_after_the_same_step_and_resumes_in_another_layout(tmp_path):
    reference = run_inprocess("pcae", tmp_path / "straight", "", "--batch-size", "8")
    out = tmp_path / "ddp"
    code, codes, workers = torchrun(tmp_path, argv("pcae", out, ""), INJECT="sigterm", INJECT_AT="4")
    assert code == 1 and codes == {0: 75, 1: 75}  # torchrun's own code is 1 for any failed worker; each worker's is 75
    ckpt_path = out / "checkpoint.pth"
    assert workers[1].strip().splitlines()[-1] == (f"stopped: SIGTERM after step 4; {ckpt_path} holds it: run the same "
                                                   f"command to continue")
    assert workers[0].strip().splitlines()[-1] == (f"stopped: a stop signal to another process after step 4; "
                                                   f"{ckpt_path} holds it: run the same command to continue")
    assert not any("Traceback" in err for err in workers.values())
    stopped = train_utils.load_checkpoint(ckpt_path)
    assert (stopped["step"], stopped["samples"]) == (5, 40)  # 2 x 4 x accum 1
    resumed = run_inprocess("pcae", out, "", "--batch-size", "4", "--accum", "2")  # 1 process x 4 x accum 2
    assert_equivalent_runs(reference, resumed)


@pytest.mark.slow
def test_ctrl_c_to_torchrun_stops_every_process_after_the_same_saved_step(tmp_path):
    """A terminal's Ctrl-C reaches torchrun only (its workers have sessions of their own); torchrun passes SIGINT on
    to every worker: each finishes the same step, the checkpoint holds it, each exits 75 with one line, no traceback;
    torchrun itself exits 1 (its SignalException). The run then resumes in another layout."""
    reference = run_inprocess("pcae", tmp_path / "straight", "", "--batch-size", "8")
    worker, logs, out = tmp_path / "worker.py", tmp_path / "logs", tmp_path / "ddp"
    worker.write_text(WORKER.format(root=str(ROOT)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--log-dir",
           str(logs), "--redirects", "3", str(worker), *argv("pcae", out, ""), "--batch-size", "4"]
    launcher = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while launcher.poll() is None and time.time() < deadline:
            if any("step 2/12" in p.read_text() for p in logs.glob("**/0/stdout.log")):  # 12 steps of 2 x 4
                break
            time.sleep(0.02)
        launcher.send_signal(signal.SIGINT)
        _, torchrun_err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1 and "SignalException" in torchrun_err
    workers = {int(p.parent.name): p.read_text() for p in logs.glob("**/stderr.log")}
    assert sorted(workers) == [0, 1] and not any("Traceback" in err for err in workers.values())
    last = {rank: err.strip().splitlines()[-1] for rank, err in workers.items()}
    step = int(last[0].split()[4].rstrip(";"))
    for rank in (0, 1):  # each process got torchrun's SIGINT itself
        assert last[rank] == (f"stopped: SIGINT after step {step}; {out / 'checkpoint.pth'} holds it: run the same "
                              f"command to continue")
    assert train_utils.load_checkpoint(out / "checkpoint.pth")["step"] == step + 1
    assert_equivalent_runs(reference, run_inprocess("pcae", out, "", "--batch-size", "4", "--accum", "2"))


@pytest.mark.slow
def test_a_non_finite_loss_on_one_process_stops_every_process_with_exit_3(tmp_path):
    code, codes, workers = torchrun(tmp_path, argv("pcae", tmp_path / "nan", ""), INJECT="nan", INJECT_AT="3")
    assert code == 1 and codes == {0: 3, 1: 3}
    for err in workers.values():
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1] == ("error: non-finite loss at step 2; training stopped, the checkpoint on "
                                                "disk is the last good one")


@pytest.mark.slow
def test_per_node_output_folders_are_refused_on_every_process_instead_of_hanging(tmp_path):
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    run_inprocess("pcae", tmp_path / "node0" / "out", "", "--batch-size", "8", "--max-steps", "3")  # node 0's only
    code, codes, workers = torchrun(tmp_path, argv("pcae", Path("out"), ""), RANK_CWD=str(tmp_path / "node{rank}"))
    assert code == 1 and codes == {0: 2, 1: 2}
    for err in workers.values():
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1] == ("error: process 1: cannot read out/checkpoint.pth, from which process "
                                                "0 resumes: every process must see process 0's output folder (a "
                                                "shared file system)")


def test_a_stale_lock_that_cannot_be_removed_is_one_line_not_a_loop(tmp_path, monkeypatch, capsys):
    me = {"host": socket.gethostname(), "pid": 999_999_999, "boot": "", "start": "0", "started": "2026-12-01"}
    lock = write_lock(tmp_path, **me)  # a run of this host that has ended: stale
    real_unlink = Path.unlink

    def read_only(path, *a, **kw):  # the folder turned read-only (as root, chmod would not stop the unlink)
        if path == lock:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_unlink(path, *a, **kw)
    monkeypatch.setattr(Path, "unlink", read_only)
    t0 = time.time()
    with pytest.raises(ValueError) as info:
        output_lock.OutputLock(tmp_path)
    assert time.time() - t0 < 5 and str(info.value) == (
        f"cannot remove the stale lock {lock} of host {me['host']}, pid 999999999, started 2026-12-01 (Read-only file "
        f"system): make {tmp_path} writable, or use another --output-dir")
    assert capsys.readouterr().err.count("taking over") == 1


@pytest.mark.parametrize("text", ["", "{\"host\": \"some-n"])
def test_an_empty_or_unreadable_lock_is_stale_once_its_owner_had_time_to_write_it(text, tmp_path, monkeypatch,
                                                                                   capsys):
    monkeypatch.setattr(output_lock, "LOCK_UNWRITTEN_S", 0.5)
    path = tmp_path / output_lock.LOCK_FILE
    path.write_text(text)  # a run killed between creating the lock and writing its owner into it
    t0 = time.time()
    lock = output_lock.OutputLock(tmp_path)  # waits up to LOCK_UNWRITTEN_S (not LOCK_STALE_S = 300 s), then takes it
    assert 0.4 < time.time() - t0 < 5
    assert json.loads(path.read_text())["pid"] == os.getpid()  # written at creation
    lock.release()
    path.write_text(text)
    os.utime(path, (time.time() - 1, time.time() - 1))  # already older than LOCK_UNWRITTEN_S: taken at once
    t0 = time.time()
    output_lock.OutputLock(tmp_path).release()
    assert time.time() - t0 < 0.3 and "warning: taking over the lock of an " in capsys.readouterr().err


def test_a_stop_signal_while_waiting_for_another_hosts_lock_exits_75(tmp_path, monkeypatch):
    write_lock(tmp_path, host="other-node", pid=1, started="2026-12-01")  # fresh: we would wait 300 s
    monkeypatch.setattr(cli_module, "_stop_signal", [signal.SIGTERM])
    with pytest.raises(cli_module.Requeue, match="SIGTERM while waiting for the lock of host other-node, pid 1"):
        output_lock.OutputLock(tmp_path)


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_copies_to_go_on_from(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run_inprocess("pcae", out, "", "--keep-every", "1", "--max-steps", "14")  # a copy at the end of epoch 0
    ckpt = train_utils.load_checkpoint(out / "checkpoint.pth")
    ckpt["model"]["student.blocks.1.mlp.fc1.weight"][3, 3] = float("nan")
    train_utils.save_checkpoint(out / "checkpoint.pth", ckpt)
    code, err, _ = cli(monkeypatch, capsys, "pcae", out, "")
    assert code == 3 and err == [f"error: {out / 'checkpoint.pth'} holds non-finite weights (1 tensors, e.g. "
                                 f"student.blocks.1.mlp.fc1.weight) and cannot be continued: start a new run in "
                                 f"another --output-dir with --resume one of the copies kept there "
                                 f"(checkpoint-0001.pth)"]
    resumed = run_inprocess("pcae", tmp_path / "new", "", "--resume", str(out / "checkpoint-0001.pth"))
    assert resumed["epoch"] == 2  # the advice works: the flag check accepts the copy


@pytest.mark.slow
def test_data_that_one_process_cannot_read_stops_every_process_with_one_line(tmp_path):
    code, codes, workers = torchrun(tmp_path, argv("pcae", tmp_path / "bad", ""), INJECT="unreadable")
    assert code == 1 and codes == {0: 2, 1: 2}
    for err in workers.values():
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: process 1: neither synthetic:0:") and "injected" in last, last


# ------------------------------------------------------------------------------------ the epoch line after a resume
def epoch_lines(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_a_stop_on_an_epochs_last_step_keeps_that_epochs_loss_and_lr(tmp_path, monkeypatch, capsys):
    """The checkpoint carries the epoch's running sums, so the line of an epoch that a stop split (here right after
    its last step) has the loss of all its steps and the lr of its last one, as an uninterrupted run's line."""
    run_inprocess("pcae", tmp_path / "straight", "")
    calls, forward = [], importlib.import_module("pcae").PCAE.forward

    def stop_at_the_epochs_last_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 12:  # step 11, the last of epoch 0's 12
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(importlib.import_module("pcae").PCAE, "forward", stop_at_the_epochs_last_step)
    code, _, _ = cli(monkeypatch, capsys, "pcae", tmp_path / "stopped", "")
    assert code == 75 and train_utils.load_checkpoint(tmp_path / "stopped" / "checkpoint.pth")["step"] == 12
    assert not (tmp_path / "stopped" / "log.jsonl").exists()  # epoch 0's line waits for the resume
    monkeypatch.setattr(importlib.import_module("pcae").PCAE, "forward", forward)
    run_inprocess("pcae", tmp_path / "stopped", "")
    for straight, resumed in zip(epoch_lines(tmp_path / "straight"), epoch_lines(tmp_path / "stopped"), strict=True):
        assert (resumed["epoch"], resumed["loss"], resumed["lr"]) == (straight["epoch"], straight["loss"],
                                                                       straight["lr"])
