"""The plumbing of a run's life, shared by every script: what an operator needs and a reader of the papers never does.
Processes and precision, checkpoints (atomic, weights-only), and TrainRun, the position and saves behind each method
file's loop. Beside it: the output folder's lock (output_lock.py), the guard and logs of a run (train_log.py), the
start-up, signals and exit codes of every script with its flags (cli.py), any checkpoint's encoder
(eval_utils.load_vit), the benchmark and FLOP counting (tools/bench.py).
"""
import contextlib, errno, hashlib, os, shutil, signal, time
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from cli import Requeue, UserError, _training, quiet_worker, stop_signal
from common import ResumableSampler, StepRandom, make_loader, warmup_cosine
from output_lock import OutputLock, check_output_dir
from train_log import NonFiniteGuard, StepLogger


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


# -------------------------------------------------------------------------------------------- 3. the training run
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
