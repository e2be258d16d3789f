"""kdpo_lab: kernelized Direct Preference Optimization (DPO-Kernels), tested and explained.

Modules, one idea each: kernels, divergences, losses, selection, data, models, training,
evaluation, spectra, plots, cli.
"""
import os

__version__ = "0.1.0"


def fast_mode() -> bool:
    """True when KDPO_FAST=1: notebooks and the quickstart shrink their sizes (CI runs this way)."""
    return os.environ.get("KDPO_FAST", "0") not in ("", "0", "false", "False")
