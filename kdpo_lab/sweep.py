"""`kdpo sweep`: the multi-seed study of every variant, as plain `kdpo` commands, resumable and parallel.

A sweep config (configs/sweep*.yaml, fields of `SweepConfig`) names the variants, the learning-rate
grid, the seeds and the sizes. The protocol, in the order the driver runs it:

1. the reference: `kdpo sft` once per seed (runs of one seed, across variants, share it);
2. learning rates: every variant at every rate of the grid on `lr_seed`; each variant's rate is the
   one with the best held-out exact reward at its last evaluation on the validation split;
3. seeds: every variant at its rate on each of `seeds`, then `kdpo eval RUN --split test` on the
   whole test split.

Every job is one command line (`kdpo sft|train|eval ...`); the driver runs them as subprocesses
(`processes` at a time, one thread each) and reads results back from the run folders only, so runs
made elsewhere (`kdpo sweep CONFIG --list` prints the runnable commands for a Slurm array) are
collected by the same code. A job is done when its folder holds its result (model/ for sft and train,
eval_test.json for eval); training always runs with `--resume true`, so a killed sweep restarted
continues half-finished runs from their last checkpoint and skips finished ones. The table
(`collect`, one row per evaluation) is rewritten after every job.

Why one reference per seed: the seeds are the replicates the intervals are computed over, so each
draws everything random (reference, data order, sampling); pairing variants by seed cancels what a
seed's runs share. One shared reference would make every interval conditional on that one SFT run.
It costs one SFT per seed, about a minute each (`shared_reference: true` restores one for all).
"""
import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from tqdm.auto import tqdm

from kdpo_lab import divergences, kernels, sweep_stats
from kdpo_lab.sweep_table import collect, write_table
from kdpo_lab.config import SFTConfig, TrainConfig, resolve


@dataclass
class SweepConfig:
    """Everything a sweep depends on; a YAML file sets these (configs/sweep.yaml, configs/sweep_fast.yaml)."""
    out: str = "runs/sweep"                   # sweep folder: sft/, runs/, table.csv, jobs.jsonl, summary/
    data: str = "data/suite"
    sft_config: str = "configs/sft_tiny.yaml"
    train_config: str = "configs/dpo_tiny.yaml"
    sft: dict = field(default_factory=dict)   # SFTConfig fields over sft_config
    train: dict = field(default_factory=dict)  # TrainConfig fields over train_config, for every run
    variants: list = field(default_factory=lambda: ["all"])  # names, or groups: all, pairs, baselines
    learning_rates: list = field(default_factory=lambda: [2.5e-5, 5e-5, 1e-4])
    extend_grid: int = 0                      # widen a variant's grid by x2 past an edge where its best lies, this many times
    lr_seed: int = 0
    seeds: list = field(default_factory=lambda: [1, 2, 3, 4, 5])
    select_by: str = "reward/policy"          # validation metric that picks the learning rate
    select_generate: int = 0                  # >0: the learning-rate runs' last checkpoint scored on this many validation prompts
    test_generate: int = 1000                 # test prompts sampled by the final `kdpo eval`
    shared_reference: bool = False            # one SFT (of lr_seed) for every seed
    gamma: float = 0.5                        # kernel weight of the hybrid losses and HMK
    eta: float = 0.01                         # HMK entropy weight
    label_smoothing: float = 0.1              # cDPO and rDPO flip rate
    divergence_options: dict = field(default_factory=dict)  # e.g. {renyi: {order: 2.0}}
    processes: int = 2                        # parallel jobs; 0 runs them in this process, one by one
    table: str = ""                           # also copy table.csv here (a committed path)

    @classmethod
    def from_yaml(cls, path, **overrides):
        values = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown sweep keys {sorted(unknown)}; allowed: {[f.name for f in dataclasses.fields(cls)]}")
        cfg = cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})
        cfg.learning_rates = [float(lr) for lr in cfg.learning_rates]
        cfg.sft, cfg.train = _typed(SFTConfig, cfg.sft, "sft"), _typed(TrainConfig, cfg.train, "train")
        cfg.divergence_options = {d: _typed(TrainConfig, o, f"divergence_options.{d}") for d, o in cfg.divergence_options.items()}
        return cfg


def _typed(cls, values, where):
    """Config fields from YAML with their dataclass types (YAML reads 5e-5 as a string)."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = set(values) - set(types)
    if unknown:
        raise ValueError(f"sweep {where}: unknown {cls.__name__} fields {sorted(unknown)}")
    cast = {bool: lambda v: v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")}
    return {k: cast.get(types[k], types[k])(v) for k, v in values.items()}


# ----------------------------------------------------------------------------- variants

BASELINES = {"dpo": {}, "ipo": {"loss_type": "ipo"}, "cdpo": {"loss_type": "cdpo"}, "rdpo": {"loss_type": "robust"}}


def all_variants(cfg):
    """{name: TrainConfig fields}: plain DPO, IPO, cDPO, rDPO, HMK, and KERNEL+DIVERGENCE for the 28 pairs."""
    out = {name: dict(opts, **({"label_smoothing": cfg.label_smoothing} if name in ("cdpo", "rdpo") else {}))
           for name, opts in BASELINES.items()}
    out["hmk"] = {"kernel": "hmk", "gamma": cfg.gamma, "eta": cfg.eta}
    for k in kernels.PAPER_FOUR:
        for d in divergences.PAPER_SEVEN:
            out[f"{k}+{d}"] = {"kernel": k, "gamma": cfg.gamma, "divergence": d, **cfg.divergence_options.get(d, {})}
    return out


HEADLINE = ["dpo", *[f"{k}+kl" for k in kernels.PAPER_FOUR], "hmk"]
"""What the paper's headline claims compare (each kernel's hybrid loss with the KL link against plain
DPO, and HMK): the driver runs these first, so a sweep stopped part-way has answered them first."""


def variants(cfg):
    """The variants the sweep runs, in the order it runs them: plain DPO (the baseline of every
    comparison), then the rest of HEADLINE, then the others in all_variants' order."""
    every = all_variants(cfg)
    groups = {"all": list(every), "pairs": [n for n in every if "+" in n], "baselines": list(BASELINES)}
    names = ["dpo"]
    for name in cfg.variants:
        if name not in every and name not in groups:
            raise ValueError(f"sweep variants: unknown {name!r}; use all, pairs, baselines, hmk, dpo, ipo, cdpo, rdpo or KERNEL+DIVERGENCE")
        names += [n for n in groups.get(name, [name]) if n not in names]
    names.sort(key=lambda n: HEADLINE.index(n) if n in HEADLINE else len(HEADLINE))  # stable: the rest keep their order
    return {n: every[n] for n in names}


# ----------------------------------------------------------------------------- jobs

@dataclass
class Job:
    """One unit of work: `kdpo` command lines (argv after `kdpo`) run in order, the last one's result
    being the job's. A Job is generic: notebooks and `kdpo figures` build their own and `execute` them."""
    name: str
    folder: Path
    commands: list

    def line(self):
        return " && ".join("kdpo " + shlex.join(argv) for argv in self.commands)


def argv(command, config_path, fields):
    """`kdpo COMMAND CONFIG --field value ...` as argv (after `kdpo`): floats by repr, booleans lowercase."""
    args = [command, str(config_path)]
    for k, v in fields.items():
        args += [f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v)]
    return args


MOVABLE = ("output_dir", "model", "resume", "progress")
"""Fields a run folder may differ in from its command: paths inside a sweep folder that was moved."""


def check_same(folder, cls, config_path, fields, advice="use a new sweep `out` folder or delete that run"):
    """A folder made with other settings is not this run: ValueError rather than mixing results. Fields in
    MOVABLE may differ (a moved folder); the data path is compared resolved, and a saved one that does not
    exist here is accepted (runs made in another checkout, e.g. handed out by a teacher)."""
    if not (folder / "config.yaml").exists():
        return
    saved = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    want = dataclasses.asdict(cls.from_yaml(resolve(config_path), **fields))

    def same(k):
        if k != "data":
            return saved[k] == want[k]
        here = resolve(saved[k])
        return not os.path.exists(here) or os.path.realpath(here) == os.path.realpath(resolve(want[k]))
    differ = [k for k in want if k in saved and k not in MOVABLE and not same(k)]
    if differ:
        raise ValueError(f"{folder} was run with other settings ({', '.join(f'{k}: {saved[k]!r} != {want[k]!r}' for k in differ)}); "
                         f"{advice}")


def reference_seed(cfg, seed):
    """The seed of the reference that runs of `seed` start from."""
    return cfg.lr_seed if cfg.shared_reference else seed


def reference_folder(cfg, seed):
    return Path(cfg.out) / "sft" / f"s{reference_seed(cfg, seed)}"


def sft_job(cfg, seed):
    seed = reference_seed(cfg, seed)
    folder = reference_folder(cfg, seed)
    fields = {**cfg.sft, "data": cfg.data, "output_dir": str(folder), "seed": seed, "progress": False}
    check_same(folder, SFTConfig, cfg.sft_config, fields)
    return Job(f"sft/s{seed}", folder, [] if (folder / "model").exists() else [argv("sft", cfg.sft_config, fields)])


def train_job(cfg, variant, lr, seed, test):
    """Train (resumable) and, with `test`, evaluate on the test split; only the parts not done yet."""
    folder = Path(cfg.out) / "runs" / variant / f"lr{lr:g}_s{seed}"
    fields = {**cfg.train, **variants(cfg)[variant], "data": cfg.data, "model": str(reference_folder(cfg, seed) / "model"),
              "output_dir": str(folder), "learning_rate": lr, "seed": seed, "resume": True, "progress": False}
    check_same(folder, TrainConfig, cfg.train_config, fields)
    commands = [] if (folder / "model").exists() else [argv("train", cfg.train_config, fields)]
    if test and not (folder / "eval_test.json").exists():
        commands.append(["eval", str(folder), "--split", "test", "--n-generate", str(cfg.test_generate)])
    if not test and cfg.select_generate and not (folder / "eval_validation.json").exists():  # the rate is chosen on this
        commands.append(["eval", str(folder), "--split", "validation", "--n-generate", str(cfg.select_generate)])
    return Job(f"{variant}/lr{lr:g}_s{seed}" + ("/test" if test else ""), folder, commands)


def lr_grid(cfg, table, variant):
    """(a variant's learning rates, whether all have finished): cfg.learning_rates, widened past an edge
    where the best validation result lies at most cfg.extend_grid times (sweep_stats.learning_rate_grid)."""
    def finished(lr):
        return not train_job(cfg, variant, lr, cfg.lr_seed, test=False).commands
    return sweep_stats.learning_rate_grid(table, variant, cfg.learning_rates, cfg.extend_grid, finished, cfg.lr_seed, cfg.select_by)


def plan(cfg, table=None):
    """(jobs runnable now and not done, number of jobs still waiting on others, chosen learning rates)."""
    table = collect(cfg.out) if table is None else table
    seeds = sorted({cfg.lr_seed, *cfg.seeds})
    refs = {s: sft_job(cfg, s) for s in seeds}
    ready = [j for j in {j.name: j for j in refs.values()}.values() if j.commands]
    waiting, chosen = 0, {}
    for variant in variants(cfg):
        if refs[cfg.lr_seed].commands:
            waiting += len(cfg.learning_rates) + len(cfg.seeds)
            continue
        grid, complete = lr_grid(cfg, table, variant)
        if not complete:
            ready += [j for j in (train_job(cfg, variant, lr, cfg.lr_seed, test=False) for lr in grid) if j.commands]
            waiting += len(cfg.seeds)
            continue
        rows = table[(table["variant"] == variant) & table["learning_rate"].isin(grid)]
        rates = sweep_stats.choose_learning_rates(rows, cfg.lr_seed, cfg.select_by)
        chosen[variant] = float(rates.loc[rates["chosen"], "learning_rate"].iloc[0])
        for seed in cfg.seeds:
            if refs[seed].commands:
                waiting += 1
            else:
                job = train_job(cfg, variant, chosen[variant], seed, test=True)
                ready += [job] if job.commands else []
    return ready, waiting, chosen


def run_job(job, processes, in_process=None):
    """Run a job's commands in order, output appended to FOLDER.log: as subprocesses with one thread each
    (processes > 0) or in this process through `in_process(argv)` (the `kdpo` entry point, cli.main, which
    the caller passes: the sweep sits below the command line and does not import it). Returns (job, wall
    seconds, CPU seconds of its subprocesses, error or None); a failed command is reported, never raised,
    so the other jobs go on."""
    if processes == 0 and in_process is None:
        raise ValueError("processes=0 runs the commands in this process: pass in_process=kdpo_lab.cli.main")
    t0, cpu = time.perf_counter(), 0.0
    log = job.folder.parent / f"{job.folder.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for argv in job.commands:
        with open(log, "a") as f:
            f.write(f"$ kdpo {shlex.join(argv)}\n")
            f.flush()
            if processes == 0:
                with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                    try:
                        in_process(argv)
                    except Exception as e:  # noqa: BLE001
                        return job, time.perf_counter() - t0, cpu, f"{type(e).__name__}: {e}; see {log}"
                continue
            proc = subprocess.Popen([sys.executable, "-m", "kdpo_lab.cli", *argv], stdout=f, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            cpu += usage.ru_utime + usage.ru_stime
        if proc.returncode != 0:
            return job, time.perf_counter() - t0, cpu, f"exit status {proc.returncode}; see {log}"
    return job, time.perf_counter() - t0, cpu, None


def execute(cfg, in_process=None):
    """Run the sweep to its end: jobs as they become runnable, `processes` at a time in the plan's order
    (HEADLINE first), the table rewritten after each; a progress bar with an ETA over jobs. Returns the
    names of failed jobs. in_process: the `kdpo` entry point for processes=0 (see run_job)."""
    started, failed = set(), []
    total, done = count_jobs(cfg)
    bar = tqdm(total=total, initial=done, desc="sweep jobs", unit="job", dynamic_ncols=True)
    with ThreadPoolExecutor(max(1, cfg.processes)) as pool:
        running = set()
        while True:
            jobs, _, _ = plan(cfg)
            for job in jobs:  # at most `processes` at once, re-planned after each: the plan's order is the priority
                if job.name not in started and len(running) < max(1, cfg.processes):
                    started.add(job.name)
                    running.add(pool.submit(run_job, job, cfg.processes, in_process))
            if not running:
                break
            bar.total = count_jobs(cfg)[0]  # a widened learning-rate grid adds jobs
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job, seconds, cpu, error = future.result()
                _append(Path(cfg.out) / "jobs.jsonl", {"job": job.name, "command": job.line(), "wall_s": round(seconds, 1),
                                                       "cpu_s": round(cpu, 1), "error": error,
                                                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
                if error:
                    failed.append(job.name)
                    tqdm.write(f"failed: {job.name}: {error}")
                bar.update(1)
            write_table(cfg.out, cfg.table)
    bar.close()
    return failed


def _append(path, row):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def count_jobs(cfg):
    """(all jobs of the sweep, those already done): references, learning-rate runs, seed runs."""
    out, seeds = Path(cfg.out), sorted({cfg.lr_seed, *cfg.seeds})
    refs = {reference_folder(cfg, s) for s in seeds}
    names = list(variants(cfg))
    total, done = len(refs) + len(names) * (len(cfg.learning_rates) + len(cfg.seeds)), sum((r / "model").exists() for r in refs)
    base = {f"lr{lr:g}_s{cfg.lr_seed}" for lr in cfg.learning_rates}
    for v in names:  # a grid widened past an edge (extend_grid) counts the runs started beyond it
        wider = [f.name for f in out.glob(f"runs/{v}/lr*_s{cfg.lr_seed}") if f.is_dir() and f.name not in base]
        total += len(wider)
        done += sum((out / "runs" / v / name / "model").exists() and (not cfg.select_generate or (out / "runs" / v / name / "eval_validation.json").exists())
                    for name in [*base, *wider])
        done += sum(any(out.glob(f"runs/{v}/lr*_s{s}/eval_test.json")) for s in cfg.seeds)
    return total, done


# ----------------------------------------------------------------------------- summary and command

def summarise(cfg, table):
    """OUT/summary/*.csv: learning rates, paired differences to DPO (overall and per family, test split),
    reward-vs-KL frontier gaps, the hybrid losses' relative gain with verdicts, and the per-pair results."""
    out = Path(cfg.out) / "summary"
    out.mkdir(parents=True, exist_ok=True)
    _, _, chosen = plan(cfg, table)
    if not chosen:
        return {}
    grid = pd.concat([table[(table["variant"] == v) & table["learning_rate"].isin(lr_grid(cfg, table, v)[0])] for v in chosen])
    rates = sweep_stats.choose_learning_rates(grid, cfg.lr_seed, cfg.select_by)
    runs = sweep_stats.final_runs(table, chosen, cfg.seeds)
    final = sweep_stats.final_rows(runs, "test")
    result = {"learning_rates": rates}
    if "dpo" in chosen and len(final):
        metric = cfg.select_by
        result["paired"] = pd.concat([sweep_stats.paired_differences(final, m) for m in
                                      [metric, *[f"{metric}/{f}" for f in sweep_stats.families(final, metric)], "kl", "winrate"]
                                      if m in final])
        result["frontier"] = pd.DataFrame([sweep_stats.frontier_gap(runs, v) for v in chosen if v != "dpo"])
        result["gains"] = sweep_stats.hybrid_gains(final, kernels.PAPER_FOUR)
        result["pairs"] = sweep_stats.pair_results(final)
    for name, df in result.items():
        df.to_csv(out / f"{name}.csv", index=False)
    return result


def add_arguments(parser):
    """The options of `kdpo sweep` on an argparse parser (cli.py's subparser, or `main`'s)."""
    parser.add_argument("config", help="a sweep YAML file (fields of kdpo_lab.sweep.SweepConfig; see configs/sweep.yaml)")
    parser.add_argument("--list", action="store_true", help="print the commands runnable now, one per line, and run nothing")
    parser.add_argument("--collect", action="store_true", help="write the table and summary from the run folders, run nothing")
    parser.add_argument("--processes", type=int, default=None, help="parallel jobs (0: in this process) [config's]")
    parser.add_argument("--out", default=None, help="sweep folder [config's]")
    parser.add_argument("--table", default=None, help="also write the table here, e.g. results/sweep/table.csv [config's]")
    parser.epilog = ("examples:\n  kdpo sweep configs/sweep_fast.yaml\n"
                     "  kdpo sweep configs/sweep.yaml --list > commands.txt   (one per line: a Slurm array; list again after)\n"
                     "  kdpo sweep configs/sweep.yaml --collect               (table and summary only)")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def run(args, in_process=None):
    """`kdpo sweep` on parsed arguments; returns the exit status (1 if a job failed)."""
    cfg = SweepConfig.from_yaml(args.config, processes=args.processes, out=args.out, table=args.table)
    if args.list:
        jobs, waiting, _ = plan(cfg)
        for job in jobs:
            print(job.line())
        print(f"{len(jobs)} commands runnable now; {waiting} more wait for their reference or learning-rate choice: "
              f"run these, then list again", file=sys.stderr)
        return 0
    failed = [] if args.collect else execute(cfg, in_process)
    table = write_table(cfg.out, cfg.table)
    result = summarise(cfg, table)
    for name in ("learning_rates", "gains"):
        if name in result:
            print(result[name].to_string(index=False))
    print(f"table: {Path(cfg.out) / 'table.csv'} ({len(table)} rows); summary: {Path(cfg.out) / 'summary'}/")
    if failed:
        print(f"{len(failed)} jobs failed: {', '.join(failed)}; run the sweep again to retry them", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None, in_process=None):
    """`kdpo sweep CONFIG [--list | --collect] [--processes N] [--out DIR] [--table CSV]`; in_process: the
    `kdpo` entry point for --processes 0 (cli passes its own main)."""
    parser = add_arguments(argparse.ArgumentParser(prog="kdpo sweep", description=__doc__.split("\n\n")[0]))
    return run(parser.parse_args(argv), in_process)


if __name__ == "__main__":
    sys.exit(main())
