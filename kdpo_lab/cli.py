"""The `kdpo` command: quickstart, generate-data, sft, train, eval, demo, spectra.

Every training option is a field of `kdpo_lab.config.TrainConfig`; a YAML file in configs/ sets
them and `--field value` on the command line overrides the file. `kdpo train --help` lists them all.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

EPILOG = """examples:
  kdpo quickstart                                   build data, SFT a tiny model, align it 4 ways, evaluate, plot
  kdpo sft configs/sft_tiny.yaml                    the reference: a tiny Llama SFT on the synthetic suite
  kdpo train configs/dpo_tiny.yaml --kernel rbf --gamma 0.5 --divergence js
  kdpo train configs/dpo_tiny.yaml --resume true    continue a killed run where it stopped
  accelerate launch -m kdpo_lab.cli train configs/llama7b_lora.yaml --model PATH_OR_HUB_NAME
  kdpo eval runs/dpo --n-generate 200               held-out accuracy, KL to the reference, exact rewards
  kdpo spectra runs/sft runs/dpo runs/dpo_rbf        weightwatcher alphas before and after alignment
"""


def _bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _config_class(command):
    from kdpo_lab.config import SFTConfig, TrainConfig
    return SFTConfig if command == "sft" else TrainConfig


def _add_config_args(parser, command):
    cls = _config_class(command)
    parser.add_argument("config", nargs="?", help=f"a YAML file of {cls.__name__} fields (see configs/)")
    group = parser.add_argument_group("options (each overrides the YAML file; default in brackets)")
    for f in dataclasses.fields(cls):
        kind = {bool: _bool, int: int, float: float}.get(f.type, str)
        text = f"{f.metadata['help']} [{f.default}]".replace("%", "%%")
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                           metavar={int: "N", float: "X", bool: "BOOL"}.get(f.type, "TEXT"), help=text)


def _config(args):
    cls = _config_class(args.command)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    return cls.from_yaml(args.config, **overrides) if args.config else cls(**overrides)


def _renamed_options(argv):
    """argv with old option names (--lr, --batch-size, ...) replaced by TRL's, with a notice for each."""
    from kdpo_lab.config import RENAMED
    old = {f"--{o.replace('_', '-')}": f"--{n.replace('_', '-')}" for o, n in RENAMED.items()}
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name in old:
            print(f"command line: '{name}' is now '{old[name]}' (TRL's name); the old name still works", file=sys.stderr)
            arg = old[name] + eq + value
        out.append(arg)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="kdpo", description="Kernelized Direct Preference Optimization (DPO-Kernels): train, evaluate, analyse.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="the main job: SFT + 4 aligned variants + evaluation + figures, on CPU")
    p.add_argument("--out", default="outputs/quickstart", help="folder for runs, tables and figures [%(default)s]")
    p.add_argument("--fast", action="store_true", help="tiny sizes (also set by KDPO_FAST=1); a smoke test")

    p = sub.add_parser("generate-data", help="write the synthetic preference suite (seeded, deterministic)")
    p.add_argument("--out", default="data/suite", help="output folder [%(default)s]")
    p.add_argument("--n-train", type=int, default=2000, help="training pairs per family [%(default)s]")
    p.add_argument("--seed", type=int, default=0, help="generator seed [%(default)s]")

    for name, text in (("sft", "supervised fine-tuning of the reference on chosen and rejected responses"),
                       ("train", "align a policy with the DPO-Kernels loss")):
        p = sub.add_parser(name, help=text, description=text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_args(p, name)

    p = sub.add_parser("eval", help="evaluate a trained run against its reference")
    p.add_argument("run", help="a run folder written by `kdpo train`")
    p.add_argument("--n-generate", type=int, default=128, help="prompts to sample for reward, win-rate, KL [%(default)s]")
    p.add_argument("--split", default="test", help="data split [%(default)s]")

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

    args = parser.parse_args(_renamed_options(sys.argv[1:] if argv is None else list(argv)))
    if args.command == "quickstart":
        from kdpo_lab import quickstart
        quickstart.run(Path(args.out), fast=args.fast or None)
    elif args.command == "generate-data":
        from kdpo_lab import suite
        suite.generate_suite(args.out, n_train=args.n_train, seed=args.seed)
        print(f"wrote {args.out}")
    elif args.command in ("sft", "train"):
        from kdpo_lab import training
        cfg = _config(args)
        out = (training.sft if args.command == "sft" else training.train)(cfg)
        print(f"done: {out}")
    elif args.command == "eval":
        from kdpo_lab import runs
        result = runs.evaluate_run(Path(args.run), split=args.split, n_generate=args.n_generate)
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    elif args.command == "demo":
        from kdpo_lab import quickstart
        quickstart.math_demo(Path(args.out))
    elif args.command == "spectra":
        import transformers
        from kdpo_lab import spectra_runs
        transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per run says nothing here
        spectra_runs.analyse_runs([Path(r) for r in args.runs], Path(args.out), baseline=args.baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
