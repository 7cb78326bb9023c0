"""Command line shared by the entry scripts: config file, launch flags, and `--key value`
overrides for any config key. Everything is validated before a process group is formed."""
import argparse
import sys

from galaxy.config.load import idle_keys, is_config_key, key_type, load_config, parse_cli_value
from galaxy.errors import ConfigError
from galaxy.plan import build_plan, default_splits
from galaxy.planner.replan import check_replan
from galaxy.profiler import emulate
from galaxy.runtime import launch
from galaxy.train.zero import check_zero


def parse(description, default_config, argv=None, add_args=None, keys=None, check=None,
          metrics="one JSON line per optimizer step"):
    """add_args(parser), when given, adds an entry's own flags; they win over config keys of the
    same name (inference's --batch_size is not the training batch). keys(args, overrides), when given,
    returns config keys drawn from those flags (generate.py: its checkpoint's shape): over the config
    file's, under the command line's (`overrides`). check(args, cfg, plan) is the entry's own check.
    A ConfigError from either ends the program as parse's own do. `metrics`: what --metrics_file gets."""
    parser = argparse.ArgumentParser(description=description,
                                     epilog="Any config key can be overridden with --key value.")
    parser.add_argument("--config_file", "--config", dest="config_file", default=default_config)
    launch.add_launch_args(parser)
    if add_args:
        add_args(parser)
    parser.add_argument("--metrics_file", default=None, help=f"append {metrics}")
    parser.add_argument("--explain", action="store_true", help="print the parallel plan and exit")
    parser.add_argument("--verbose", action="store_true", help="print what the run measures as it goes (replan: "
                        "every rank's speed at every step)")
    parser.add_argument("--trace_dir", default=None, help="write Chrome traces of compute and collectives")
    args, rest = parser.parse_known_args(argv)
    overrides = config_overrides(parser, rest)
    if args.timeout_s is not None:
        overrides["timeout_s"] = args.timeout_s
    if args.backend:
        overrides["distributed_backend"] = args.backend
    try:
        world, rank = launch.resolve_world_rank(args)
        if rank is None and world > 1:
            launch.check_local_spawn(world, launch.cpu_cores())
    except ValueError as e:
        parser.error(str(e))
    try:
        cfg = load_config(args.config_file, {**(keys(args, overrides) if keys else {}), **overrides})
        plan = build_plan(cfg, world)
        check_zero(cfg, plan)
        check_replan(cfg, plan)
        if check:
            check(args, cfg, plan)
    except ConfigError as e:
        parser.exit(2, f"galaxy: config error: {e}\n")
    if "device_gflops" in vars(args):  # an entry that runs steps (add_device_args)
        try:
            emulate.check_devices(args.device_gflops, args.device_gflops_after, world)
        except ValueError as e:
            parser.error(str(e))
    if rank in (None, 0):  # once per run: the launcher of a local spawn, or rank 0
        for line in default_splits(cfg, plan):
            print(f"galaxy: {line}", flush=True)
    for line in idle_keys(cfg, plan):
        print(f"galaxy: warning: {line}", file=sys.stderr, flush=True)
    args.init_method = launch.init_method_from(args, cfg["init_method"], local_spawn=rank is None and world > 1)
    return args, cfg, plan, world, rank


def argument(parse):
    """An argparse type from a parser raising ValueError (argparse then names the flag and the text)."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def add_device_args(parser):
    """Edge devices emulated by throughput (galaxy.profiler.emulate, docs/emulation.md): for the
    entries that run steps or requests; parse checks them against the world."""
    group = parser.add_argument_group("emulated devices")
    group.add_argument("--device_gflops", type=argument(emulate.parse_gflops), default=None, metavar="G0,G1,...",
                       help="emulate edge devices: each rank's fp32 throughput in GFLOP/s, one per rank (e.g. 40,10); "
                            "its forward and backward compute that fast, its copies and sends keep the host's speed")
    group.add_argument("--device_gflops_after", type=argument(emulate.parse_change), action="append", default=[],
                       metavar="STEP:G0,G1,...",
                       help="from after step (inference: request, warm-up ones included) STEP on, these throughputs "
                            "(a device that throttles, e.g. 20:40,5); repeatable")


def check(rule, *args, **kwargs):
    """rule(*args, **kwargs), a ConfigError ending the program as parse's own config errors do."""
    try:
        rule(*args, **kwargs)
    except ConfigError as e:
        reject(e)


def reject(why):
    """End the program as parse's own config errors do: before any process starts, exit 2."""
    refuse(f"config error: {why}")


def refuse(why):
    """End the program as argparse's own command-line errors do: the message, exit 2."""
    print(f"galaxy: {why}", file=sys.stderr, flush=True)
    sys.exit(2)


def config_overrides(parser, rest):
    """Turn leftover `--key value` / `--key=value` pairs into validated config overrides."""
    out, i = {}, 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            parser.error(f"unexpected argument {token!r}")
        key, _, value = token[2:].partition("=")
        if not is_config_key(key):
            parser.error(f"unknown option --{key} (not a flag and not a config key)")
        if not value and key_type(key) is bool and (i + 1 >= len(rest) or rest[i + 1].startswith("--")):
            value = "true"  # a bare flag: --save_on_signal
        if not value:
            if i + 1 >= len(rest):
                parser.error(f"--{key} needs a value")
            value, i = rest[i + 1], i + 1
        try:
            out[key] = parse_cli_value(key, value)
        except ConfigError as e:
            parser.error(str(e))
        i += 1
    return out
