"""The command lines: --help shows every default, --recipe NAME gives exactly the README's demo flags (explicit flags
win), each method writes to runs/<method> by default, the log's first line is the resolved command line, and the
progress is one plain line per event when the output is not a terminal (a bar on a terminal, summaries above it)."""
import argparse
import json
import importlib
import io
import re
import shlex
import subprocess
import sys

import pytest
import torch

import common
import cli
import train_log
import train_utils
from conftest import ROOT, argv, subprocess_env

PARSERS = {  # name -> (module, sub-command)
    "latent_mim": ("latent_mim", None), "pcae": ("pcae", None), "semmae-parts": ("semmae", "parts"),
    "semmae": ("semmae", "pretrain"), "eval_probe": ("eval_probe", None), "finetune": ("finetune", None)}
REQUIRED = {"latent_mim": ["--data", "synthetic"], "pcae": ["--data", "synthetic"], "semmae": ["--data", "synthetic"],
            "semmae-parts": ["--data", "synthetic", "--teacher", "random"],
            "eval_probe": ["--ckpt", "x.pth", "--data", "synthetic"], "finetune": ["--ckpt", "x.pth", "--data", "s"]}


def parser_of(name):
    """(the script's parser, the (sub-)parser that holds the flags, the arguments before the flags)"""
    module, sub = PARSERS[name]
    parser = importlib.import_module(module).build_parser()
    if sub is None:
        return parser, parser, []
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, subparsers.choices[sub], [sub]


def parse(name, *flags):
    parser, _, sub = parser_of(name)
    return parser.parse_args([*sub, *REQUIRED[name], *flags])


# ------------------------------------------------------------------------------------------------------------ --help
def printed_defaults(parser):
    """{option: the text after '(default: ' that --help prints in its entry, or None}, read off the printed help: an
    entry starts on a line indented by two spaces with the option and goes on over the lines indented further."""
    entries, current = {}, None
    for line in parser.format_help().splitlines():
        m = re.match(r"^  (-[^ ,]+)((?:, -[^ ,]+)*)", line)
        if m:
            flags = [m.group(1), *re.findall(r"-[^ ,]+", m.group(2))]
            current = max(flags, key=len)
            entries[current] = line
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {flag: text.split("(default: ", 1)[1].rsplit(")", 1)[0] if "(default: " in text else None
            for flag, text in ((f, " ".join(t.split())) for f, t in entries.items())}


@pytest.mark.parametrize("name", list(PARSERS))
def test_help_prints_every_default_as_the_parser_has_it(name):
    _, parser, _ = parser_of(name)
    printed = printed_defaults(parser)
    for action in parser._actions:
        flag = max(action.option_strings, key=len, default=None)
        if flag is None or action.default is argparse.SUPPRESS or flag == "--help":
            continue
        shown = printed[flag]
        if action.required:
            assert shown is None, flag
        elif action.nargs == 0:  # a switch: on or off
            assert shown == ("on" if action.default == action.const else "off"), flag
        elif action.default is None or action.default == "":  # worked out at run time: the help says so in words
            assert shown == "none" or "default" in (action.help or ""), flag
        elif isinstance(action.default, list):
            assert [action.type(v) for v in shown.split()] == action.default, flag
        else:  # the printed value reads back as the parser's default
            assert (action.type or str)(shown) == action.default, (flag, shown, action.default)
    assert printed["--warmup-epochs"] is not None  # a flag is never cut at its hyphen in the wrapped help


def test_help_of_the_sub_commands_and_the_recipes(capsys):
    import semmae
    with pytest.raises(SystemExit) as exit_info:
        semmae.build_parser().parse_args(["pretrain", "--recipe", "demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and "(default: runs/semmae)" in text and "(default: imagenet)" in text
    assert "demo-teacher: " + semmae.PRETRAIN_RECIPES["demo-teacher"] in text  # the recipes' flags are listed


# -------------------------------------------------------------------------------------------------------- recipes
SCRIPT_OF = {"latent_mim.py": "latent_mim", "pcae.py": "pcae", "semmae.py parts": "semmae-parts",
             "semmae.py pretrain": "semmae"}


def documented_recipes():
    """(script, recipe, flags) of every row `| `SCRIPT --recipe NAME` | `FLAGS` |` of README.md and docs/*.md."""
    rows = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in re.finditer(r"^\| `([a-z_]+\.py(?: parts| pretrain)?) --recipe ([\w-]+)` \| `([^`]*)` \|$",
                             doc.read_text(), re.M):
            rows.append((SCRIPT_OF[m.group(1)], m.group(2), m.group(3)))
    return rows


def test_every_recipe_is_documented_and_gives_the_documented_flags():
    rows = documented_recipes()
    for name, recipe, flags in rows:
        by_recipe, by_flags = vars(parse(name, "--recipe", recipe)), vars(parse(name, *flags.split()))
        assert by_recipe.pop("recipe") == recipe and by_flags.pop("recipe") == "imagenet"
        assert by_recipe == by_flags, (name, recipe)  # the same namespace: the same run as the documented flags
    import latent_mim, pcae, semmae
    recipes = {("latent_mim", r) for r in latent_mim.RECIPES} | {("pcae", r) for r in pcae.RECIPES} | \
              {("semmae-parts", r) for r in semmae.PARTS_RECIPES} | {("semmae", r) for r in semmae.PRETRAIN_RECIPES}
    assert {(n, r) for n, r, _ in rows} == {(n, r) for n, r in recipes if r != "imagenet"}


def documented_commands():
    """Every `python SCRIPT.py ...` / `torchrun ... SCRIPT.py ...` command in the bash blocks of README.md and docs/*.md
    (continued lines joined, comments dropped), except those with placeholders ($VAR, FLAGS, ...)."""
    commands = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split("#")[0].split("&&"):
                    words = shlex.split(part)
                    script = next((w for w in words if w.endswith(".py")), None)
                    if script is None or "$" in part or any(w.isupper() and len(w) > 1 for w in words):
                        continue
                    if (ROOT / script).is_file():  # the project's scripts (not detectron2's or mmsegmentation's)
                        commands.append((doc.name, script, words[words.index(script) + 1:]))
    return commands


def test_every_documented_command_parses():
    """The docs' commands use flags the scripts have (a renamed or removed flag fails here, not on a reader's GPU)."""
    commands = documented_commands()
    assert len(commands) > 30
    for doc, script, words in commands:
        module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
        if not hasattr(module, "build_parser"):  # tools/bench.py and tools/gpu_check.py parse in their main
            continue
        parser = module.build_parser()
        try:
            parser.parse_args(words)
        except SystemExit:
            raise AssertionError(f"{doc}: {script}.py {' '.join(words)}") from None


@pytest.mark.parametrize("name", ["latent_mim", "pcae", "semmae-parts", "semmae"])
def test_imagenet_recipe_is_the_defaults(name):
    assert vars(parse(name)) == vars(parse(name, "--recipe", "imagenet"))


def test_explicit_flags_win_over_the_recipe():
    demo = parse("latent_mim", "--recipe", "demo")
    assert (demo.model, demo.input_size, demo.epochs, demo.lr, demo.gap) == ("micro", 32, 60, 1e-3, 2)
    # before or after --recipe, also where the flag repeats the imagenet default (base, 224, --accum 2)
    for flags in (["--recipe", "demo", "--model", "base", "--input-size", "224", "--epochs", "7"],
                  ["--model", "base", "--input-size", "224", "--epochs", "7", "--recipe", "demo"]):
        args = parse("latent_mim", *flags)
        assert (args.model, args.input_size, args.epochs, args.lr, args.gap, args.recipe) == \
               ("base", 224, 7, 1e-3, 2, "demo")
    assert parse("latent_mim", "--recipe", "demo", "--accum", "2").accum == 2  # the imagenet default, not demo's 1
    teacher = parse("semmae", "--recipe", "demo-teacher", "--masking", "semantic", "--blr", "1.5e-4")
    assert (teacher.masking, teacher.blr, teacher.model) == ("semantic", 1.5e-4, "micro")
    args = parse("pcae", "--recipe=demo")
    assert (args.model, args.decoder_depth) == ("micro", 2)


def test_unknown_recipe_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("latent_mim", "--recipe", "imagenet-1k")
    assert exit_info.value.code == 2 and "invalid choice: 'imagenet-1k'" in capsys.readouterr().err


def test_a_resume_may_name_another_recipe(tmp_path):
    """Started with --recipe demo, continued with the flags it stands for, written out: the recipe's flags are
    compared one by one, not its name."""
    import pcae
    from conftest import run_inprocess
    run_inprocess("pcae", tmp_path, "", "--recipe", "demo", "--max-steps", "2")
    pcae.main(pcae.build_parser().parse_args([*pcae.RECIPES["demo"].split(), *argv("pcae", tmp_path, "",
                                                                                   "--max-steps", "3")]))
    assert train_utils.load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 3


# ---------------------------------------------------------------------------------------------- output folders
def test_default_output_dir_per_method():
    assert {name: parse(name).output_dir for name in ("latent_mim", "pcae", "semmae", "semmae-parts")} == {
        "latent_mim": "runs/latent_mim", "pcae": "runs/pcae", "semmae": "runs/semmae",
        "semmae-parts": "runs/semmae-parts"}
    assert parse("latent_mim", "--recipe", "demo").output_dir == "runs/latent_mim"
    assert parse("eval_probe").output is None and parse("finetune").output_dir is None  # next to the checkpoint


def test_parts_file_defaults_to_the_output_dir(tmp_path):
    import semmae
    flags = argv("semmae-parts", tmp_path, "")
    del flags[flags.index("--out"):flags.index("--out") + 2]
    semmae.main(semmae.build_parser().parse_args([*flags, "--epochs", "1"]))
    assert (tmp_path / "parts.pt").is_file() and (tmp_path / "parts_preview.png").is_file()


# -------------------------------------------------------------------------------------------------------- the log
def run_cli(monkeypatch, capsys, flags):
    """latent_mim's command line in-process through run_main -> (stdout, stderr); pytest's streams are no terminal."""
    import latent_mim
    monkeypatch.setattr(sys, "argv", ["latent_mim.py", *flags])
    capsys.readouterr()
    cli.run_main(latent_mim.main, latent_mim.build_parser())
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_first_line_is_the_resolved_command_and_progress_is_plain_lines(tmp_path, monkeypatch, capsys):
    import latent_mim
    flags = ["--recipe", "demo", *argv("latent_mim", tmp_path, "")]  # the tiny run's flags override demo's
    out, err = run_cli(monkeypatch, capsys, flags)
    lines = out.splitlines()
    head, _, command = lines[0].partition(": ")
    assert head == "latent_mim.py (recipe demo)"
    assert "--model micro --input-size 32 --epochs 2 " in command and "--gap 2 --sim-weight 0.05 " in command
    # the line is the whole configuration: it gives the same arguments without the recipe
    replay, given = vars(latent_mim.build_parser().parse_args(shlex.split(command))), vars(
        latent_mim.build_parser().parse_args(flags))
    assert replay.pop("recipe") == "imagenet" and given.pop("recipe") == "demo" and replay == given
    # not a terminal: one line per event, no carriage returns, each epoch summary at the start of its own line
    assert "\r" not in out and "\r" not in err
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 24 and steps[11].startswith("step 12/24 loss=") and " lr=" in steps[11]
    assert " images_per_s=" in steps[11] and " eta=" in steps[11]
    assert [line.split()[0] for line in lines if "epoch=" in line] == ["epoch=0", "epoch=1"]
    assert lines.index(steps[11]) + 1 == lines.index(next(line for line in lines if line.startswith("epoch=0")))


def test_first_line_on_rank_0_only(monkeypatch, capsys):
    import latent_mim
    monkeypatch.setattr(sys, "argv", ["latent_mim.py", "--data", "synthetic"])
    for rank, printed in (("1", ""), ("0", "latent_mim.py (recipe imagenet): --data synthetic --output-dir ")):
        monkeypatch.setenv("RANK", rank)  # as torchrun sets it
        cli.run_main(lambda args: None, latent_mim.build_parser())
        out = capsys.readouterr().out
        assert out.startswith(printed) and out.count("\n") == (rank == "0")


def logger_run(every, steps=6):
    """A StepLogger of one epoch of `steps` steps (loss as a device tensor, lr as a float), then its summary."""
    logger = train_log.StepLogger(train_utils.Dist("cpu"), logger_run.folder, every=every, total_steps=steps)
    for step in range(1, steps + 1):
        logger.update(step, {"loss": torch.tensor(0.5), "lr": 1e-3 * step}, images=4, data_time=0.0)
    logger.epoch_summary(0, lr=1e-3 * steps)
    logger.close()


def test_plain_lines_every_log_interval(tmp_path, capsys):
    logger_run.folder = tmp_path
    logger_run(every=4, steps=9)
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" loss=")[0] for line in out] == ["step 4/9", "step 8/9", "epoch=0"]
    assert "loss=0.5 lr=0.008 " in out[1]  # the running mean of the loss, the lr of the step (not a mean)


def terminal_screen(text):
    """The lines a terminal shows for `text`: a carriage return moves back to the line's start and what follows
    overwrites it."""
    screen, col = [[]], 0
    for ch in text:
        if ch == "\n":
            screen.append([])
            col = 0
        elif ch == "\r":
            col = 0
        else:
            line = screen[-1]
            line[col:col + 1] = [ch]
            col += 1
    return ["".join(line).rstrip() for line in screen]


def as_terminal(monkeypatch):
    """stdout and stderr replaced by one stream that says it is a terminal; returns it."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    return term


def test_on_a_terminal_a_bar_and_the_summary_on_its_own_line(tmp_path, monkeypatch):
    term = as_terminal(monkeypatch)
    logger_run.folder = tmp_path
    logger_run(every=2)
    monkeypatch.undo()
    assert "\r" in term.getvalue() and "step 2/6" not in term.getvalue()  # a tqdm bar, no plain lines
    summary = [line for line in terminal_screen(term.getvalue()) if "epoch=" in line]
    assert len(summary) == 1 and summary[0].startswith("epoch=0 loss=0.5 lr=0.006 ")


@pytest.mark.slow
def test_log_redirected_to_a_file(tmp_path):
    """The real command with stdout and stderr in one file (`> log 2>&1`): one line per event, nothing glued."""
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, str(ROOT / "pcae.py"), *argv("pcae", tmp_path / "run", ""),
                               "--log-every", "5"], env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT,
                              timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    lines = text.splitlines()
    assert "\r" not in text and lines[0].startswith("pcae.py (recipe imagenet): --data synthetic ")
    assert [line.split()[0] for line in lines if "epoch=" in line] == ["epoch=0", "epoch=1"]
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["5/24", "10/24", "15/24", "20/24"]


# --------------------------------------------------------------------------------- a recipe with fewer epochs
def test_a_recipe_shortened_by_epochs_scales_its_warmup_and_says_so(tmp_path, monkeypatch, capsys):
    """`--recipe demo --epochs 1` runs: the demo's 3 warm-up epochs of 60 become 0.05 (one note line under the
    configuration); a --warmup-epochs of the user's own is kept, and refused where it exceeds --epochs."""
    small = ["--synthetic-size", "64", "--num-workers", "0", "--proj-dim", "64", "--decoder-dim", "32",
             "--decoder-heads", "2", "--output-dir", str(tmp_path / "run")]
    out, err = run_cli(monkeypatch, capsys, ["--recipe", "demo", "--data", "synthetic", "--epochs", "1", *small])
    lines = out.splitlines()
    assert err == "" and " --epochs 1 --warmup-epochs 0.05 " in lines[0]
    assert lines[1] == ("note: warm-up 0.05 epochs (--recipe demo's 3 of 60, scaled to --epochs 1; --warmup-epochs "
                        "sets it)")
    ckpt = train_utils.load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["step"], ckpt["args"]["warmup_epochs"]) == (1, 1, 0.05)
    assert parse("latent_mim", "--recipe", "demo", "--epochs", "120").warmup_epochs == 6  # in proportion, also up
    assert parse("latent_mim", "--epochs", "100").warmup_epochs == 5  # the defaults (imagenet): 40 of 800
    assert parse("semmae", "--recipe", "demo", "--epochs", "5").warmup_epochs == 0.5  # a sub-command's recipe
    for flags in (["--recipe", "demo"], ["--recipe", "demo", "--epochs", "60"], ["--recipe", "demo", "--epochs", "1",
                                                                                 "--warmup-epochs", "0.5"]):
        args = parse("latent_mim", *flags)
        assert args.notes == [] and args.warmup_epochs == (0.5 if "0.5" in flags else 3)
    for explicit in ("2", "3"):  # the user's own contradiction stays an error
        with pytest.raises(SystemExit) as exit_info:
            run_cli(monkeypatch, capsys, ["--recipe", "demo", "--data", "synthetic", "--epochs", "1",
                                          "--warmup-epochs", explicit, *small])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip() == "error: --warmup-epochs must be between 0 and --epochs"


def test_a_missing_or_unknown_stage_names_both_and_gives_an_example(capsys):
    import semmae
    parser = semmae.build_parser()
    for words, got in ((["--data", "synthetic"], ", not 'synthetic'"), ([], "")):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(words)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and err[-1] == (
            f"semmae.py: error: the first word must be the stage: `parts` (stage A: semantic part learning -> parts "
            f"file) or `pretrain` (stage B: MAE with semantic-guided masking){got}; e.g. {parser.example}")
    example = shlex.split(parser.example.split(" (")[0])  # the example parses
    assert example[:2] == ["python", "semmae.py"] and parser.parse_args(example[2:]).command == "pretrain"


def test_stage_a_echoes_the_architecture_of_its_teacher_checkpoint(tmp_path, monkeypatch, capsys):
    """A teacher checkpoint decides what stage A builds: its echo shows the teacher's preset and patch size (a micro
    ViT here), not the --model default."""
    import semmae
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pth"
    train_utils.save_checkpoint(teacher, train_utils.encoder_export(common.build_vit("micro", img_size=32), "test"))
    flags = [str(teacher) if a == "random" else a for a in argv("semmae-parts", tmp_path, "", "--max-steps", "1")]
    del flags[flags.index("--model"):flags.index("--model") + 2]  # --model left at its default, base
    monkeypatch.setattr(sys, "argv", ["semmae.py", *flags])
    cli.run_main(semmae.main, semmae.build_parser())
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("semmae.py parts (recipe imagenet): ") and " --model micro --patch-size 8 " in first
    assert " --model base" not in first and f"--teacher {teacher}" in first
    assert parse("semmae-parts").model == "base"  # --teacher random builds --model


# ------------------------------------------------------------------------------------------ short lines
def test_step_lines_show_step_loss_lr_images_per_s_and_eta_only(tmp_path, monkeypatch, capsys):
    """Off a terminal each step line is short (under 100 characters for the tiny run); the epoch line and log.jsonl
    keep every metric (Latent MIM's similarity monitors, gamma, momentum)."""
    out, _ = run_cli(monkeypatch, capsys, argv("latent_mim", tmp_path, ""))
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(steps) == 24 and max(len(line) for line in steps) < 100
    for line in steps:
        assert [word.split("=")[0] for word in line.split()[2:]] == ["loss", "lr", "images_per_s", "eta"], line
    epoch_line = next(line for line in out.splitlines() if line.startswith("epoch=0 "))
    logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert {"sim_pred", "sim_vis", "sim_target", "gamma", "momentum"} <= set(logged)
    assert [word.split("=")[0] for word in epoch_line.split()] == list(logged)


def test_the_bar_shows_loss_lr_and_images_per_s(tmp_path, monkeypatch):
    as_terminal(monkeypatch)
    logger = train_log.StepLogger(train_utils.Dist("cpu"), tmp_path, every=1, total_steps=3)
    for step in range(1, 4):
        logger.update(step, {"loss": torch.tensor(0.5), "lr": 1e-3, "sim_pred": torch.tensor(0.9), "gamma": 0.7},
                      images=4, data_time=0.0)
    logger.bar.refresh()
    shown = logger.bar.postfix
    logger.close()
    monkeypatch.undo()
    assert [part.split("=")[0] for part in shown.split(", ")] == ["loss", "lr", "images_per_s"]


def test_numbers_are_plain():
    assert [train_log.number_text(v) for v in (32820.4, 9999.4, 0.5, 4.69e-06, 3, 1e5)] == [
        "32820", "9999", "0.5", "4.69e-06", "3", "100000"]


def test_bench_line_prints_plain_numbers(capsys):
    from tools import bench
    bench.bench_report("latent_mim", seconds=32.8204, batch=8, flops_per_image=66.52e9, device=torch.device("cpu"))
    assert capsys.readouterr().out.strip() == ("bench=latent_mim device=cpu batch=8 ms_per_step=32820 "
                                               "images_per_s=0.2438 gflop_per_image=66.52")


def test_the_linear_probe_prints_about_ten_epoch_lines_the_last_and_the_best(capsys):
    """90 epochs: every 9th epoch's line (10 lines, the last among them) and the best epoch's; not 90 lines."""
    import eval_probe
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.arange(64) % 4
    head = eval_probe.build_head(8, 4)
    batches, n = eval_probe.cached_batches(x, y, 32, train_utils.Dist("cpu"))
    result = eval_probe.fit_linear_head(head, batches, n, (x, y), train_utils.Dist("cpu"), epochs=90,
                                        warmup_epochs=10, lr=1.0)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"epoch {e}" for e in range(8, 90, 9)] + ["best"]
    best = max(result["history"], key=lambda row: row["top1"])
    assert lines[-1] == f"best: epoch {best['epoch']}, val top-1 {best['top1']:.2f}  top-5 {best['top5']:.2f}"
    assert len(result["history"]) == 90  # every epoch is still evaluated and returned
