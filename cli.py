"""The command lines of the scripts: the flags they share, --recipe, --help with every default, the resolved command
line that opens every log, the flags a resume may change; and run_main, the start-up of every script: one-line errors
and exit codes, SIGTERM / SIGUSR1 / Ctrl-C noted for a save and a requeue."""
import argparse, contextlib, math, os, shlex, signal, sys, weakref

import torch

from common import VIT_PRESETS


class UserError(ValueError):
    """A problem with the user's input (paths, flags, files): printed as one line, exit code 2, no traceback. The
    models and data of common.py raise ValueError, which run_main shows the same way."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every default: '(default: off)' for a switch, and for an unset one (None or '') the help text's
    own words where it says 'default', else 'none'."""
    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None or action.default == "":
            return text if "default" in text else text + " (default: none)"
        if action.nargs == 0:  # a switch
            return text + (" (default: on)" if action.default == action.const else " (default: off)")
        if isinstance(action.default, (list, tuple)):  # as on the command line: --nb-knn 10 20
            return f"{text} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with every default in --help (also of sub-commands), named recipes (`--recipe NAME` reads the flags
    recipes[NAME] before the command line's, which win, also where they repeat a default; the first recipe should be
    the papers', no flags; a recipe's warm-up follows a shorter --epochs, see `scaled_warmup`), the flags a resume may
    change (`free_on_resume`, read by TrainRun), `fill_in(args)`: what the flags leave to the run, worked out before
    the configuration is echoed (see the module function fill_in), and `example`: a command shown when the
    sub-command is missing or unknown. Parsed arguments carry `notes`, lines that run_main prints under the echo."""
    def __init__(self, *args, recipes=None, fill_in=None, example=None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.recipes, self.fill_in, self.example = dict(recipes or {}), fill_in, example
        if self.recipes:
            shown = "; ".join(f"{name}: {flags or 'the defaults below'}" for name, flags in self.recipes.items())
            self.add_argument("--recipe", choices=list(self.recipes), default=next(iter(self.recipes)),
                              help=f"a named set of flags, read before the command line's (which win): {shown}")
        self.free_on_resume("recipe", "notes")  # the recipe's flags are compared one by one

    def free_on_resume(self, *dests):
        """Flags that do not change what is trained, so a resume may change them (TrainRun.check_resume)."""
        free = set(self.get_default("resume_free") or ()) | set(dests) | {"resume_free"}
        self.set_defaults(resume_free=sorted(free))

    def parse_known_args(self, args=None, namespace=None):
        notes = []
        if self.recipes:  # (a sub-command's parser is called here with its own part of the command line)
            args = sys.argv[1:] if args is None else list(args)
            find = argparse.ArgumentParser(prog=self.prog, add_help=False)  # --recipe only: no error for the others
            find.add_argument("--recipe", choices=list(self.recipes), default=next(iter(self.recipes)))
            recipe = find.parse_known_args(args)[0].recipe
            flags = self.recipes[recipe].split()
            warmup, notes = self.scaled_warmup(recipe, flags, args)
            args = flags + args + warmup
        namespace, rest = super().parse_known_args(args, namespace)
        namespace.notes = getattr(namespace, "notes", []) + notes  # a sub-command's notes are already there
        return namespace, rest

    def scaled_warmup(self, recipe, recipe_flags, given):
        """(["--warmup-epochs", W], [note]) when the command line `given` sets --epochs E but not --warmup-epochs: the
        recipe's warm-up (its flags', else the default) in proportion, W = recipe warm-up x E / recipe epochs, so that
        `--recipe demo --epochs 1` runs; else ([], []). A --warmup-epochs of the user's own is never changed."""
        if not {"epochs", "warmup_epochs"} <= {action.dest for action in self._actions}:
            return [], []
        find = argparse.ArgumentParser(add_help=False)  # the two flags only, as the real parser reads them
        find.add_argument("--epochs")
        find.add_argument("--warmup-epochs")
        mine, its = find.parse_known_args(given)[0], find.parse_known_args(recipe_flags)[0]
        try:
            epochs = int(mine.epochs)
            recipe_epochs = int(its.epochs if its.epochs is not None else self.get_default("epochs"))
            recipe_warmup = float(its.warmup_epochs if its.warmup_epochs is not None else
                                  self.get_default("warmup_epochs"))
        except (TypeError, ValueError):  # no --epochs given, or a value the real parser refuses with its own message
            return [], []
        if mine.warmup_epochs is not None or epochs == recipe_epochs or recipe_epochs < 1 or epochs < 1:
            return [], []
        warmup = float(f"{recipe_warmup * epochs / recipe_epochs:.4g}")
        return ["--warmup-epochs", repr(warmup)], [
            f"warm-up {warmup:g} epochs (--recipe {recipe}'s {recipe_warmup:g} of {recipe_epochs}, scaled to --epochs "
            f"{epochs}; --warmup-epochs sets it)"]

    def error(self, message):
        """argparse's usage error (exit 2); a missing or unknown sub-command also names the sub-commands, what each
        does, and the parser's `example`."""
        sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is not None and (message.startswith(f"argument {sub.dest}: invalid choice") or
                                message.startswith("the following arguments are required") and sub.dest in message):
            stages = " or ".join(f"`{a.dest}` ({a.help})" for a in sub._choices_actions)
            got = message.split("invalid choice: ", 1)[1].split(" (choose", 1)[0] if "invalid choice" in message else ""
            message = (f"the first word must be the stage: {stages}" + (f", not {got}" if got else "") +
                       (f"; e.g. {self.example}" if self.example else ""))
        super().error(message)


def fill_in(parser, args):
    """Call the fill_in(args) of the parser (or of the sub-command's parser) that holds the flags, if it has one: what
    the flags leave to the run (e.g. the architecture of a teacher checkpoint), set on args before run_main echoes
    them, so that the echo shows what is built."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return fill_in(action.choices[getattr(args, action.dest)], args)
    if getattr(parser, "fill_in", None) is not None:
        parser.fill_in(args)


def resolved_command(parser, args):
    """The run's whole configuration as one command line, `prog (recipe NAME): --flag value ...`: every flag with its
    value after the recipe and the defaults (switches only when on; flags that are unset or empty left out)."""
    words = []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if isinstance(action, argparse._SubParsersAction):  # e.g. `semmae.py parts`: that sub-command's flags
            return resolved_command(action.choices[value], args)
        if not action.option_strings or action.dest == "recipe" or value is None or value == "":
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:
            words += [flag] if value == action.const else []
        else:
            words += [flag, *(shlex.quote(str(v)) for v in (value if isinstance(value, list) else [value]))]
    recipe = f" (recipe {args.recipe})" if getattr(args, "recipe", None) else ""
    return f"{parser.prog}{recipe}: {' '.join(words)}"


def add_common_args(parser, method="run"):
    """Flags of the three pretraining scripts (output in runs/<method>); each sets its paper's defaults."""
    a = parser.add_argument
    a("--data", required=True, help="ImageNet-style folder with train/<class>/*.jpg, or 'synthetic' (no download)")
    a("--output-dir", default=f"runs/{method}", help="checkpoints, log.jsonl; a run resumes from its checkpoint here")
    a("--model", default="base", help=f"ViT preset: {', '.join(VIT_PRESETS)}")
    a("--patch-size", type=int, default=None, help="override the preset's patch size (default: the preset's)")
    a("--input-size", type=int, default=224, help="encoder image size")
    a("--epochs", type=int, default=800, help="training epochs")
    a("--warmup-epochs", type=float, default=40, help="linear lr warmup, in (fractional) epochs")
    a("--batch-size", type=int, default=64, help="per process and micro-step")
    a("--accum", type=int, default=1, help="gradient accumulation steps; effective batch = batch x procs x accum")
    a("--blr", type=float, default=1.5e-4, help="base lr: lr = blr * effective batch / 256")
    a("--lr", type=float, default=None, help="absolute lr (overrides --blr; default: from --blr)")
    a("--weight-decay", type=float, default=0.05, help="AdamW weight decay (none on the parameters each script "
                                                       "exempts)")
    add_run_args(parser)
    a("--synthetic-size", type=int, default=2048, help="number of training images of --data synthetic")
    return parser


def add_run_args(parser):
    """The flags of a run's life, shared by pretraining and fine-tuning; a resume may change all but --seed (for
    --data and --batch-size / --accum, the images and the effective batch are compared instead)."""
    a = parser.add_argument
    a("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="data loading processes per process")
    a("--seed", type=int, default=0, help="seed of the initial weights, data order, augmentation and masks")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is a GPU")
    a("--compile", action="store_true", help="torch.compile the model (checkpoint keys stay clean)")
    a("--save-every", type=int, default=0, help="also checkpoint every N optimizer steps (0: at epoch ends only)")
    a("--keep-every", type=int, default=0, help="keep a copy of the checkpoint every N epochs (0: only the latest)")
    a("--log-every", type=int, default=20, help="running means every N optimizer steps: in the progress bar on a "
                                                "terminal, else one line each")
    a("--resume", default="", help="checkpoint that seeds a new run; once output-dir has its own checkpoint.pth, "
                                   "the run continues from that one")
    a("--max-steps", type=int, default=0, help="stop after this many optimizer steps in total (0: no limit)")
    add_decode_arg(parser)
    parser.free_on_resume("data", "output_dir", "batch_size", "accum", "num_workers", "device", "compile",
                          "save_every", "keep_every", "log_every", "resume", "max_steps")


def add_decode_arg(parser):
    """--decode: where the training images' JPEGs are decoded (device_decode.py); the same crops and flips either
    way, so a resume may switch."""
    parser.add_argument("--decode", default="cpu", choices=["cpu", "device"],
                        help="cpu: loader workers decode, crop and flip (PIL); device: they only read the JPEG bytes "
                             "and draw the crops, the training process decodes them on --device (nvJPEG on CUDA)")
    parser.free_on_resume("decode")


def add_decoder_args(parser, depth):
    """The decoder's size (MAE's 512 wide, 16 heads; `depth` blocks); the decoder checks them (common.MAEDecoder)."""
    parser.add_argument("--decoder-dim", type=int, default=512, help="decoder width")
    parser.add_argument("--decoder-depth", type=int, default=depth, help="decoder blocks")
    parser.add_argument("--decoder-heads", type=int, default=16, help="decoder attention heads")


def add_bench_args(parser):
    """--bench / --profile of the pretraining scripts (tools/bench.py)."""
    parser.add_argument("--bench", action="store_true", help="time the training step on random tensors, then exit")
    parser.add_argument("--bench-steps", type=int, default=10, help="timed steps of --bench (after 2 warm-up steps)")
    parser.add_argument("--profile", action="store_true", help="with --bench: where the time of a step goes")
    parser.free_on_resume("bench", "bench_steps", "profile")
    return parser


AT_LEAST_ONE = ("epochs", "batch_size", "accum", "log_every", "synthetic_size", "bench_steps", "num_heads")
NON_NEGATIVE = ("num_workers", "save_every", "keep_every", "max_steps", "eval_every")


def check_common_args(args):
    """The shared flags (those the script has) that no constructor checks."""
    for name in AT_LEAST_ONE:
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    for name in NON_NEGATIVE:
        if getattr(args, name, 0) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be non-negative")
    if not 0 <= args.warmup_epochs <= args.epochs:  # also refuses nan
        raise UserError("--warmup-epochs must be between 0 and --epochs")
    check_lr_and_device(args)


def check_lr_and_device(args):
    """Finite positive --blr / --lr, finite non-negative --weight-decay, and --device cuda only with a GPU."""
    for name in ("blr", "lr"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name} must be a finite positive number, got {value}")
    if args.weight_decay is not None and not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UserError(f"--weight-decay must be a finite non-negative number, got {args.weight_decay}")
    check_device(args)


def check_device(args):
    """--device cuda only where torch sees a GPU."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA GPU (use --device cpu or auto)")


# ------------------------------------------------------------------------------ start-up, signals, exit codes
EXIT_USER_ERROR, EXIT_NON_FINITE, EXIT_REQUEUE = 2, 3, 75  # 75: EX_TEMPFAIL of sysexits.h, "try again later"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command that Ctrl-C ended
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM and Kubernetes send some time before a kill
_stop_signal = [None]
_training = [None]  # the TrainRun whose loop a first Ctrl-C stops after its step (from its resume to its finish)
_created_folders = []  # output folders this process created, removed again if a failed run left them empty
_locks = weakref.WeakSet()  # the output-folder locks this process holds


class Requeue(Exception):
    """Training stopped on a stop request after its checkpoint was written: exit code EXIT_REQUEUE, run it again."""


def stop_signal():
    """The stop signal (SIGTERM / SIGUSR1, or a first Ctrl-C in training) received since run_main started, or None."""
    return _stop_signal[0]


def _note_stop_signal(signum, frame):  # only noted: the loop saves after the current optimizer step, then exits
    _stop_signal[0] = _stop_signal[0] or signum  # the first names the stop (torchrun may send SIGTERM after SIGINT)


# torchrun passes a Ctrl-C on as SIGINT, a second one as SIGTERM (also a stop request), and kills the workers after
# its --shutdown-timeout (30 s by default): there the workers stop when the step is saved
INTERRUPT_NOTE = b"\nCtrl-C: stopping after this step, which is saved (Ctrl-C again stops at once, without saving)\n"


def _on_interrupt(signum, frame):
    """SIGINT: in a training loop the first is a stop request as SIGTERM is; a second one, or one outside a training
    loop (an evaluation, the start-up), stops at once (KeyboardInterrupt: one line from run_main)."""
    if _training[0] is not None and _stop_signal[0] is None:
        _stop_signal[0] = signum
        if _training[0].dist.is_main:  # os.write: a handler may run inside a print, which must not be re-entered
            os.write(2, INTERRUPT_NOTE)
        return
    raise KeyboardInterrupt


def interrupted_text():
    """What a Ctrl-C that stopped the process at once has lost, in words."""
    run = _training[0]
    if run is None:
        return "Ctrl-C; stopped at once (no training step was running: nothing to save)"
    how = f"stopped at once by {'a second ' if _stop_signal[0] == signal.SIGINT else ''}Ctrl-C during step {run.step}"
    ckpt, done = run.out / "checkpoint.pth", run.step - (run.on_disk or 0)  # done: steps finished since the save
    if not run.on_disk:
        return (f"{how}; nothing was saved yet ({ckpt} is written at the end of every epoch and every --save-every "
                f"steps): the same command starts the run again")
    lost = {0: "", 1: f"step {run.on_disk} is lost, "}.get(done, f"steps {run.on_disk}-{run.step - 1} are lost, ")
    return f"{how}; {lost}{ckpt} holds the run up to step {run.on_disk - 1}: run the same command to continue there"


def quiet_worker(_):
    """worker_init_fn of the training loader: Ctrl-C and stop signals (sent to the whole group) are the main's."""
    for s in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(s, signal.SIG_IGN)


def remove_created_folders():
    """Release this process's locks and remove the output folders it created that are still empty (a refused run, or
    one stopped before its first save, leaves no trace)."""
    for lock in list(_locks):
        lock.release()
    for folder in _created_folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()  # only an empty folder
    _created_folders.clear()


def close_progress_bars():
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", [])):  # end the progress bar's line first
        bar.close()


def run_main(main, parser):
    """Start-up of every script: parse the flags (and cli.fill_in), print the whole configuration, note SIGTERM /
    SIGUSR1 / a first Ctrl-C in training (the loop saves the current step, then stops), run `main(args)`. Errors are
    one line and an exit code: 2 user error (UserError, or a ValueError of a model or the data), 3 non-finite loss,
    75 after a stop request's checkpoint (torchrun then exits 1: docs/long_runs.md), 130 Ctrl-C stopped at once."""
    args = parser.parse_args()
    from train_utils import set_precision_flags  # (train_utils imports this module)
    set_precision_flags()
    _stop_signal[0], _training[0] = None, None
    _created_folders.clear()  # only this run's
    previous = {s: signal.signal(s, _note_stop_signal) for s in STOP_SIGNALS}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_interrupt)
    try:
        fill_in(parser, args)
        if int(os.environ.get("RANK", 0)) == 0:  # the log's first line: the whole configuration of the run
            print(resolved_command(parser, args), flush=True)
            for note in getattr(args, "notes", ()):
                print(f"note: {note}", flush=True)
        main(args)
    except (ValueError, FloatingPointError, Requeue) as e:
        close_progress_bars()
        print(f"{'stopped' if isinstance(e, Requeue) else 'error'}: {e}", file=sys.stderr)
        sys.exit(EXIT_REQUEUE if isinstance(e, Requeue) else EXIT_USER_ERROR if isinstance(e, ValueError) else
                 EXIT_NON_FINITE)
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"interrupted: {interrupted_text()}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        remove_created_folders()
        _stop_signal[0], _training[0] = None, None
        # Under torchrun, a process that exits with an error code makes torchrun SIGTERM the others, which may be
        # exiting with the same code: they ignore it (SIG_IGN also holds through Python's shutdown) to keep theirs.
        several = int(os.environ.get("WORLD_SIZE", 1)) > 1
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if several else handler)
