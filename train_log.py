"""What a training run reports as it goes: the non-finite guard (a NaN / inf loss, a stop request or unreadable data
seen by any process stops every process after the same step, without a host sync per step), the progress bar or
step lines, and log.jsonl with one line per epoch. Used by TrainRun (train_utils.py).
"""
import json, sys, time
from pathlib import Path

import torch
import torch.distributed as torch_dist

from cli import stop_signal
from common import DataError

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
