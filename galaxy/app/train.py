"""What every training entry script does: parse and validate (or only --explain the plan),
then on each rank: the shared session (galaxy.app.session: groups from the plan, a config check
across ranks, model and tuning method), data, Trainer (pipeline schedule when pp > 1, traced with
--trace_dir, its memory beside the prediction with --memory_report, training checkpoints and
resume), final Hugging Face export.

An entry script only names its model (galaxy.models.registry) and default config:

    train.main(__doc__, "bert", "train_config/bert/galaxy/full.json")
"""
from contextlib import nullcontext

from galaxy.app import cli, outputs
from galaxy.app.session import join, load_model
from galaxy.data import DataError
from galaxy.data.build import build_data, check_training_data, held_out_data
from galaxy.models.checkpoint import CheckpointError
from galaxy.models.registry import MODELS, build_model
from galaxy.pipeline import PipelineForwardBackward, format_actions
from galaxy.planner.replan import Replanner
from galaxy.profiler import emulate, observe
from galaxy.profiler.explain import explain
from galaxy.profiler.memory import MemoryReport, model_state_line
from galaxy.runtime import elastic, launch
from galaxy.train import checkpoint
from galaxy.train.loop import NonFiniteError, Trainer, run_training
from galaxy.tuning.apply import check_sources
from galaxy.tuning.keys import save_tuning_record


def checkpoint_saver(trainer, total):
    """on_step callback: a training checkpoint every save_every steps and at the last step."""
    def on_step(metrics):
        if metrics["step"] % trainer.cfg["save_every"] == 0 or metrics["step"] == total:
            path = checkpoint.save(trainer, trainer.cfg["save_dir"], trainer.cfg["keep_checkpoints"])
            trainer.log(f"saved training checkpoint {path}")
    return on_step


def stop_on_signal(trainer):
    """on_step callback for save_on_signal: once any rank got SIGTERM/SIGINT, every rank saves
    at this same step and the run ends with 128 + the signal number."""
    flag = launch.SignalFlag()

    def on_step(metrics):
        signum = flag.any_rank()
        if signum:
            path = checkpoint.save(trainer, trainer.cfg["save_dir"], trainer.cfg["keep_checkpoints"])
            trainer.log(f"stopped by signal {signum} after step {metrics['step']}; saved training checkpoint {path}")
            raise SystemExit(128 + signum)
    return on_step


def train(rank, world, cfg, plan, args):
    """Train on this rank (args: metrics_file, trace_dir); bad data or checkpoints end it with
    a message naming the rank, not a traceback."""
    try:
        _train(rank, world, cfg, plan, args)
    except (DataError, CheckpointError, NonFiniteError) as e:
        raise SystemExit(f"galaxy: rank {rank}: {e}") from None


def evaluate(trainer, held_out, log):
    """The model's score on the samples its data holds out (retrieval's recall@1), if any: every
    rank runs it (a forward of the layout), rank 0 says what it found."""
    if held_out is not None:
        line = trainer.model.evaluate(held_out)
        if trainer.ctx.rank == 0:
            log(f"at step {trainer.step}: {line}")


def _train(rank, world, cfg, plan, args):
    ctx = join(cfg, plan, rank)
    data = build_data(cfg, ctx)
    if rank == 0 and getattr(data, "cut", ""):  # what the data lost to seq_length, told once
        print(f"[rank 0] {data.cut}", flush=True)
    if len(data) < cfg["batch_size"]:
        raise DataError(f"{cfg['data_file']}: {len(data)} sequences of {cfg['seq_length']} tokens, "
                        f"fewer than one batch (batch_size {cfg['batch_size']})")
    model, tuning = load_model(cfg, ctx, rank)
    total = cfg["max_steps"] or cfg["num_epochs"] * len(data) // (cfg["batch_size"] * cfg["gradient_accumulation_steps"])
    log = (lambda msg: print(f"[rank {rank}] {msg}", flush=True))
    if rank == 0:
        log(f"plan: {plan.describe()}")
    log(tuning)
    trainer = Trainer(model, ctx, cfg, data, total, log=log)
    if cfg["save_dir"]:
        checkpoint.check_room(trainer, cfg["save_dir"])
    if plan.pp_size > 1:
        pipe = trainer.forward_backward = PipelineForwardBackward(trainer)
        if ctx.dp_rank == 0 and ctx.tp_rank == 0:
            actions = pipe.actions(cfg["gradient_accumulation_steps"] * cfg["num_microbatches"])
            log(f"{cfg['pipeline_schedule']} stage {ctx.pp_rank}: {format_actions(actions)}")
    report = MemoryReport(trainer) if cfg["memory_report"] else None
    log(report.start_line() if report else model_state_line(trainer))
    if cfg["resume"]:
        step = checkpoint.resume(trainer, cfg["save_dir"])
        if rank == 0:
            log(f"resumed from step {step} of {cfg['save_dir']}")
    held_out = held_out_data(cfg, ctx)
    evaluate(trainer, held_out, log)
    saver = checkpoint_saver(trainer, total) if cfg["save_every"] else None
    stopper = stop_on_signal(trainer) if cfg["save_on_signal"] else None
    # (may replace trainer.model)
    replanner = Replanner(model, ctx, cfg, trainer, log, args.verbose) if cfg["replan"] is not None else None
    device = emulate.device(args.device_gflops, args.device_gflops_after, rank, log if rank == 0 else None)
    with observe.traced(args.trace_dir, rank, model, lambda: trainer.step + 1) as trace_step, device:
        def on_step(metrics):
            for callback in (trace_step, saver, stopper):
                if callback:
                    callback(metrics)
            device.after_step(metrics["step"])
            if replanner:  # last: a checkpoint of this step is written in the split it ran
                replanner.after_step(metrics["step"])
        run_training(trainer, total, args.metrics_file, on_step, report.around_step if report else nullcontext)
    evaluate(trainer, held_out, log)
    if cfg["save_dir"]:
        with trainer.full_weights():
            checkpoint.require_finite(trainer, f"the final export to {cfg['save_dir']}")
            trainer.model.save_hf(cfg["save_dir"], cfg["save_trainable_only"])
        if cfg["save_trainable_only"] and rank == 0:  # what load_trainable and generate.py rebuild from
            save_tuning_record(cfg, cfg["save_dir"])


def main(doc, model, default_config, argv=None):
    """Parse the command line (config errors stop here, before any process starts) and train
    `model` ("bert", "llama", "bart") on this rank, or on every rank spawned here."""
    args, cfg, plan, world, rank = cli.parse(doc.splitlines()[0], default_config, argv, cli.add_device_args)
    if cfg["model"] != model:
        cli.reject(f"config {args.config_file} has model '{cfg['model']}', this script trains {model}")
    cli.check(check_training_data, cfg)
    cli.check(MODELS[model].check, cfg, plan)
    cli.check(elastic.check, cfg, plan, rank, resumes=True)
    if args.explain:  # the plan only: no process group, no training
        print(explain(plan, cfg, build_model))
        return
    if args.trace_dir and cfg["replan"] is not None:
        cli.reject("--trace_dir traces the model it starts with; replan may rebuild it in another split, so use "
                   "one or the other")
    try:
        check_sources(cfg)  # inputs before outputs: a run that cannot load leaves no empty save_dir
    except CheckpointError as e:
        raise SystemExit(f"galaxy: {e}") from None
    outputs.check_outputs(cfg["save_dir"], args.metrics_file)  # every process that may write, before step 1
    owns_save_dir = cfg["save_dir"] and rank in (None, 0)  # the process of rank 0 locks it for the run
    with outputs.save_dir_lock(cfg["save_dir"]) if owns_save_dir else nullcontext():
        launch.run(train, world, rank, (cfg, plan, args), args.init_method,
                   cfg["distributed_backend"], cfg["timeout_s"], args.threads, args.debug,
                   **elastic.launch_args(cfg, plan, resumes=True))
