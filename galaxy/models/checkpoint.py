"""Hugging Face safetensors checkpoints in and out of any layout.

Loading: every rank opens the checkpoint lazily and reads only the slices its parameters
hold (their ParamSpec's shard), so no rank materialises the full model. A directory may hold one
model.safetensors or shards listed in model.safetensors.index.json.

Saving: shards are gathered over the tensor group; the first tensor rank of the first
data-parallel replica of every pipeline stage writes that stage's tensors to its own file,
and an index names the file of every tensor (the Hugging Face sharded format).
"""
import json
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from galaxy.comm.rows import read_rows, send_rows, share_rows
from galaxy.layers.param_spec import GradSum, spec_of, span, split_dim

INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    pass


def rename(name, rules):
    """Apply (pattern, replacement) rules, first match wins; used for ours <-> HF names."""
    return next((re.sub(pattern, repl, name) for pattern, repl in rules if re.search(pattern, name)), name)


def tensor_files(path):
    """Map tensor name -> safetensors file for a file, a directory, or a sharded directory (the
    files' headers only: cheap, so a run checks its inputs with it before it writes anything)."""
    path = Path(path)
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    file = path if path.is_file() else path / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{path}: no model.safetensors, {INDEX} or .safetensors file found")
    try:
        with safe_open(str(file), "pt") as handle:
            return dict.fromkeys(handle.keys(), file)
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def check_config_agrees(config, path, from_json, keys):
    """The checkpoint directory's config.json (read by from_json(dict)) must agree with the run's
    model config on `keys`: settings no tensor shape shows (rope_theta, a norm's eps, the
    activation), so a mismatch would load cleanly and silently change every output."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return
    theirs = from_json(json.loads(file.read_text()))
    differ = [f"{k} {getattr(theirs, k)!r} there, {getattr(config, k)!r} here" for k in keys
              if getattr(theirs, k) != getattr(config, k)]
    if differ:
        raise CheckpointError(f"{path}: its config.json describes another model than this run's config: "
                              f"{'; '.join(differ)} (set these keys to the checkpoint's values)")


def load_checkpoint(model, path, to_hf, strip_prefix="", trainable_only=False, strict=True, ignore=(), verified=False,
                    optional=()):
    """Copy this rank's slices of a Hugging Face checkpoint into `model` (names mapped by to_hf).

    A full load is checked against the whole model, every pipeline stage of it, built without
    memory on the meta device: each rank finds the same problems and raises before any rank waits
    on another. A tensor the model needs that the file lacks, or one no parameter uses (other
    than names matching the `ignore` patterns: parts of Hugging Face's model that this one leaves
    out), is an error; strict=False loads what matches, leaves the rest as initialised and
    returns those problems. Missing tensors whose names match an `optional` pattern (a head that
    a checkpoint of the bare encoder lacks, as transformers allows) are left as initialised and
    named in what is returned, strict or not, when the checkpoint holds none of them. A tensor of another shape is always an error. A checkpoint with a
    different prefix (e.g. a bare BertModel "embeddings.*" loaded into BertForMaskedLM
    "bert.embeddings.*") is matched by trying the name without strip_prefix.

    trainable_only loads what save_checkpoint(trainable_only=True) wrote (a LoRA / adapter /
    side file) into the parameters that train, after the tuning method has added them. The file
    must hold exactly the whole model's trainable tensors. The tuning method's parameters exist
    only on the ranks that built them, so the ranks pool what they found (one all-gather every
    rank reaches) and all raise the same error before anything is copied.

    verified: the checks above passed before (at start-up); copy this rank's slices into the
    parameters that have memory and skip those on the meta device (nothing is read for them).
    """
    where = tensor_files(path)
    handles, tolerable, fresh = {}, {}, []
    try:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
        if not verified:
            found, missing, reshaped = _match(params if trainable_only else _whole_model(model),
                                              where, handles, to_hf, strip_prefix)
            used = {hf for hf, _, _ in found}
            if trainable_only:
                missing, reshaped, used = _pooled(missing, reshaped, used)
            # optional tensors stay as initialised only when the checkpoint has none (names quoted as in `missing`)
            fresh = [] if any(re.search(p, f"'{name}'") for name in where for p in optional) else \
                [n for n in missing if any(re.search(p, n) for p in optional)]
            missing = [n for n in missing if n not in fresh]
            unused = [repr(n) for n in sorted(set(where) - used) if not any(re.search(p, n) for p in ignore)]
            unused_as = "this model does not " + ("train" if trainable_only else "use")
            tolerable = {w: n for w, n in {"missing": missing, unused_as: unused}.items() if n}
            if reshaped or (tolerable and (strict or trainable_only)):
                hint = "saved by a run with other tuning settings?" if trainable_only else \
                    "does the config match? --strict false loads the tensors that do"
                listed = [_listed(n, w) for w, n in {**tolerable, "of another shape": reshaped}.items() if n]
                raise CheckpointError(f"{path}: {'; '.join(listed)} ({hint})")
        # this rank's own parameters (a full load checked the whole model's); none on the meta device
        _copy_slices(_match([(n, p) for n, p in params if not p.is_meta], where, handles, to_hf, strip_prefix)[0])
    finally:
        handles.clear()
    initialised = {"missing, left as initialised (the checkpoint has none of them)": fresh} if fresh else {}
    return [_listed(n, w, shown=len(n)) for w, n in {**tolerable, **initialised}.items()]


@torch.no_grad()
def _copy_slices(found):
    """Each parameter's rows of a tensor its file holds whole (galaxy.comm.rows's file transport)."""
    for _, view, param in found:
        dim = split_dim(param)
        param.copy_(read_rows(lambda _: view, [(0, full_shape(param)[dim])], dim, *span(param, dim)) if dim >= 0
                    else view[:])


def _whole_model(model):
    """(name, parameter) of the serial model, every stage and full shapes, with no memory (meta)."""
    with torch.device("meta"):
        return list(type(model)(model.config).named_parameters())


def _match(params, where, handles, to_hf, strip_prefix):
    """[(checkpoint name, slice view, parameter)] the parameters read, and the names of those the
    checkpoint lacks or holds in another shape (checked against the full, unsharded shape)."""
    found, missing, reshaped = [], [], []
    for name, param in params:
        hf = to_hf(spec_of(param).init_name or name)  # a pipeline's copy of a tied weight loads as its original
        if hf not in where and strip_prefix and hf.startswith(strip_prefix) and hf[len(strip_prefix):] in where:
            hf = hf[len(strip_prefix):]
        named = f"'{hf}'" + (f" (parameter '{name}')" if hf != name else "")
        if hf not in where:
            missing.append(named)
            continue
        f = where[hf]
        if f not in handles:  # one open per file (setdefault would open it for every parameter)
            handles[f] = safe_open(str(f), "pt")
        view = handles[f].get_slice(hf)
        shape, needed = tuple(view.get_shape()), full_shape(param)
        if shape != needed:
            reshaped.append(f"{named} is {shape} in the checkpoint, {needed} in the model")
        found.append((hf, view, param))
    return found, missing, reshaped


def _listed(names, what, shown=3):
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return f"{len(names)} tensor(s) {what}: {', '.join(names[:shown])}{more}"


def _pooled(missing, reshaped, used):
    """Every rank's missing, reshaped and used names, so each sees the whole model's."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return missing, reshaped, used
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (missing, reshaped, used))
    return (list(dict.fromkeys(m for part in parts for m in part[0])),
            list(dict.fromkeys(r for part in parts for r in part[1])), set().union(*(part[2] for part in parts)))


def full_shape(param):
    """The unsharded shape of a parameter that may hold a slice."""
    shard, shape = spec_of(param).shard, tuple(param.shape)
    return shape if shard is None else shape[:shard.dim] + (shard.full,) + shape[shard.dim + 1:]


def own_slice(full, param):
    """The part of a full (unsharded) tensor that `param` holds (all of it when not sharded)."""
    shard = spec_of(param).shard
    return full if shard is None else full.narrow(shard.dim, shard.start, shard.length)


def gather_full_state(model, ctx, to_hf, tensor_of=lambda p: p.detach(), trainable_only=False):
    """Full (unsharded) tensors of this pipeline stage, HF-named, on every tensor rank.
    `tensor_of` picks what to gather per parameter (e.g. its gradient); trainable_only keeps
    only those with requires_grad (a fine-tune's own weights). Pipeline copies of tied weights
    are left out: the first stage holds the original."""
    params = [(n, p) for n, p in model.named_parameters()
              if (p.requires_grad or not trainable_only) and spec_of(p).grad_sum is not GradSum.TIED]
    dims = [split_dim(p) for _, p in params]
    # every rank wants all the rows; the shards' rows move point to point (galaxy.comm.rows)
    layouts = share_rows(ctx, dims, [(span(p, dim), (0, full_shape(p)[dim] if dim >= 0 else 0))
                                     for (_, p), dim in zip(params, dims, strict=True)])
    out = {}
    for (name, p), rows in zip(params, layouts, strict=True):
        tensor = tensor_of(p)
        if not rows.in_place:
            shard, tensor = tensor, tensor.new_empty(full_shape(p))
            send_rows(tensor, shard, rows, ctx.tp_rank, ctx.tp_group)
        out[to_hf(name)] = tensor.contiguous().cpu()
    return out


def save_checkpoint(model, ctx, path, to_hf, extra_files=None, trainable_only=False):
    """Write the full model as HF sharded safetensors under directory `path` (collective)."""
    tensors = gather_full_state(model, ctx, to_hf, trainable_only=trainable_only)
    path = Path(path)
    file = f"model-stage{ctx.pp_rank:02d}-of-{ctx.plan.pp_size:02d}.safetensors"
    if ctx.tp_rank == 0 and ctx.dp_rank == 0:  # this stage's writer
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / file), metadata={"format": "pt"})
    names = {name: (file, t.numel() * t.element_size()) for name, t in tensors.items()}
    if ctx.plan.pp_size > 1:  # every stage's names meet on all ranks for the index
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, names)
        names = {k: v for part in gathered for k, v in part.items()}
    if ctx.rank == 0:
        index = {"metadata": {"total_size": sum(n for _, n in names.values())},
                 "weight_map": {k: f for k, (f, _) in sorted(names.items())}}
        tmp = path / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, path / INDEX)
        for name, text in (extra_files or {}).items():
            (path / name).write_text(text)
    if dist.is_initialized() and ctx.world > 1:
        dist.barrier()
