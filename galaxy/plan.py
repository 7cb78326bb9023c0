"""The layout as data: which parallel method each block of a layer uses, and how many
heads, intermediate columns, sequence positions and layers each rank owns.

A Plan is computed once from the config and the world size, before any process group
exists, so a bad split fails fast with a message naming the key. Models ask the plan
what to build; they never branch on layout names.

    method per block     ATT        CON        MLP
    serial               NONE       NONE       NONE
    tp                   TP         NONE       TP
    sp                   SP         SP         SP
    galaxy               TP         SP         TP
    galaxy2              TP         SP         SP
    dp / pp              NONE       NONE       NONE   (+ data / pipeline groups)
"""
from dataclasses import dataclass
from enum import Enum

from galaxy.keys import at_least, key, one_of
from galaxy.errors import ConfigError


class Method(Enum):
    """How a block is split over the tensor group (config values "TP", "sp", "None", ... parse to it)."""
    NONE = "NONE"  # every rank computes the whole block
    TP = "TP"  # attention heads / MLP intermediate columns split
    SP = "SP"  # sequence positions split

    def __str__(self):
        return self.value


NONE, TP, SP = Method
LAYOUTS = {"serial": (NONE, NONE, NONE), "tp": (TP, NONE, TP), "sp": (SP, SP, SP), "galaxy": (TP, SP, TP),
           "galaxy2": (TP, SP, SP), "dp": (NONE, NONE, NONE), "pp": (NONE, NONE, NONE)}
BLOCK_METHODS = {"att_parallel_method": (TP, SP, NONE), "con_parallel_method": (SP, NONE),
                 "mlp_parallel_method": (TP, SP, NONE)}


@dataclass(frozen=True)
class LayoutConfig:
    """The layout keys of a config: build_plan turns them and the world size into a Plan."""
    parallel: str = key(None, "serial | tp | sp | dp | galaxy | galaxy2 | pp: the block methods of the table above")
    att_parallel_method: str = key(None, "TP | SP | NONE: overrides parallel's method for attention")
    con_parallel_method: str = key(None, "SP | NONE: overrides parallel's method for the connective blocks")
    mlp_parallel_method: str = key(None, "TP | SP | NONE: overrides parallel's method for the MLP")
    tp_num_attention_heads_list: list[int] = key(None, "attention heads per tensor rank (default: as even as can be)")
    tp_intermediate_size_list: list[int] = key(None, "MLP columns per tensor rank (default: as even as can be)")
    seq_scatter_list: list[int] = key(None, "sequence positions per tensor rank (default: as even as can be)")
    stage_num_hidden_layers_list: list[int] = key(None, "layers per pipeline stage; more than one entry turns "
                                                        "pipelining on")
    data_parallel_size: int = key(None, "model replicas (default: the world over the stages when no block is split)")
    num_microbatches: int = key(1, "micro-batches per pipeline step")
    pipeline_schedule: str = key("1f1b", "gpipe | 1f1b | zb-h1 | interleaved-1f1b")
    virtual_stages: int = key(1, "chunks of layers per pipeline rank (interleaved-1f1b)")
    overlap_tiles: int | list[int] = key(1, "tiles for comm/compute overlap (1 = off), or their relative sizes "
                                            "in the all-gathers' order, e.g. [1, 3] (galaxy.comm.overlap)")
    replan: dict = key(None, "re-plan the head/column/position split while running when a rank's speed drifts: "
                             "{\"threshold\": 0.25, \"patience\": 3, \"warmup\": 1} (any of them; {} = these); "
                             "galaxy.planner.replan")

    def __post_init__(self):
        at_least(self, ("num_microbatches", "virtual_stages"), 1)
        tiles = self.overlap_tiles
        if min(tiles if isinstance(tiles, list) else [tiles], default=0) < 1:  # a count, or tile sizes
            raise ConfigError(f"config key 'overlap_tiles' must be >= 1 or a list of tile sizes >= 1, got {tiles}")
        one_of(self, "pipeline_schedule", ("gpipe", "1f1b", "zb-h1", "interleaved-1f1b"))
        if self.virtual_stages > 1 and self.pipeline_schedule != "interleaved-1f1b":
            raise ConfigError(f"virtual_stages {self.virtual_stages} needs pipeline_schedule 'interleaved-1f1b', "
                              f"not {self.pipeline_schedule!r}")


@dataclass(frozen=True)
class Plan:
    att: Method = NONE
    con: Method = NONE
    mlp: Method = NONE
    tp_size: int = 1          # ranks sharing one layer's tensors (TP/SP/Galaxy group)
    dp_size: int = 1          # model replicas
    pp_size: int = 1          # pipeline ranks (each holds virtual_stages chunks: stage c * pp_size + rank)
    heads: tuple = ()         # attention heads per tensor rank
    kv_heads: tuple = ()      # key/value heads per tensor rank (GQA); equals heads for MHA
    columns: tuple = ()       # MLP intermediate columns per tensor rank
    positions: tuple = ()     # sequence positions per tensor rank
    stage_layers: tuple = ()  # transformer layers per (model) pipeline stage: pp_size x virtual_stages
    virtual_stages: int = 1   # chunks of layers per pipeline rank (interleaved 1F1B)

    @property
    def seq_sharded(self):
        """Some block splits sequence positions (every batch then has the full sequence length)."""
        return SP in (self.att, self.con, self.mlp)

    world = property(lambda self: self.tp_size * self.dp_size * self.pp_size)

    def describe(self):
        return (f"ATT={self.att} CON={self.con} MLP={self.mlp} tp={self.tp_size} dp={self.dp_size} "
                f"pp={self.pp_size} heads={list(self.heads)} columns={list(self.columns)} "
                f"positions={list(self.positions)} stage_layers={list(self.stage_layers)}")


def even_split(total, parts, unit=1):
    """`total` in `parts` shares of whole `unit`s, as even as they come: where they do not divide, the
    first ranks take one unit more (4 heads over 3 ranks: [2, 1, 1])."""
    units, extra = divmod(total // unit, parts)
    return [(units + (r < extra)) * unit for r in range(parts)]


def _split(cfg, key, total, parts, what, unit=1):
    """cfg's per-rank sizes of `key`, checked; without them the most even split (default_splits names
    an uneven one)."""
    sizes = cfg.get(key)
    if sizes is None:
        sizes = even_split(total, parts, unit)
        if not sizes[-1]:
            raise ConfigError(f"{key} is not given and {total} {what}s cannot give each of {parts} ranks "
                              + (f"a group of {unit}" if unit > 1 else "one"))
        return tuple(sizes)
    if len(sizes) != parts:
        raise ConfigError(f"{key} {sizes} has {len(sizes)} entries, but {parts} ranks share each layer "
                          f"(world size / pipeline stages / data-parallel replicas)")
    if any(s < 1 for s in sizes):
        raise ConfigError(f"{key} {sizes}: every rank must own at least one {what}")
    if sum(sizes) != total:
        raise ConfigError(f"{key} {sizes} sums to {sum(sizes)}, model has {total} {what}s")
    return tuple(sizes)


def _methods(cfg):
    layout = (cfg.get("parallel") or "serial").lower()
    if layout not in LAYOUTS:
        raise ConfigError(f"parallel '{cfg.get('parallel')}' is not one of {sorted(LAYOUTS)}")
    methods = dict(zip(BLOCK_METHODS, LAYOUTS[layout], strict=True))
    for key, allowed in BLOCK_METHODS.items():
        if cfg.get(key) is not None:
            value = next((m for m in allowed if m.value == str(cfg[key]).upper()), None)
            if value is None:
                raise ConfigError(f"{key} '{cfg[key]}' is not one of {[m.value for m in allowed]}")
            methods[key] = value
    return methods


def build_plan(cfg, world):
    """Validate the config's layout keys against the world size and return the Plan."""
    if world < 1:
        raise ConfigError(f"world size {world} must be at least 1")
    m = _methods(cfg)
    layers = cfg["num_hidden_layers"]
    if world == 1:  # any layout run on one rank is the serial reference
        return Plan(heads=(cfg["num_attention_heads"],), kv_heads=(_kv_heads(cfg),),
                    columns=(cfg["intermediate_size"],), positions=(cfg["seq_length"],), stage_layers=(layers,))
    stages = cfg.get("stage_num_hidden_layers_list")  # a list of more than one entry turns pipelining on
    chunks = cfg.get("virtual_stages", 1)
    pp = len(stages) // chunks if stages else 1
    if stages and (len(stages) % chunks or pp < 2):
        raise ConfigError(f"stage_num_hidden_layers_list {stages} must list virtual_stages {chunks} x the "
                          f"pipeline ranks (at least 2) model stages")
    if world % pp:
        raise ConfigError(f"stage_num_hidden_layers_list {stages} has {pp} stages, world size {world} is not a multiple")
    stage_layers = _split(cfg, "stage_num_hidden_layers_list", layers, pp * chunks, "layer")
    microbatches = cfg.get("gradient_accumulation_steps", 1) * cfg.get("num_microbatches", 1)
    if chunks > 1 and microbatches % pp:
        raise ConfigError(f"virtual_stages {chunks}: micro-batches per step (gradient_accumulation_steps x "
                          f"num_microbatches = {microbatches}) must be a multiple of the {pp} pipeline ranks")
    sharded = any(v is not NONE for v in m.values())
    dp = cfg.get("data_parallel_size") or (1 if sharded else world // pp)
    if world % (pp * dp):
        raise ConfigError(f"data_parallel_size {dp} x {pp} pipeline stages does not divide world size {world}")
    tp = world // (pp * dp)
    per_replica = dp * (cfg.get("num_microbatches", 1) if pp > 1 else 1)
    if cfg.get("batch_size", per_replica) % per_replica:
        raise ConfigError(f"batch_size {cfg['batch_size']} does not split evenly over {dp} data-parallel replicas"
                          + (f" x num_microbatches {cfg['num_microbatches']}" if pp > 1 else ""))
    if tp > 1 and not sharded:
        raise ConfigError(f"world {world} = {pp} stages x {dp} replicas x {tp}, but no block is parallel: "
                          f"set parallel or att/con/mlp_parallel_method, or data_parallel_size")
    heads, columns, positions = _tensor_splits(cfg, m, tp)
    kv = _kv_split(cfg, heads) if m["att_parallel_method"] is TP else (_kv_heads(cfg),) * tp
    return Plan(att=m["att_parallel_method"], con=m["con_parallel_method"], mlp=m["mlp_parallel_method"],
                tp_size=tp, dp_size=dp, pp_size=pp, heads=heads, kv_heads=kv, columns=columns,
                positions=positions, stage_layers=stage_layers, virtual_stages=chunks)


SPLIT_LISTS = {"tp_num_attention_heads_list": ("heads", "attention heads"),
               "tp_intermediate_size_list": ("columns", "MLP columns"), "seq_scatter_list": ("positions", "positions")}


def default_splits(cfg, plan):
    """One line for each split the config does not list and build_plan made uneven, for start-up."""
    return [f"{sum(sizes)} {what} do not divide over {len(sizes)} ranks: {key} {list(sizes)}, the most even split "
            f"(list the sizes to choose another)" for key, (field, what) in SPLIT_LISTS.items()
            if cfg.get(key) is None and len(set(sizes := getattr(plan, field))) > 1]


def _tensor_splits(cfg, methods, tp):
    """Heads, columns and positions per tensor rank; every list that is wrong or missing is named
    in one ConfigError (not one per run)."""
    wanted = (("tp_num_attention_heads_list", "num_attention_heads", "attention head",
               methods["att_parallel_method"] is TP, gqa_group(cfg)),  # heads move in whole GQA groups
              ("tp_intermediate_size_list", "intermediate_size", "intermediate column",
               methods["mlp_parallel_method"] is TP, 1),
              ("seq_scatter_list", "seq_length", "sequence position", SP in methods.values(), 1))
    splits, errors = [], []
    for key, total, what, split, unit in wanted:
        try:
            splits.append(_split(cfg, key, cfg[total], tp, what, unit) if split else (cfg[total],) * tp)
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError("; ".join(errors))
    return splits


def _kv_heads(cfg):
    return cfg.get("num_key_value_heads") or cfg["num_attention_heads"]


def gqa_group(cfg):
    """Query heads per key/value head (1 without grouped-query attention): heads move between
    tensor ranks in whole groups."""
    return cfg["num_attention_heads"] // _kv_heads(cfg)


def check_kv_heads(heads, kv):
    """Grouped-query attention shares each key/value head among heads / kv query heads, in every
    layout (a wrong count would fail inside attention, or 0 silently mean one KV head per head)."""
    if kv is not None and (kv < 1 or heads % kv):
        raise ConfigError(f"config key 'num_key_value_heads' is {kv}; it must be >= 1 and divide "
                          f"num_attention_heads {heads} (each KV head serves a whole group of query heads)")


def _kv_split(cfg, heads):
    """Under TP each rank keeps whole GQA groups: its query heads map onto its own KV heads."""
    total, kv, group = cfg["num_attention_heads"], _kv_heads(cfg), gqa_group(cfg)
    if any(h % group for h in heads):
        raise ConfigError(f"tp_num_attention_heads_list {list(heads)} splits GQA groups of {group} query heads "
                          f"(num_attention_heads {total} / num_key_value_heads {kv}); each entry must be a multiple of {group}")
    return tuple(h // group for h in heads)
