"""Training checkpoints: everything a rank needs to continue exactly where it stopped.

    save_dir/step-00000004/
        manifest.json                  step, world, plan, config, sha256 of every file (written last)
        rank-00000.model.safetensors   this rank's parameters as they are (its shard, its stage)
        rank-00000.optim.safetensors   its optimizer tensors and RNG state (CPU, and CUDA on a GPU)
        rank-00000.state.json          step, LR schedule, optimizer hyper-parameters, Python/NumPy RNG,
                                       and which slice of which full tensor each saved tensor is
        rank-00001....

Every rank writes only its own files, so tensor-, sequence-, pipeline- and data-parallel
ranks all use the same format. The data position is the step: batch_indices makes the
data order a function of it, and dropout masks derive from (seed, site, step, sample).

Atomicity: files go into a hidden `.tmp-step-*` directory; once every rank has written and
hashed its files (an all-gather of the hashes), rank 0 writes the manifest and renames the
directory to `step-*` in one os.rename. A crash at any point before leaves no `step-*`
directory, so the previous checkpoint stays the latest. The ranks must share save_dir
(one machine, or a shared filesystem).

Another layout: a checkpoint written by N ranks under one plan resumes on M ranks under another
(the same model, tuning and training settings; LAYOUT_KEYS may differ). Each rank state lists
every tensor's full name and shard (ParamSpec.Shard), so each new rank reads from the old ranks'
files only the rows its own parameters and AdamW moments cover (galaxy.comm.rows.read_rows); the
step, the LR schedule's position and RNG carry over (the data order and dropout masks follow from the step).
"""
import hashlib
import json
import os
import random
import re
import shutil
from collections import namedtuple
from dataclasses import astuple
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from galaxy.layers.param_spec import spec_of
from galaxy.models.checkpoint import CheckpointError
from galaxy.comm.rows import read_rows
from galaxy.train.optim import lr_schedule

FORMAT = "galaxy-train-checkpoint/1"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# keys that say how the ranks split the work: a checkpoint is read into another world or plan (resharded;
# ZeRO's optimizer state is saved unsharded)
LAYOUT_KEYS = ("parallel", "att_parallel_method", "con_parallel_method", "mlp_parallel_method",
               "tp_num_attention_heads_list", "tp_intermediate_size_list", "seq_scatter_list",
               "stage_num_hidden_layers_list", "data_parallel_size", "num_microbatches", "pipeline_schedule",
               "virtual_stages", "overlap_tiles", "bucket_size_mb", "zero_stage", "zero_shard_list", "memory_mb")
# keys a resumed run may change: the layout, where and how long to train (the LR schedule is rebuilt
# from the resumed config at the saved position), how to launch and log
RESUME_FREE_KEYS = LAYOUT_KEYS + (
    "max_steps", "num_epochs", "learning_rate", "warmup_steps", "lr_scheduler", "resume", "save_dir", "save_every",
    "keep_checkpoints", "timeout_s", "save_on_signal", "log_every", "on_nonfinite", "init_method",
    "distributed_backend", "load_checkpoint", "load_trainable", "device", "strict", "elastic", "elastic_restarts",
    "replan", "memory_report")


def _rank_files(rank):
    stem = f"rank-{rank:05d}"
    return f"{stem}.model.safetensors", f"{stem}.optim.safetensors", f"{stem}.state.json"


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _all_gather(ctx, value):
    if ctx.world == 1:
        return [value]
    out = [None] * ctx.world
    dist.all_gather_object(out, value)
    return out


def _raise_if_any(ctx, error):
    """Every rank raises the first rank's error, so all ranks stop with the same message."""
    errors = [e for e in _all_gather(ctx, error) if e]
    if errors:
        raise CheckpointError(errors[0])


# ---- what one rank holds ------------------------------------------------------------------

def _param_names(trainer):
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return [names[id(p)] for group in trainer.opt.param_groups for p in group["params"]]


def _shards(model):
    """name -> (the full tensor's name, [dim, start, length, full] or None when held whole); a
    pipeline's copy of a tied weight is named after its original."""
    out = {}
    for name, p in model.named_parameters():
        spec = spec_of(p)
        out[name] = [spec.init_name or name, list(astuple(spec.shard)) if spec.shard else None]
    return out


def _write_rank(trainer, directory):
    """Write this rank's files (model tensors, optimizer + RNG tensors, JSON state); returns their sha256s."""
    model = {name: p.detach().contiguous().cpu() for name, p in trainer.model.named_parameters()}
    opt = trainer.opt.state_dict()
    tensors = {f"optim.{i}.{key}": value.contiguous().cpu()
               for i, state in opt["state"].items() for key, value in state.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if trainer.ctx.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(trainer.ctx.device)
    np_kind, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_keys.astype(np.int64))
    state = {"format": FORMAT, "rank": trainer.ctx.rank, "step": trainer.step,
             "pp_rank": trainer.ctx.pp_rank, "tp_rank": trainer.ctx.tp_rank, "dp_rank": trainer.ctx.dp_rank,
             "optimizer_params": _param_names(trainer), "param_groups": opt["param_groups"],
             "scheduler": trainer.sched.state_dict(), "rng_python": random.getstate(),
             "rng_numpy": [np_kind, int(np_pos), int(np_gauss), float(np_cached)],
             "shards": _shards(trainer.model)}
    files = _rank_files(trainer.ctx.rank)
    save_file(model, str(directory / files[0]))
    save_file(tensors, str(directory / files[1]))
    (directory / files[2]).write_text(json.dumps(state))
    for name in files:
        _fsync(directory / name)
    return {name: sha256(directory / name) for name in files}


# ---- save ---------------------------------------------------------------------------------

def resume_config(cfg):
    """The part of the config a checkpoint is bound to."""
    return {k: v for k, v in cfg.items() if k not in RESUME_FREE_KEYS}


def save(trainer, save_dir, keep=0):
    """Write a checkpoint of every rank at trainer.step (collective). Returns its directory.
    Non-finite weights or a failed write (disk full, read-only) raise CheckpointError on every
    rank and leave the checkpoints already in save_dir as they were."""
    ctx, save_dir = trainer.ctx, Path(save_dir)
    final = save_dir / f"step-{trainer.step:08d}"
    tmp = save_dir / f".tmp-step-{trainer.step:08d}"
    with trainer.full_weights():  # ZeRO-3 holds shards; a checkpoint holds the rank's whole parameters
        require_finite(trainer, f"checkpoint {final}")
        _raise_if_any(ctx, _attempt(_make_tmp, save_dir, tmp)[1] if ctx.rank == 0 else None)
        written = _all_gather(ctx, _attempt(_write_rank, trainer, tmp))  # (hashes, error) of every rank
        error = next((e for _, e in written if e), None)
        if ctx.rank == 0:
            error = error or _attempt(_publish, tmp, final, _manifest(trainer, [h for h, _ in written]))[1]
            if error:  # free what the failed save took; the previous checkpoints stay untouched
                shutil.rmtree(tmp, ignore_errors=True)
            elif keep:
                for old in sorted(checkpoints(save_dir))[:-keep]:
                    shutil.rmtree(old[1])
        _raise_if_any(ctx, error and f"could not save {final} ({error}); the latest checkpoint in {save_dir} "
                                 f"is still {_latest_name(save_dir)}")
        return final


def _attempt(fn, *args):
    """(result, None), or (None, message) when a filesystem step raises OSError (disk full,
    read-only, not a directory): every rank still reaches the next collective, so all stop together."""
    try:
        return fn(*args), None
    except OSError as e:
        return None, f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
    except SafetensorError as e:  # safetensors reports its I/O errors (a full disk) this way
        return None, str(e)


def _make_tmp(save_dir, tmp):
    save_dir.mkdir(parents=True, exist_ok=True)
    for stale in save_dir.glob(".tmp-step-*"):  # left by a save that crashed
        shutil.rmtree(stale)
    tmp.mkdir()


def check_room(trainer, save_dir):
    """Before step 1 (collective): save_dir has room for one checkpoint of every rank (each
    rank's parameters plus AdamW's two moments of the trained ones), so a full disk shows now."""
    mine = sum(p.numel() * p.element_size() * (3 if p.requires_grad else 1) for p in trainer.model.parameters())
    need, free = sum(_all_gather(trainer.ctx, mine)), shutil.disk_usage(save_dir).free
    _raise_if_any(trainer.ctx, None if need <= free else f"save_dir {save_dir} has {free / 2**20:.1f} MiB free; "
                  f"one checkpoint of this run takes about {need / 2**20:.1f} MiB")


def _latest_name(save_dir):
    found = checkpoints(save_dir)
    return found[-1][1].name if found else "none"


def require_finite(trainer, what):
    """Refuse to write `what` when any rank holds a non-finite parameter (collective): such
    weights must never replace a finite checkpoint or export."""
    bad = next((n for n, p in trainer.model.named_parameters() if not torch.isfinite(p).all()), None)
    _raise_if_any(trainer.ctx, bad and f"rank {trainer.ctx.rank}: parameter '{bad}' holds non-finite values at "
                                       f"step {trainer.step}; not writing {what}")


def _manifest(trainer, hashes):
    return {"format": FORMAT, "step": trainer.step, "world": trainer.ctx.world,
            "plan": trainer.ctx.plan.describe(), "config": resume_config(trainer.cfg),
            "files": {name: digest for rank_hashes in hashes for name, digest in rank_hashes.items()}}


def _publish(tmp, final, manifest):
    """The commit point: the manifest is written and synced, then the directory appears whole."""
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / MANIFEST)
    if final.exists():  # the same step saved again after a resume
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(final.parent)


# ---- load ---------------------------------------------------------------------------------

def checkpoints(save_dir):
    """(step, directory) of every complete checkpoint under save_dir."""
    found = Path(save_dir).iterdir() if Path(save_dir).is_dir() else ()
    return sorted((int(m.group(1)), d) for d in found if (m := _STEP_DIR.match(d.name)) and (d / MANIFEST).is_file())


def latest(save_dir):
    found = checkpoints(save_dir)
    if not found:
        raise CheckpointError(f"--resume: no complete checkpoint (step-*/{MANIFEST}) in save_dir {save_dir}")
    return found[-1][1]


def _read_manifest(directory):
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def _check_compatible(manifest, directory, trainer):
    now, then = resume_config(trainer.cfg), manifest["config"]
    changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise CheckpointError(f"{directory}: the config differs from the checkpoint's in {diffs}; only the "
                              f"layout and {list(RESUME_FREE_KEYS[len(LAYOUT_KEYS):])} may change on resume")


def _verify(manifest, directory, rank):
    for name in _rank_files(rank):
        path = directory / name
        if name not in manifest["files"]:
            return f"{path}: not listed in {directory / MANIFEST}"
        if not path.is_file():
            return f"{path}: missing"
        if sha256(path) != manifest["files"][name]:
            return f"{path}: sha256 does not match {directory / MANIFEST} (file corrupt or modified)"
    return None


def _read_rank(directory, rank):
    files = [directory / name for name in _rank_files(rank)]
    try:
        return load_file(str(files[0])), load_file(str(files[1])), json.loads(files[2].read_text())
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory}: rank {rank}'s files are unreadable ({e})") from None


def _restore(trainer, model_tensors, tensors, state, directory):
    params = dict(trainer.model.named_parameters())
    if set(params) != set(model_tensors):
        missing, extra = sorted(set(params) - set(model_tensors)), sorted(set(model_tensors) - set(params))
        raise CheckpointError(f"{directory}: rank {trainer.ctx.rank} parameters differ (missing {missing}, "
                              f"unexpected {extra})")
    if state["optimizer_params"] != _param_names(trainer):
        raise CheckpointError(f"{directory}: rank {trainer.ctx.rank} optimizer covers other parameters")
    _copy_params(trainer, directory, lambda name, p: model_tensors[name])
    opt_state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, field = key.split(".", 2)
            opt_state.setdefault(int(index), {})[field] = value
    _restore_progress(trainer, opt_state, state["param_groups"], tensors, state)


@torch.no_grad()
def _copy_params(trainer, directory, saved):
    """Copy saved(name, parameter), the checkpoint's tensor for it, into every parameter of this rank."""
    for name, p in trainer.model.named_parameters():
        tensor = saved(name, p)
        if p.shape != tensor.shape:
            raise CheckpointError(f"{directory}: '{name}' has shape {tuple(tensor.shape)}, "
                                  f"parameter needs {tuple(p.shape)}")
        p.copy_(tensor)


def _restore_progress(trainer, opt_state, param_groups, tensors, state):
    """Optimizer state, step, the LR schedule's position (the schedule is the resumed config's), RNG streams."""
    trainer.opt.load_state_dict({"state": opt_state, "param_groups": param_groups})
    trainer.sched = lr_schedule(trainer.opt, trainer.cfg, trainer.total_steps, state["scheduler"]["last_epoch"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and trainer.ctx.device.type == "cuda":  # the device may change on resume
        torch.cuda.set_rng_state(tensors["rng.cuda"], trainer.ctx.device)
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = state["rng_numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    trainer.step = state["step"]


# ---- load into another layout --------------------------------------------------------------

# one old rank's copy of (a slice of) a full tensor: its name there, its optimizer index, the slice (dim None: whole)
_Source = namedtuple("_Source", "rank name optim_index dim start length full", defaults=(None, 0, 0, 0))


class _OldRanks:
    """The rank files of a checkpoint written in another layout, opened lazily, read by slices."""

    def __init__(self, directory, world):
        self.directory, self.handles = directory, {}
        self.states = [_read_json(directory / _rank_files(r)[2], directory, r) for r in range(world)]
        if any("shards" not in state for state in self.states):
            raise CheckpointError(f"{directory}: written before checkpoints recorded each tensor's shard; it "
                                  f"resumes only in its own world and plan")
        self.sources = {}  # full tensor name -> [_Source]
        for r, state in enumerate(self.states):
            index = {name: i for i, name in enumerate(state["optimizer_params"])}
            for name, (full_name, shard) in state["shards"].items():
                self.sources.setdefault(full_name, []).append(_Source(r, name, index.get(name), *(shard or ())))

    def _file(self, rank, kind):
        key = (rank, kind)
        if key not in self.handles:
            path = self.directory / _rank_files(rank)[kind]
            try:
                self.handles[key] = safe_open(str(path), "pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: unreadable ({e})") from None
        return self.handles[key]

    def read(self, full_name, param, field=None):
        """The part of `full_name` that `param` holds (its whole tensor, or its shard), read from
        the old ranks' files (galaxy.comm.rows's file transport): a parameter (field None) or its
        AdamW `field` (None if absent)."""
        sources = [s for s in self.sources.get(full_name, ()) if field is None or self._has(s, field)]
        if not sources:
            if field:
                return None
            raise CheckpointError(f"{self.directory}: no rank of the checkpoint holds '{full_name}'")
        shard = spec_of(param).shard
        split = next((s for s in sources if s.dim is not None), None)  # how the old ranks split it, if they did
        dim, full = (shard.dim, shard.full) if shard else (split.dim, split.full) if split else (None, 0)
        dim = None if field == "step" else dim  # AdamW's step count: a scalar, the same on every rank
        lo, hi = (shard.start, shard.start + shard.length) if shard else (0, full)
        held = [(0, full) if s.dim is None else (s.start, s.start + s.length) for s in sources]
        try:
            return read_rows(lambda h: self._view(sources[h], field), held, dim, lo, hi)
        except LookupError as e:
            raise CheckpointError(f"{self.directory}: no rank of the checkpoint holds '{full_name}' at index "
                                  f"{e.args[0]} of dimension {dim}") from None

    def rng(self, rank):
        """The RNG tensors of old rank `rank`."""
        handle = self._file(rank, 1)
        return {k: handle.get_tensor(k) for k in handle.keys() if k.startswith("rng.")}

    def _tensor_name(self, source, field):
        return source.name if field is None else f"optim.{source.optim_index}.{field}"

    def _has(self, source, field):
        return source.optim_index is not None and self._tensor_name(source, field) in self._file(source.rank, 1).keys()

    def _view(self, source, field):
        return self._file(source.rank, 0 if field is None else 1).get_slice(self._tensor_name(source, field))


def _read_json(path, directory, rank):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory}: rank {rank}'s state is unreadable ({e})") from None


def _restore_resharded(trainer, directory, world):
    """Fill this rank's parameters and AdamW state from a checkpoint of `world` ranks in another
    layout; schedule and RNG come from the old rank of the same number (or rank 0)."""
    old = _OldRanks(directory, world)
    params, names = dict(trainer.model.named_parameters()), _shards(trainer.model)
    _copy_params(trainer, directory, lambda name, p: old.read(names[name][0], p))
    opt_state = {}
    for i, name in enumerate(_param_names(trainer)):
        fields = {f: old.read(names[name][0], params[name], f) for f in ("step", "exp_avg", "exp_avg_sq")}
        if all(t is not None for t in fields.values()):
            opt_state[i] = fields
    mine = old.states[trainer.ctx.rank if trainer.ctx.rank < world else 0]
    by_decay = {g["weight_decay"]: g for g in mine["param_groups"]}
    groups = [{**by_decay.get(g["weight_decay"], g), "params": g["params"]}
              for g in trainer.opt.state_dict()["param_groups"]]
    _restore_progress(trainer, opt_state, groups, old.rng(mine["rank"]), mine)
    old.handles.clear()


def load(trainer, directory):
    """Restore this rank from checkpoint `directory` (collective: all ranks agree or all raise)."""
    directory, ctx = Path(directory), trainer.ctx
    error = manifest = same = None
    with trainer.full_weights():
        try:
            manifest = _read_manifest(directory)
            _check_compatible(manifest, directory, trainer)
            same = manifest["world"] == ctx.world and manifest["plan"] == ctx.plan.describe()
            # in another layout every old rank's files are read in parts: each is hashed once, by one new rank
            mine = [ctx.rank] if same else range(ctx.rank, manifest["world"], ctx.world)
            error = next((e for e in (_verify(manifest, directory, r) for r in mine) if e), None)
        except CheckpointError as e:
            error = str(e)
        _raise_if_any(ctx, error)
        if same:
            _restore(trainer, *_read_rank(directory, ctx.rank), directory)
        else:
            try:
                _restore_resharded(trainer, directory, manifest["world"])
            except CheckpointError as e:
                error = str(e)
            _raise_if_any(ctx, error)
        return trainer.step


def resume(trainer, save_dir):
    """Load the latest complete checkpoint under save_dir; returns its step."""
    return load(trainer, latest(save_dir))
