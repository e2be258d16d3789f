"""Where the Wasserstein penalty's loss time goes: torch.profiler's table for table 1's call (B = 64 pairs,
T = 32, V = 512, forward + backward of `losses.kernel_dpo_loss` with the penalty), on one thread.

    .venv/bin/python bench/profile_wasserstein.py [--pairs 64] [--calls 10] [--rows 15]
"""
import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import bench


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--calls", type=int, default=10, help="profiled calls (after 3 warm-up calls)")
    parser.add_argument("--rows", type=int, default=15, help="rows of the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x = bench.loss_inputs(args.pairs, 32, 512, 256)
    step = bench.ours(x, divergence="wasserstein", divergence_form="penalty", lam=0.1)
    for _ in range(3):
        step()
    cpu = time.process_time()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.calls):
            step()
    cpu = (time.process_time() - cpu) / args.calls
    print(f"{bench.machine()}\n\nWasserstein penalty, B = {args.pairs}: {1e3 * cpu:.1f} CPU ms per call under the "
          f"profiler, {args.calls} calls\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
