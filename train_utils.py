"""The plumbing of a run's life, shared by every script: what an operator needs and a reader of the papers never does.
Processes and precision, checkpoints (atomic, weights-only), the output folder's lock, logging (the non-finite guard,
progress, log.jsonl), and TrainRun, the position and saves behind each method file's loop. Elsewhere: the start-up,
signals and exit codes of every script with its flags (cli.py), any checkpoint's encoder (eval_utils.load_vit), the
benchmark and FLOP counting (tools/bench.py).
"""
import contextlib, errno, hashlib, json, math, os, shutil, signal, socket, sys, threading, time
import weakref
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from cli import Requeue, UserError, _created_folders, _locks, _training, quiet_worker, stop_signal
from common import DataError, ResumableSampler, StepRandom, make_loader, warmup_cosine


# -------------------------------------------------------------------------------------- 1. processes and precision
def pick_device(name="auto"):
    """'auto': this process's GPU when there is one (LOCAL_RANK under torchrun), else the CPU; or 'cpu' / 'cuda'."""
    cuda = torch.cuda.is_available() if name in (None, "auto") else name == "cuda"
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")


class Dist:
    """Process layout from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); gloo on CPU, nccl on CUDA."""
    def __init__(self, device=None):
        import atexit
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.device = pick_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            atexit.register(self.close)

    @property
    def is_main(self):
        return self.rank == 0

    def print(self, *a, **kw):
        if self.is_main:
            print(*a, **kw, flush=True)

    def all_reduce_mean(self, t):
        if self.world > 1:
            torch_dist.all_reduce(t)
            t /= self.world
        return t

    def barrier(self):
        if self.world > 1:
            torch_dist.barrier()

    def close(self):
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def gather_rows(dist, x, n):
    """Rows rank::world of an n-row tensor on each process (a Subset(range(rank, n, world))) -> all n, in order."""
    if dist.world == 1:
        return x
    per = -(-n // dist.world)
    padded = x.new_zeros(per, *x.shape[1:])  # the same shape on every process
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(dist.world)]
    torch_dist.all_gather(parts, padded)
    return torch.stack(parts, 1).flatten(0, 1)[:n]  # row j of rank r is index j * world + r


def set_precision_flags():
    """TF32 for the fp32 matmuls and convolutions left outside bf16 autocast (CUDA only); set once at start-up."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def autocast(device):
    """bf16 autocast on CUDA (no GradScaler needed), full fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -------------------------------------------------------------------------------------------------- 2. checkpoints
def state_nbytes(obj):  # the bytes of the tensors of a (nested) state: about the size of its file
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    return sum(state_nbytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


def size_text(n):
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def save_checkpoint(path, state):
    """Atomic: write a temporary file, fsync, then rename over `path`, so a kill never leaves a broken checkpoint.
    A failed write removes the temporary file; a full disk or quota (OSError ENOSPC / EDQUOT, or torch's
    "unexpected pos" RuntimeError while less space is free than the state needs) is a one-line UserError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        need, free = state_nbytes(state), shutil.disk_usage(path.parent).free
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or isinstance(e, RuntimeError) and need > free:
            raise UserError(f"no space left to write {path}: it needs about {size_text(need)}, {size_text(free)} "
                            f"are free (the write failed after {size_text(written)}); free some space or use another "
                            f"--output-dir") from None
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path} ({e.strerror or e})") from None
        raise


def load_checkpoint(path):
    """torch.load with weights_only=True; a missing or non-checkpoint file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors differ between torch versions
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} does not contain a checkpoint dictionary")
    return ckpt


def load_training_checkpoint(path, method):
    """A checkpoint that a TrainRun wrote for `method`, else a UserError naming it."""
    ckpt = load_checkpoint(path)
    if ckpt.get("method") != method or "model" not in ckpt or "optimizer" not in ckpt:
        raise UserError(f"{path} is not a {method} training checkpoint (method: {ckpt.get('method')})")
    return ckpt


def check_finite_weights(state, path):
    """NaN or inf weights cannot be continued (a save refuses them: the file was written otherwise or damaged): exit
    3, naming where to go on from, the copies --keep-every kept in the same folder."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        copies = sorted(p.name for p in Path(path).parent.glob("checkpoint-*.pth"))
        older = (f"one of the copies kept there ({', '.join(copies)})" if copies else
                 "an earlier checkpoint (--keep-every N keeps a copy every N epochs)")
        raise FloatingPointError(f"{path} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}) and cannot be "
                                 f"continued: start a new run in another --output-dir with --resume {older}")


def encoder_export(vit, method):
    """The method-independent part of every checkpoint: enough for the evaluations to rebuild the encoder."""
    return {"encoder": vit.state_dict(), "encoder_args": dict(vit.config), "method": method}


def load_state(module, state, what, path):
    """load_state_dict(strict) with a one-line error for a checkpoint of another architecture."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3])[:300]
        raise UserError(f"{path}: {what} does not match this model ({detail})") from None


# ------------------------------------------------------------------------------------- 3. the output folder's lock
LOCK_FILE = ".lock"  # in the output folder while a run trains there
LOCK_HEARTBEAT_S = 30  # the owner refreshes the lock file's modification time this often
LOCK_STALE_S = 300  # another host's lock whose heartbeat is older than this is stale: its owner was killed
LOCK_UNWRITTEN_S = 10  # an empty or unreadable lock older than this is stale: its owner writes it at once


def check_output_dir(path, prepare=None):
    """Create the output directory and check that it is writable before hours of training; prepare(path) runs in
    between (TrainRun: the lock, then the clean-up of what a killed save left). The folders it creates are noted:
    run_main removes them again if the run ends with them empty (refused, or stopped before its first save)."""
    path = Path(path)
    try:
        _created_folders[:0] = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
        path.mkdir(parents=True, exist_ok=True)
        if prepare is not None:
            prepare(path)
        probe = path / f".write_test{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {path} is not writable ({e.strerror or e})") from None
    return path


def process_start(pid):
    """(alive, start) of process `pid` of this host; start: its start time in clock ticks since boot on Linux (tells a
    reused pid apart), None where unknown. A zombie (ended, not yet reaped) is not alive."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "pid (command)"
        return fields[0] != "Z", fields[19]
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:  # alive, another user's
        pass
    return True, None


def lock_heartbeat(path, stop):
    while not stop.wait(LOCK_HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


def release_lock(path, stop, mine):
    stop.set()
    with contextlib.suppress(OSError):
        if path.read_text() in ("", mine):  # still ours (empty: created, never written)
            path.unlink()


class OutputLock:
    """One run per output folder: output-dir/.lock names its owner (host, boot id, pid, start time), written when
    it is created; a thread refreshes its modification time (the heartbeat) every LOCK_HEARTBEAT_S. Taken over from
    this process, from an ended process of this host (pid gone or reused, or a reboot), when empty or unreadable
    LOCK_UNWRITTEN_S after its last change (a run killed while taking it), or from another host once its heartbeat
    is LOCK_STALE_S old (waited for; refused if the owner is alive by then). Refusals, a stale lock that cannot be
    removed and a stop signal while waiting are one line. Removed by `release` or when the process ends."""
    def __init__(self, folder):
        self.path = Path(folder) / LOCK_FILE
        boot = Path("/proc/sys/kernel/random/boot_id")
        self.me = {"host": socket.gethostname(), "boot": boot.read_text().strip() if boot.exists() else "",
                   "pid": os.getpid(), "start": process_start(os.getpid())[1],
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        waited, said = 0.0, False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # atomic, also on NFS
            except FileExistsError:
                text, who, state = self.holder()
            else:
                with open(fd, "w") as f, contextlib.suppress(OSError):  # a full disk: written by start(), after the
                    f.write(json.dumps(self.me))                         # clean-up has freed some space
                break
            if state in ("ours", "ended"):
                if state == "ended" and text is not None:
                    print(f"warning: taking over the lock of {who}: that run has ended", file=sys.stderr, flush=True)
                try:
                    if self.path.read_text() == text:  # not replaced by another run meanwhile
                        self.path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as e:  # without this error the loop would try again and again
                    raise UserError(f"cannot remove the stale lock {self.path} of {who} ({e.strerror or e}): make "
                                    f"{self.path.parent} writable, or use another --output-dir") from None
                continue
            if state == "live" or waited >= LOCK_STALE_S:
                raise UserError(f"{self.path.parent} is in use by another run: {who}; wait for it to end or use "
                                f"another --output-dir")
            if stop_signal() is not None:
                raise Requeue(f"{signal.Signals(stop_signal()).name} while waiting for the lock of {who}; nothing "
                              f"was trained: run the same command again")
            if not said and state == "remote":
                print(f"{self.path.parent} is locked by {who} on another host: waiting up to {LOCK_STALE_S} s for "
                      f"its heartbeat to stop", flush=True)
                said = True
            poll = min(5.0, LOCK_STALE_S / 10, LOCK_UNWRITTEN_S / 10)
            time.sleep(poll)
            waited += poll
        self.stop = threading.Event()
        self.release = weakref.finalize(self, release_lock, self.path, self.stop, json.dumps(self.me))
        _locks.add(self)

    def holder(self):
        """(text of the lock file, its owner in words, state): 'ours' (this process), 'ended' (stale), 'live' (a
        process of this host), 'remote' (another host's, with a fresh heartbeat), 'unwritten' (empty or unreadable,
        changed less than LOCK_UNWRITTEN_S ago: its owner is writing it)."""
        try:
            text, age = self.path.read_text(), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, "nobody", "ended"
        try:
            owner = json.loads(text)
        except ValueError:
            owner = None
        if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
            who = f"an {'empty' if not text else 'unreadable'} lock file (a run killed while taking it)"
            return text, who, "unwritten" if age < LOCK_UNWRITTEN_S else "ended"
        who = f"host {owner.get('host', '?')}, pid {owner['pid']}, started {owner.get('started', '?')}"
        if owner.get("host") != self.me["host"]:
            return text, who, "remote" if age < LOCK_STALE_S else "ended"
        if owner.get("boot") != self.me["boot"]:
            return text, who, "ended"  # the host rebooted since
        if owner["pid"] == self.me["pid"]:
            return text, who, "ours"
        alive, start = process_start(owner["pid"])
        return text, who, "live" if alive and start == owner.get("start") else "ended"

    def start(self):
        """Write the owner (again: on a full disk only the clean-up before this frees the space) and start beating."""
        self.path.write_text(json.dumps(self.me))
        threading.Thread(target=lock_heartbeat, args=(self.path, self.stop), daemon=True).start()


# ---------------------------------------------------------------------------------------------- 4. logging
BAD_SHARE, BAD_MIN_SAMPLES = 0.1, 1000  # note_bad stops a run once this share of >= this many samples was unreadable


class NonFiniteGuard:
    """Stops training on a NaN / inf loss or too many unreadable images, and shows every process a stop request
    after the same step, without a host sync per step: step t's flags (loss not finite, stop asked, data error) are
    combined over the processes (an asynchronous all-reduce MAX), copied to pinned memory and read at step t + 1 (or
    at `flush`, before every checkpoint). A data error carries the message of the first process that had one."""
    def __init__(self, dist=None):
        self.dist, self.pending, self.stop, self.data_error = dist, None, False, None

    def check(self, loss, step, data_error=None):
        asked = stop_signal() is not None
        self.data_error = self.data_error or data_error
        flags = torch.stack([~torch.isfinite(loss.detach()).all(), torch.full((), asked, device=loss.device),
                             torch.full((), self.data_error is not None, device=loss.device)]).float()
        work = event = None
        if self.dist is not None and self.dist.world > 1:
            work = torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX, async_op=True)
        else:
            self.stop = self.stop or asked
        if flags.device.type == "cuda":
            if work is not None:  # NCCL: the copy below waits for the all-reduce on the device, the host does not
                work.wait()
                work = None
            host = torch.empty(3, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flags = host
        previous, self.pending = self.pending, (flags, work, event, step)
        if previous is not None:
            self._raise_if_bad(*previous)

    def flush(self):
        if self.pending is not None:
            self._raise_if_bad(*self.pending)
            self.pending = None

    def agree_stop(self):
        """True on every process when any got a stop signal: one all-reduce, for the points between steps (the end
        of an epoch, after fine-tuning's evaluation) that no step's flags cover."""
        self.flush()
        asked = torch.tensor(float(self.stop or stop_signal() is not None))
        if self.dist is not None and self.dist.world > 1:
            asked = asked.to(self.dist.device)
            torch_dist.all_reduce(asked, op=torch_dist.ReduceOp.MAX)
        self.stop = bool(asked)
        return self.stop

    def _raise_if_bad(self, flags, work, event, step):
        if work is not None:
            work.wait()  # gloo: step t's all-reduce, done in the background meanwhile
        if event is not None:
            event.synchronize()  # waits for step t only, while step t + 1 is already queued
        bad, stop, data = flags.tolist()
        self.stop = self.stop or stop > 0
        if data > 0:
            messages = [str(self.data_error) if self.data_error else None] * (self.dist.world if self.dist else 1)
            if self.dist is not None and self.dist.world > 1:
                torch_dist.all_gather_object(messages, messages[0])
            rank, message = next((r, m) for r, m in enumerate(messages) if m)
            raise DataError(message if len(messages) == 1 else f"process {rank}: {message}")
        if bad > 0:
            raise FloatingPointError(f"non-finite loss at step {step}; training stopped, the checkpoint on disk is "
                                     f"the last good one")


def number_text(v):
    """A logged number as text: 4 significant digits, whole numbers from 10 000 on (no 3.282e+04)."""
    return f"{v:.0f}" if isinstance(v, float) and abs(v) >= 1e4 else f"{v:.4g}" if isinstance(v, float) else f"{v}"


class StepLogger:
    """Rank 0 progress and logs. Metrics are summed as device tensors and read (one host sync) every `every` steps for
    the progress bar (a plain line off a terminal), which show the SHOWN ones; `epoch_summary` appends a JSON line per
    epoch with all of them to log.jsonl and prints it. The epoch's running sums travel in every checkpoint, so an epoch
    that a resume split is logged whole."""
    SHOWN = ("loss", "lr", "images_per_s")  # short lines on any terminal; the other metrics are in the epoch lines

    def __init__(self, dist, output_dir, every=20, total_steps=None):
        self.dist, self.every, self.total_steps = dist, every, total_steps
        self.log_path = Path(output_dir) / "log.jsonl"
        self.bad_seen, self.bad_in_epoch, self.bad_read, self.samples_read = set(), 0, 0, 0
        self.defer_data_errors, self.data_error = dist.world > 1, None  # several processes: stop them together
        self.flops_per_image = self.peak = None  # set by TrainRun.measure_flops where MFU can be computed
        self.progress = self.bar = None  # made at the first step, which may follow a resume
        self.start_epoch()

    def start_epoch(self):
        self.sums, self.count, self.images, self.data_time = {}, 0, 0, 0.0
        self.bad_in_epoch, self.t0 = 0, time.perf_counter()
        self.interval_images, self.interval_data, self.t_interval = 0, 0.0, self.t0

    def state(self):
        """The epoch's running sums averaged over the processes (a collective), for a checkpoint."""
        keys = sorted(self.sums)
        sums = self.means(all_ranks=True, keys=keys, mean=False) if keys else {}
        return {"sums": sums, "count": self.count, "bad_images": self.bad_in_epoch}

    def load_state(self, state):
        if state:
            self.sums = {k: torch.tensor(v, device=self.dist.device) for k, v in state["sums"].items()}
            self.count, self.bad_in_epoch = state["count"], state["bad_images"]

    def rates(self, images, data_time, seconds):
        """images/s over all processes, share of the time spent waiting for data, and MFU per device."""
        if not images:  # the line of an epoch that a resume at its very end completes
            return {}
        out = {"images_per_s": images * self.dist.world / max(seconds, 1e-9),
               "data_share": data_time / max(seconds, 1e-9)}
        if self.flops_per_image and self.peak:
            out["mfu"] = self.flops_per_image * out["images_per_s"] / self.dist.world / self.peak
        return out

    def note_bad(self, bad, dataset):
        """bad [B] (CPU) of a SeededDataset's batch: i where image i was replaced (reported once), -2 - i where i's
        class had no readable image left. A DataError then, or when over BAD_SHARE of at least BAD_MIN_SAMPLES
        samples read failed; with several processes it waits in `data_error` for the guard (all stop together)."""
        self.samples_read += len(bad)
        for i in bad[bad >= 0].tolist():
            self.bad_in_epoch, self.bad_read = self.bad_in_epoch + 1, self.bad_read + 1
            if i not in self.bad_seen:
                self.bad_seen.add(i)
                self.write(f"warning: skipped unreadable image {dataset.base.path(i)}", file=sys.stderr)
        error = None
        for i in (-2 - bad[bad <= -2]).tolist()[:1]:
            try:
                dataset.load(i)  # read again here, for the message that the loader worker could not send
            except DataError as e:
                error = e
        if self.samples_read >= BAD_MIN_SAMPLES and self.bad_read > BAD_SHARE * self.samples_read:
            error = DataError(f"{self.bad_read} of the {self.samples_read} images read so far were unreadable (more "
                              f"than {BAD_SHARE:.0%}); fix or remove the files reported above")
        if error is not None and not self.defer_data_errors:
            raise error
        self.data_error = self.data_error or error

    def update(self, step, metrics, images, data_time):
        """metrics: dict of 0-d tensors (kept on device) or floats; logs every `every` steps. step: steps done."""
        for k, v in metrics.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count, self.images, self.data_time = self.count + 1, self.images + images, self.data_time + data_time
        self.interval_images, self.interval_data = self.interval_images + images, self.interval_data + data_time
        if self.progress is None and self.dist.is_main and self.total_steps:
            self.start_progress(step)
        if self.progress is not None:
            if self.bar is not None:
                self.bar.update(1)
            if step % self.every == 0:  # the only host sync of the loop: once per log interval
                shown = self.means(keys=[k for k in self.SHOWN if k in self.sums])
                # schedule values (floats: lr) as they are now, not their means
                shown.update({k: float(v) for k, v in metrics.items() if k in self.SHOWN and not torch.is_tensor(v)})
                now = time.perf_counter()
                shown.update(self.rates(self.interval_images, self.interval_data, now - self.t_interval))
                self.interval_images, self.interval_data, self.t_interval = 0, 0.0, now
                self.show(step, {k: shown[k] for k in self.SHOWN if k in shown}, now)

    def start_progress(self, step):
        """A tqdm bar when stdout and stderr are a terminal; else (a file, a job scheduler) a plain line every
        `every` steps."""
        self.progress = (time.perf_counter(), step - 1)  # (when, steps done) at the first step of this process
        if all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr)):
            from tqdm import tqdm
            self.bar = tqdm(total=self.total_steps, initial=step - 1, dynamic_ncols=True, mininterval=1.0)

    def show(self, step, shown, now):
        """The running loss, the lr and images/s in the bar (which has the step and eta), or a line
        `step 120/1920 loss=... lr=... images_per_s=... eta=0:05:12`."""
        if self.bar is not None:
            self.bar.set_postfix({k: number_text(v) for k, v in shown.items()}, refresh=False)
            return
        t0, first = self.progress
        eta = int((now - t0) / max(step - first, 1) * (self.total_steps - step))
        print(f"step {step}/{self.total_steps} " + " ".join(f"{k}={number_text(v)}" for k, v in shown.items()) +
              f" eta={eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}", flush=True)

    def write(self, line, file=None):
        """Print a whole line, on a line of its own also while the progress bar is shown."""
        if self.bar is not None:
            self.bar.write(line, file=file or sys.stdout)
            (file or sys.stdout).flush()
        else:
            print(line, file=file or sys.stdout, flush=True)

    def means(self, all_ranks=False, keys=None, mean=True):
        """Means (or sums) since the epoch started; all_ranks: averaged over the processes (a collective)."""
        keys = sorted(self.sums) if keys is None else keys
        if not keys:
            return {}
        sums = torch.stack([self.sums[k].to(self.dist.device) for k in keys]) / (max(self.count, 1) if mean else 1)
        if all_ranks:
            self.dist.all_reduce_mean(sums)
        return dict(zip(keys, sums.tolist()))

    def epoch_summary(self, epoch, **extra):
        elapsed = time.perf_counter() - self.t0
        row = {"epoch": epoch, **self.means(all_ranks=True), **self.rates(self.images, self.data_time, elapsed),
               "data_time_s": self.data_time, "step_time_s": elapsed - self.data_time, "epoch_time_s": elapsed,
               "bad_images": self.bad_in_epoch, **extra}
        if self.dist.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.write(" ".join(f"{k}={number_text(v)}" for k, v in row.items()))
        self.start_epoch()
        return row

    def close(self):
        if self.bar is not None:
            self.bar.close()


# -------------------------------------------------------------------------------------------- 5. the training run
class TrainRun:
    """One training run: where it is (epoch, global step, optimizer steps of the epoch done; in every checkpoint) and
    the plumbing that the loop of each method file calls:

        run.resume(model, optimizer, encoder)      # continue from output-dir/checkpoint.pth (or --resume)
        ddp_model = run.wrap(model)                # --compile, DDP
        for epoch in range(run.epoch, args.epochs):
            for step in run.steps():               # the optimizer steps left in the epoch (up to --max-steps)
                set_lr(optimizer, run.lr(step))
                for micro in range(args.accum):    # run.next_batch(), run.no_sync(...), run.step_random(step, micro)
                    ...
                run.step_done(step, loss, metrics) # guard, log; saves at --save-every, and on a stop signal (exit 75)
            if run.end_epoch():                    # saves; True once --max-steps is reached
                break
        run.finish()

    It acts only when called, apart from the output folder's lock, taken at the start (OutputLock)."""
    on_disk = None  # optimizer steps done in output-dir/checkpoint.pth (resumed from or written); None: none yet

    def __init__(self, args, method, dataset):
        self.args, self.method, self.dataset = args, method, dataset
        self.dist = d = Dist(args.device)
        self.device = d.device
        a = args
        self.sampler = ResumableSampler(len(dataset), a.batch_size, d.world, d.rank, a.accum, a.seed)  # its errors
        dataset.defer_errors = d.world > 1  # a whole unreadable class: every process stops after the same step
        loaded, self.decoder = dataset, None  # come before the output folder is made
        if getattr(a, "decode", "cpu") == "device":  # the workers read the JPEG bytes, the device decodes them
            from device_decode import DecodeDataset, DeviceDecoder
            loaded = DecodeDataset.of(dataset)  # --data synthetic: one line, it has no JPEG files
            self.decoder = DeviceDecoder(loaded, self.device)
        self.out, self.lock = Path(args.output_dir), None
        self.all_processes(lambda: check_output_dir(self.out, self.claim) if d.is_main else None)
        self.loader = make_loader(loaded, a.batch_size, a.num_workers, self.sampler)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = self.steps_per_epoch * a.epochs
        self.effective_batch = a.batch_size * d.world * a.accum
        self.peak_lr = a.lr if a.lr is not None else a.blr * self.effective_batch / 256
        self.epoch = self.step = self.epoch_step = 0  # epoch_step: optimizer steps of the current epoch already done
        self.current_lr, self.data_time, self.images, self.saved_at, self.batches = 0.0, 0.0, None, None, None
        self.model = self.optimizer = self.encoder = None  # given to resume, saved in every checkpoint
        self.guard = NonFiniteGuard(d)
        self.logger = StepLogger(d, self.out, a.log_every, self.total_steps)
        d.print(f"{method}: {len(dataset)} images, {self.steps_per_epoch} steps/epoch, effective batch "
                f"{self.effective_batch}, lr {self.peak_lr:.3g}, device {self.device}, {d.world} process(es)")

    def all_processes(self, fn):
        """fn() on every process -> every process's result; a user error (ValueError) on any is raised on all,
        naming the process, instead of the others hanging in the next collective."""
        if self.dist.world == 1:
            return [fn()]
        failure = None
        try:
            mine = (fn(), None)
        except Exception as e:  # a user error, or a bug (raised as it is here): the others must not wait for this one
            failure, mine = e, (None, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
        every = [None] * self.dist.world
        torch_dist.all_gather_object(every, mine)
        for rank, (_, error) in enumerate(every):
            if error is not None:
                if failure is not None and not isinstance(failure, ValueError):
                    raise failure
                raise UserError(f"process {rank}: {error}")
        return [result for result, _ in every]

    def claim(self, folder):
        """Process 0: lock the output folder, then remove what a save killed half-way left (.checkpoint*.tmp*)."""
        self.lock = OutputLock(folder)
        for stale in folder.glob(".checkpoint*.tmp*"):
            stale.unlink(missing_ok=True)
        self.lock.start()

    def image_names(self):
        """The count and a hash of the images' class folder / file names (a dataset copied elsewhere matches)."""
        if self.images is None:
            base, digest = getattr(self.dataset, "base", self.dataset), hashlib.sha1()
            for i in range(len(base)):  # as bytes (os.fsencode): on POSIX a name need not be valid UTF-8
                name = "/".join(str(base.path(i)).replace(os.sep, "/").rsplit("/", 2)[-2:])
                digest.update(os.fsencode(name) + b"\n")
            self.images = {"count": len(base), "sha1": digest.hexdigest()}
        return self.images

    def resume(self, model, optimizer, encoder):
        """Keep the model, optimizer and exported encoder for the saves; continue from output-dir/checkpoint.pth, else
        from --resume, which only seeds a new run (so a requeued command continues its own checkpoint). Every process
        loads process 0's file and must find the same position; `check_resume` refuses other settings."""
        self.model, self.optimizer, self.encoder = model, optimizer, encoder
        _training[0] = self  # from here on a first Ctrl-C saves a step before the run stops (run_main)
        path = self.all_processes(self.checkpoint_to_resume)[0]
        if path is None:
            return
        loaded = {}

        def load():
            if not self.dist.is_main and not Path(path).is_file():
                raise UserError(f"cannot read {path}, from which process 0 resumes: every process must see process "
                                f"0's output folder (a shared file system)")
            loaded["ckpt"] = load_training_checkpoint(path, self.method)
            position = self.check_resume(loaded["ckpt"], path)
            check_finite_weights(loaded["ckpt"]["model"], path)
            return position
        positions = self.all_processes(load)
        for rank, position in enumerate(positions):
            if position != positions[0]:
                raise UserError(f"process {rank} reads {path} at (epoch, step) {position[:2]}, process 0 at "
                                f"{positions[0][:2]}: every process must see process 0's output folder")
        ckpt = loaded["ckpt"]
        load_state(model, ckpt["model"], "the model", path)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: the optimizer state does not match this model ({e})") from None
        self.epoch, self.step, self.epoch_step = positions[0]
        self.current_lr = ckpt.get("lr", 0.0)
        self.logger.load_state(ckpt.get("log"))
        self.dist.print(f"resumed from {path}: epoch {self.epoch}, step {self.step}")
        if Path(path).resolve() == (self.out / "checkpoint.pth").resolve():
            self.on_disk = self.step
        if self.epoch >= self.args.epochs or self.args.max_steps and self.step >= self.args.max_steps:
            self.dist.print(self.nothing_to_train(path))

    def nothing_to_train(self, path):
        """The line of a rerun whose checkpoint has already done what the command asks: where it is, what comes next."""
        a = self.args
        if self.epoch < a.epochs:
            return (f"nothing to train: {path} is at step {self.step}, the --max-steps {a.max_steps} of this command; "
                    f"raise --max-steps, or leave it out, to go on")
        return (f"this run is complete: {path} holds its {a.epochs} epoch{'s' * (a.epochs > 1)} ({self.step} steps; "
                f"log: {self.out / 'log.jsonl'}); evaluate it: python eval_probe.py --ckpt {path} --data {a.data} "
                f"--mode knn")

    def checkpoint_to_resume(self):
        """Process 0: output-dir/checkpoint.pth when there is one, else --resume, else None (a new run)."""
        if not self.dist.is_main:
            return None
        own, seed = self.out / "checkpoint.pth", self.args.resume
        if own.is_file():
            if seed and Path(seed).resolve() != own.resolve():
                print(f"{own} exists: continuing this run from it (--resume {seed} only seeds a new run)", flush=True)
            return str(own)
        return seed or None

    def check_resume(self, ckpt, path):
        """(epoch, step, optimizer steps of the epoch done), once the flags that change what is trained (all but the
        parser's `free_on_resume` ones), the images and the effective batch are those of the checkpoint; the layout
        (processes x batch x accum) may change: the position is in samples of the epoch's order."""
        missing = [k for k in ("epoch", "step", "samples") if k not in ckpt]
        if missing:
            raise UserError(f"{path} has no {', '.join(missing)}: not a complete training checkpoint")
        saved, now = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}, vars(self.args)
        free = set(now.get("resume_free", ()))
        changes = [f"--{k.replace('_', '-')} {saved[k]} -> {v}" for k, v in now.items()
                   if k in saved and k not in free and saved[k] != v]
        if ckpt.get("effective_batch", self.effective_batch) != self.effective_batch:
            changes.append(f"effective batch {ckpt['effective_batch']} -> {self.effective_batch} (processes x "
                           f"--batch-size x --accum)")
        images = ckpt.get("images", self.image_names())
        if images != self.image_names():
            changes.append(f"training images {images['count']} -> {self.images['count']}" +
                           (" (other names)" if images["count"] == self.images["count"] else ""))
        if changes:
            raise UserError(f"{path} was trained with other settings: {', '.join(changes)}; continue it with its own "
                            f"settings, or start a new run in another --output-dir")
        return ckpt["epoch"], ckpt["step"], ckpt["samples"] // self.effective_batch

    def wrap(self, model):
        """The model to call in the loop: torch.compile'd (--compile), then DDP-wrapped on several processes."""
        wrapped = torch.compile(model) if self.args.compile else model  # compile before the DDP wrap
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
        return wrapped

    def steps(self):
        """The global numbers of the optimizer steps left in the current epoch, ending early at --max-steps; starts
        this process's micro-batches of the epoch from the saved position on (`next_batch`)."""
        self.sampler.epoch, self.sampler.start_chunk = self.epoch, self.epoch_step * self.args.accum
        if self.loader.num_workers and self.loader.worker_init_fn is None:  # before the (persistent) workers start
            self.loader.worker_init_fn = quiet_worker
        self.batches = iter(self.loader) if self.decoder is None else self.decoder.batches(iter(self.loader))
        end = self.step + self.steps_per_epoch - self.epoch_step
        if self.args.max_steps:
            end = min(end, max(self.args.max_steps, self.step))
        return range(self.step, end)

    def lr(self, step, start_frac=0.0, end_frac=0.0):
        """Learning rate of optimizer step `step`: warmup + half-cosine over fractional epochs."""
        a = self.args
        self.current_lr = warmup_cosine(step / self.steps_per_epoch, a.epochs, a.warmup_epochs, self.peak_lr,
                                        start_frac, end_frac)
        return self.current_lr

    def next_batch(self):
        """The next micro-batch's tensors on the device; unreadable files are reported, the wait for data timed."""
        t0 = time.perf_counter()
        *tensors, bad = next(self.batches)
        self.logger.note_bad(bad, self.dataset)
        tensors = [t.to(self.device, non_blocking=True) for t in tensors]
        self.data_time += time.perf_counter() - t0
        return tensors

    def step_random(self, step, micro):
        """The model-side randomness of micro-batch `micro` of optimizer step `step` (see StepRandom)."""
        a, d = self.args, self.dist
        return StepRandom.for_micro_step(a.seed, step, micro, a.batch_size, d.world, d.rank, a.accum, self.device)

    def no_sync(self, ddp_model, micro):
        """Skip DDP's gradient all-reduce on all but the last accumulation micro-step."""
        if self.dist.world > 1 and micro < self.args.accum - 1:
            return ddp_model.no_sync()
        return contextlib.nullcontext()

    def step_done(self, step, loss, metrics=None):
        """After optimizer step `step`: the position advances, the loss is checked (one step late: no host sync), the
        progress logged; a checkpoint every --save-every steps, and on a stop request (SIGTERM / SIGUSR1 to any
        process) one of this step before exit code 75."""
        self.guard.check(loss, step, self.logger.data_error)
        self.step, self.epoch_step = step + 1, self.epoch_step + 1
        logged = {"loss": loss, "lr": self.current_lr, **(metrics or {})}
        self.logger.update(self.step, logged, self.args.batch_size * self.args.accum, self.data_time)
        self.data_time = 0.0
        if self.guard.stop:
            self.save()
            self.exit_for_requeue()
        if self.args.save_every and self.step % self.args.save_every == 0:
            self.save()

    @property
    def epoch_complete(self):  # every optimizer step of the current epoch done (not cut short by --max-steps)
        return self.epoch_step == self.steps_per_epoch

    def end_epoch(self, **extra):
        """After the epoch's steps: a complete epoch writes its log.jsonl line (with `extra`, e.g. an evaluation's
        numbers) and moves to the next; then save, and say whether to stop (once --max-steps is reached). A stop
        request since the last step (say, during an evaluation) saves before the line and exits 75: the resumed run
        writes it after redoing the evaluation."""
        if self.guard.agree_stop():
            self.save()
            self.exit_for_requeue()
        if self.epoch_complete:
            self.epoch, self.epoch_step = self.epoch + 1, 0
            self.logger.epoch_summary(self.epoch - 1, lr=self.current_lr, **extra)
        self.save()
        return not self.epoch_step == 0 or bool(self.args.max_steps) and self.step >= self.args.max_steps

    def exit_for_requeue(self):
        """After a stop request's checkpoint: every process stops with exit code EXIT_REQUEUE (75, run_main)."""
        _training[0] = None  # saved: a Ctrl-C from here on stops at once
        self.logger.close()
        if self.lock is not None:
            self.lock.release()
        why = signal.Signals(stop_signal()).name if stop_signal() else "a stop signal to another process"
        raise Requeue(f"{why} after step {self.step - 1}; {self.out / 'checkpoint.pth'} holds it: run the same command "
                      f"to continue")

    def save(self):
        """Write output-dir/checkpoint.pth atomically (rank 0; every process returns once it is written, or raises
        its error): model, optimizer, position, effective batch, images, arguments, the epoch's log sums and the
        exported encoder; also checkpoint-NNNN.pth every --keep-every epochs. Never with non-finite weights."""
        self.guard.flush()
        if self.saved_at == (self.epoch, self.step):  # e.g. --max-steps on an epoch's end: saved by its epoch end
            return
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()  # one host read
        if not finite:
            raise FloatingPointError(f"non-finite parameters after step {self.step - 1}; training stopped, the "
                                     f"checkpoint on disk is the last good one")
        log = self.logger.state()  # a collective: before the writing, which rank 0 does alone

        def write():
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                     "samples": self.epoch_step * self.effective_batch, "step": self.step, "lr": self.current_lr,
                     "effective_batch": self.effective_batch, "images": self.image_names(), "log": log,
                     "args": vars(self.args), **encoder_export(self.encoder, self.method)}
            save_checkpoint(self.out / "checkpoint.pth", state)
            keep = self.args.keep_every
            if keep and self.epoch_step == 0 and self.epoch % keep == 0:
                save_checkpoint(self.out / f"checkpoint-{self.epoch:04d}.pth", state)
        self.all_processes(lambda: write() if self.dist.is_main else None)
        self.saved_at, self.on_disk = (self.epoch, self.step), self.step

    def finish(self):
        """After the loop: close the progress bar, wait for every process, unlock the output folder."""
        _training[0] = None  # a Ctrl-C after the loop (e.g. SemMAE's part extraction) stops at once
        self.logger.close()
        self.dist.barrier()
        if self.lock is not None:
            self.lock.release()

    def measure_flops(self, model, *inputs):
        """FLOPs per image of one forward + backward of model(inputs[0], rng, *inputs[1:]) (a small batch), for the
        log's MFU; only where the device's peak is known (it costs a step)."""
        from tools.bench import count_flops, device_peak_flops
        self.logger.peak = device_peak_flops(self.device)
        if self.logger.peak is None:
            return None
        batch = inputs[0].shape[0]
        rng = StepRandom(self.args.seed, -1, self.device, slice(0, batch), batch)
        with autocast(self.device):
            flops = count_flops(lambda: model(inputs[0], rng, *inputs[1:])[0].backward())
        model.zero_grad(set_to_none=True)
        self.logger.flops_per_image = flops / batch
        return self.logger.flops_per_image
