"""The `kdpo` command: quickstart, generate-data, sft, train, eval, demo, spectra, figures.

Every training option is a field of `kdpo_lab.config.SFTConfig` (`kdpo sft`) or `TrainConfig`
(`kdpo train`); `transformers.HfArgumentParser` turns the fields into options. A YAML file sets
them and `--field value` on the command line overrides the file: `kdpo train CONFIG.yaml --beta 0.2`.

A user's mistake (bad data under --strict, a bad option or config value, a missing file or model) is
one line on stderr and exit code 2, without a traceback; `--debug` (or KDPO_DEBUG=1) shows it.
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

EPILOG = """examples:
  kdpo quickstart                                   build data, SFT a tiny model, align it 4 ways, evaluate, plot
  kdpo sft configs/sft_tiny.yaml                    the reference: a tiny Llama SFT on the synthetic suite
  kdpo train configs/dpo_tiny.yaml --kernel rbf --gamma 0.5 --divergence js
  kdpo train configs/dpo_tiny.yaml --resume true    continue a killed run where it stopped
  kdpo train configs/dpo_tiny.yaml --data my_pairs.jsonl --max-length auto
  accelerate launch -m kdpo_lab.cli train configs/llama7b_lora.yaml --model PATH_OR_HUB_NAME
  kdpo eval runs/dpo --n-generate 200               held-out accuracy, margins, KL, lengths (rewards on the suite)
  kdpo eval runs/dpo --data my_pairs.jsonl --reward-model PATH_OR_HUB_NAME
  kdpo spectra runs/sft runs/dpo runs/dpo_rbf        weightwatcher alphas before and after alignment
add --debug (or set KDPO_DEBUG=1) to see the traceback behind an error message
"""
SFT_EPILOG = """examples:
  kdpo sft configs/sft_tiny.yaml                                  a tiny Llama reference on the synthetic suite
  kdpo sft configs/sft_tiny.yaml --data my_pairs.jsonl --max-length auto
  kdpo sft configs/sft_tiny.yaml --resume true                    continue a killed run
add --debug (or set KDPO_DEBUG=1) to see the traceback behind an error message
"""
FIGURES_HELP = """Redraw every figure of notebooks 01-09 and of the README into one folder, from saved run tables.

For each figure: OUT/NAME.png, OUT/NAME.csv (the numbers behind it) and a row of OUT/manifest.csv
(file, figure, source, config, commit, seed, mode, wall_s). Each figure is drawn by the plots.*
function its notebook calls, from tables; notebooks are not executed. Figures of training runs
(notebooks 05-09, the README's quickstart) first train the runs they lack through the sweep's run
driver, as `kdpo sft` / `kdpo train` / `kdpo quickstart` command lines, into --runs; later calls reuse them.
"""
FIGURES_EPILOG = """modes:
  --fast   small versions for CI: the math at the notebooks' fast sizes, runs at the sizes of
           configs/sweep_fast.yaml and `kdpo quickstart --fast`. Smoke tests of the code path, not results.
  (none)   the reproduction: the notebooks' full sizes (hours of CPU for the runs of notebooks 05-09).
           The 28-pair sweep is never launched from here: its figures read results/sweep/table.csv.

examples:
  kdpo figures --fast --out /tmp/figures         everything, small, into a scratch folder
  kdpo figures                                   the committed figures/ (reuses finished runs in runs/figures)
  kdpo figures --only 05_reward_vs_kl,readme_pair_grid --force
  kdpo figures --list                            every figure's name and its notebook

A figure whose PNG and CSV exist is skipped (--force remakes it). A figure that fails is reported in
one line and the others go on; the exit status is then 1.
"""


class UserError(ValueError):
    """A mistake the user can fix; printed as one line."""


class _OneLineErrors:
    """argparse errors as one line (`kdpo train: error: ...`) raised as UserError, not usage + exit."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


class _Parser(_OneLineErrors, argparse.ArgumentParser):
    pass


def _config_parser(command):
    """An HfArgumentParser over SFTConfig (sft) or TrainConfig (train), with a positional CONFIG.yaml."""
    from transformers import HfArgumentParser

    from kdpo_lab.config import SFTConfig, TrainConfig

    class Parser(_OneLineErrors, HfArgumentParser):
        pass

    cls = SFTConfig if command == "sft" else TrainConfig
    text = {"sft": "supervised fine-tuning of the reference on chosen and rejected responses",
            "train": "align a policy with the DPO-Kernels loss"}[command]
    parser = Parser(cls, prog=f"kdpo {command}", description=text, epilog=SFT_EPILOG if command == "sft" else EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    for action in parser._actions:  # argparse formats help with %: escape it, and show each default
        if action.help:
            action.help = action.help.replace("%", "%%") + f" [{action.default}]"
    parser.add_argument("config", nargs="?", help=f"a YAML file of {cls.__name__} fields (see configs/); "
                                                  "each --option overrides it")
    parser.add_argument("--debug", action="store_true", help="show the traceback behind an error")
    return parser, cls


def parse_config(command, argv):
    """(SFTConfig or TrainConfig) from `[CONFIG.yaml] [--field value ...]`: YAML first, then the options."""
    from kdpo_lab.config import read_yaml, resolve

    parser, cls = _config_parser(command)
    argv = _renamed_options(argv)
    known = {f.name for f in dataclasses.fields(cls)}
    first, rest = parser.parse_known_args(argv)  # finds CONFIG.yaml wherever it stands
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if first.config is not None:
        values = read_yaml(resolve(first.config))
        unknown = set(values) - known
        if unknown:
            raise UserError(f"{first.config}: unknown config keys {sorted(unknown)} (kdpo {command} --help lists "
                            "the fields)")
        try:
            cls(**values)  # the file alone: its mistakes named in its own terms, not as options
        except ValueError as e:
            raise UserError(f"{first.config}: {e}") from e
        parser.set_defaults(**values)
    cfg, _, _ = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True, look_for_args_file=False)
    return cfg


def _renamed_options(argv):
    """argv with old option names (--lr, --batch-size, ...) replaced by TRL's, with a notice for each."""
    from kdpo_lab.config import RENAMED
    old = {}
    for o, n in RENAMED.items():
        old[f"--{o}"] = old[f"--{o.replace('_', '-')}"] = f"--{n.replace('_', '-')}"
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name in old:
            print(f"command line: '{name}' is now '{old[name]}' (TRL's name); the old name still works", file=sys.stderr)
            arg = old[name] + eq + value
        out.append(arg)
    return out


def _main_parser():
    parser = _Parser(
        prog="kdpo", description="Kernelized Direct Preference Optimization (DPO-Kernels): train, evaluate, analyse.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback behind an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("quickstart", help="the main job: SFT + 4 aligned variants + evaluation + figures, on CPU")
    p.add_argument("--out", default="outputs/quickstart", help="folder for runs, tables and figures [%(default)s]")
    p.add_argument("--fast", action="store_true", help="tiny sizes (also set by KDPO_FAST=1); a smoke test")

    sub.add_parser("sweep", help="the multi-seed 28-pair study: resumable, parallel, --list for a cluster (kdpo sweep --help)")
    sub.add_parser("select", help="rank the 28 kernel-divergence pairs for a reference before training: "
                                  "kdpo select CONFIG [--out DIR] [--field value ...] (fields of kdpo train; model = the reference)")

    p = sub.add_parser("generate-data", help="write the synthetic preference suite (seeded, deterministic)")
    p.add_argument("--out", default="data/suite", help="output folder [%(default)s]")
    p.add_argument("--n-train", type=int, default=2000, help="training pairs per family [%(default)s]")
    p.add_argument("--seed", type=int, default=0, help="generator seed [%(default)s]")

    sub.add_parser("sft", help="supervised fine-tuning of the reference on chosen and rejected responses",
                   add_help=False)
    sub.add_parser("train", help="align a policy with the DPO-Kernels loss", add_help=False)

    p = sub.add_parser("eval", help="evaluate a trained run against its reference, on any preference data")
    p.add_argument("run", help="a run folder written by `kdpo train`")
    p.add_argument("--n-generate", type=int, default=128, help="prompts to sample for KL, lengths, reward, win-rate "
                                                               "[%(default)s]")
    p.add_argument("--split", default="test", help="data split [%(default)s]")
    p.add_argument("--data", default=None, help="preference data to evaluate on [the run's own data]")
    p.add_argument("--reward-model", default=None, metavar="PATH_OR_HUB_NAME",
                   help="a sequence-classification reward model: adds reward and win-rate on any data")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens sampled per response [%(default)s]")

    p = sub.add_parser("figures", help="redraw every figure of the notebooks and the README into figures/, from run tables",
                       description=FIGURES_HELP, epilog=FIGURES_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help="small versions for CI; without it, full size (the reproduction)")
    p.add_argument("--out", default="figures", help="folder for the PNGs, CSVs and manifest.csv [%(default)s]")
    p.add_argument("--only", default=None, metavar="NAME[,NAME]", help="make only these figures (names: --list)")
    p.add_argument("--force", action="store_true", help="remake figures whose PNG and CSV already exist")
    p.add_argument("--runs", default="runs/figures", help="folder of the training runs, made once and reused [%(default)s]")
    p.add_argument("--processes", type=int, default=2, help="runs trained in parallel, one `kdpo` process each; 0: one "
                                                            "by one inside this process [%(default)s]")
    p.add_argument("--seed", type=int, default=0, help="the seed the notebooks use [%(default)s]")
    p.add_argument("--list", action="store_true", help="print every figure's name and where it appears; make nothing")

    p = sub.add_parser("demo", help="the math on a toy batch: every kernel x divergence pair, table and plots")
    p.add_argument("--out", default="outputs/demo", help="output folder [%(default)s]")

    p = sub.add_parser(
        "spectra", help="HT-SR: weightwatcher layer alphas of runs, bands, plots",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Heavy-tailed self-regularisation: weightwatcher's power-law exponent alpha for every linear\n"
                    "layer of the transformer blocks of each run (LoRA merged), compared with the first run.",
        epilog="writes to --out: layers.csv, summary.csv (mean alpha, band fractions, delta alpha, gap, lr, passes),\n"
               "delta_alpha.csv and the figures alpha_by_layer, delta_alpha, esd, alpha_vs_gap and\n"
               "alpha_and_gap_by_setting (the last two need runs with a held-out evaluation).\n\n"
               "reading it: a layer needs at least 384 eigenvalues (min(N, M) of its matrix) for alpha to mean\n"
               "anything (notebook 09); smaller layers are flagged, drawn hollow and left out of every mean.\n"
               "Put the runs' learning rates next to their alphas before reading alpha as over-fitting: in\n"
               "notebook 09, alpha fell with the learning rate whether or not a run over-fitted.\n\n"
               "example: kdpo spectra runs/sft runs/dpo runs/js --out runs/spectra")
    p.add_argument("runs", nargs="+", help="run folders (each with model/) or model folders")
    p.add_argument("--out", default="outputs/spectra", help="output folder [%(default)s]")
    p.add_argument("--baseline", default=None, help="run to compare against, by name or folder [the first run]")
    return parser


def run(argv):
    """Parse argv and run the command; raises on any error (main turns errors into one line)."""
    if argv and argv[0] in ("sft", "train"):
        command, rest = argv[0], [a for a in argv[1:] if a != "--debug"]
        from kdpo_lab import training
        cfg = parse_config(command, rest)
        out = (training.sft if command == "sft" else training.train)(cfg)
        if int(os.environ.get("RANK", "0")) == 0:  # one line, not one per process
            print(f"done: {out}")
        return 0
    if argv[:1] == ["select"]:  # kdpo train's config (its model is the reference), plus --out
        from kdpo_lab import selection_report
        rest, out = list(argv[1:]), "outputs/select"
        if "--out" in rest:
            i = rest.index("--out")
            if i + 1 >= len(rest):
                raise ValueError("--out needs a folder")
            out = rest.pop(i + 1)
            rest.pop(i)
        selection_report.select(parse_config("train", rest), out)
        print(f"wrote the ranked tables and heatmaps to {out}")
        return 0
    if argv[:1] == ["sweep"]:  # its own parser (kdpo sweep --help)
        from kdpo_lab import sweep
        return sweep.main(argv[1:], in_process=main)
    args = _main_parser().parse_args(argv)
    if args.command == "quickstart":
        from kdpo_lab import quickstart
        quickstart.run(Path(args.out), fast=args.fast or None)
    elif args.command == "generate-data":
        from kdpo_lab import suite
        suite.generate_suite(args.out, n_train=args.n_train, seed=args.seed)
        print(f"wrote {args.out}")
    elif args.command == "eval":
        from kdpo_lab import runs
        result = runs.evaluate_run(Path(args.run), runs.EvalRequest(
            split=args.split, n_generate=args.n_generate, data=args.data, reward_model=args.reward_model,
            max_new_tokens=args.max_new_tokens))
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    elif args.command == "figures":
        from kdpo_lab import figures
        return figures.run(args, kdpo=main)
    elif args.command == "demo":
        from kdpo_lab import quickstart
        quickstart.math_demo(Path(args.out))
    elif args.command == "spectra":
        import transformers
        from kdpo_lab import spectra_runs
        transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per run says nothing here
        spectra_runs.analyse_runs([Path(r) for r in args.runs], Path(args.out), baseline=args.baseline)
    return 0


USER_ERRORS = (ValueError, FloatingPointError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, OSError)
"""What a user's mistake raises in kdpo_lab and the libraries under it (DataError is a ValueError; transformers
raises OSError for a model path or hub name it cannot find)."""


def main(argv=None):
    """The `kdpo` entry point: run the command; a user's error is one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("KDPO_DEBUG", "") not in ("", "0")
    if "--debug" in argv and argv[0] not in ("sft", "train"):
        argv = [a for a in argv if a != "--debug"]
    try:
        return run(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def one_line(error):
    """The first line of an error's message (transformers' OSErrors run to several), with its type for OSErrors."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, PermissionError)):
        return f"{text} (a model path or hub name that cannot be loaded here?)"
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"no such file or directory: {error.filename}"
    return text


if __name__ == "__main__":
    sys.exit(main())
