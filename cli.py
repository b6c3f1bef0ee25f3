"""The command lines of the scripts: the flags they share, --recipe, --help with every default, the resolved command
line that opens every log, the flags a resume may change, and the one-line error for bad input (UserError)."""
import argparse, math, os, shlex, sys

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
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA GPU (use --device cpu or auto)")
