"""`python -m galaxy.memory --config_file C --world N [--measure]`: every rank's predicted memory
(galaxy.profiler.memory), checked like a training command line, and with --measure beside a real
step's peak on gloo ranks."""
import argparse

from galaxy.app import cli
from galaxy.profiler.memory import measure, report
from galaxy.runtime.launch import spawn


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--measure", action="store_true", help="also run a real step on gloo ranks and compare peaks")
    known, rest = pre.parse_known_args(argv)
    args, cfg, plan, world, rank = cli.parse("Every rank's memory for a config, before anything runs "
                                             "(--measure: beside a real step's peak).", None, rest)
    if args.config_file is None:
        raise SystemExit("galaxy.memory: --config_file is required")
    measured = spawn(measure, plan.world, (plan, cfg), timeout_s=300, limit_s=600) if known.measure else None
    print(report(plan, cfg, measured))
