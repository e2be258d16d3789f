"""kdpo_lab: kernelized Direct Preference Optimization (DPO-Kernels), tested and explained.

Modules, one idea each: kernels, divergences, losses, selection, data, models, training,
evaluation, spectra, plots, cli; exercises holds the course's check_... helpers.
"""
import os

__version__ = "0.1.0"


def fast_mode() -> bool:
    """True when KDPO_FAST=1: notebooks and the quickstart shrink their sizes (CI runs this way)."""
    return os.environ.get("KDPO_FAST", "0") not in ("", "0", "false", "False")


_started = None  # set by run_record(), read by wall_time()


def run_record(seed=0, packages=("torch", "transformers", "peft", "trl", "weightwatcher", "pot", "numpy")):
    """Print and return what a notebook's first code cell records: mode (fast/full), seed, versions.

    Also starts the clock that `wall_time()` reads in the notebook's last cell. Versions come from the
    installed distributions (importlib.metadata), so nothing heavy is imported; a missing package reads
    "not installed".
    """
    import platform
    import time
    from importlib import metadata

    global _started
    record = {"mode": "fast (KDPO_FAST=1)" if fast_mode() else "full", "seed": seed,
              "python": platform.python_version(), "kdpo_lab": __version__}
    for name in packages:
        try:
            record[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            record[name] = "not installed"
    _started = time.perf_counter()
    print(" | ".join(f"{k}: {v}" for k, v in record.items()))
    return record


def wall_time():
    """Print and return the seconds since run_record() (a notebook's last cell: its wall time)."""
    import time
    if _started is None:
        raise ValueError("wall_time() needs run_record() first: call it in the notebook's first code cell")
    seconds = time.perf_counter() - _started
    print(f"wall time: {int(seconds // 60)} min {seconds % 60:.0f} s ({'fast' if fast_mode() else 'full'} mode)")
    return seconds


def package_root():
    """The folder that holds data/ and configs/: the checkout, or the installed package's `_assets`."""
    from pathlib import Path
    here = Path(__file__).resolve().parent
    return here / "_assets" if (here / "_assets" / "configs").is_dir() else here.parent
