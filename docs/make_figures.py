"""Draw one SVG per layout into docs/figures/: one BERT-base layer (seq 512, batch 4, world 2),
what each rank holds between blocks, and the collective at every block boundary.

    python docs/make_figures.py

The pictures are computed from the code they illustrate: block methods from galaxy.plan.LAYOUTS,
collectives from the placement TABLE and CONJUGATES, bytes by galaxy.comm.stats' rule (a rank
contributes its own slice to an all-gather, its whole tensor otherwise; `--explain` reports the same
from a recorded step). Plain SVG text, no plotting library.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from galaxy.comm.collectives import CONJUGATES  # noqa: E402
from galaxy.comm.context import ParallelContext  # noqa: E402
from galaxy.config.load import load_config  # noqa: E402
from galaxy.layers.placement import PARTIAL, PRODUCES, REPLICATE, SEQ, TABLE, consumes  # noqa: E402
from galaxy.plan import build_plan  # noqa: E402

OUT = ROOT / "docs" / "figures"
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "vocab_size": 30522, "seq_length": 512, "batch_size": 4, "tp_num_attention_heads_list": [6, 6],
             "tp_intermediate_size_list": [1536, 1536], "seq_scatter_list": [256, 256],
             "stage_num_hidden_layers_list": None}
BLUE, ORANGE, GREY, INK = "#6fa8dc", "#f6b26b", "#eeeeee", "#222222"
MIB = 2**20
FULL_MIB = 4 * 512 * 768 * 4 / MIB  # one activation [batch 4, seq 512, hidden 768] in fp32

# ----------------------------------------------------------------------------- SVG snippets
HEADER = ('<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="Helvetica, Arial, '
          'sans-serif" font-size="12">\n<rect width="{w}" height="{h}" fill="white"/>\n')
RECT = '<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="{fill}" stroke="{stroke}" rx="{rx}"/>\n'
TEXT = '<text x="{x}" y="{y}" text-anchor="{anchor}" font-size="{size}" fill="{fill}">{text}</text>\n'
ARROW = ('<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{color}" stroke-width="1.5" '
         'marker-end="url(#head)"/>\n')
MARKER = ('<defs><marker id="head" markerWidth="8" markerHeight="8" refX="7" refY="3" orient="auto">'
          '<path d="M0,0 L7,3 L0,6 z" fill="#444"/></marker></defs>\n')


def rect(x, y, w, h, fill, stroke=INK, rx=4):
    return RECT.format(x=x, y=y, w=w, h=h, fill=fill, stroke=stroke, rx=rx)


def text(x, y, s, anchor="middle", size=12, fill=INK):
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return TEXT.format(x=x, y=y, text=s, anchor=anchor, size=size, fill=fill)


def arrow(x1, y1, x2, y2, color="#444"):
    return ARROW.format(x1=x1, y1=y1, x2=x2, y2=y2, color=color)


def svg(width, height, body):
    return HEADER.format(w=width, h=height) + MARKER + "".join(body) + "</svg>\n"


# ----------------------------------------------------------------------------- pieces
def tensor_glyph(x, y, placement, tp_rank, tp_size):
    """An activation [T, H] drawn as a tall box: full blue (replicated), this rank's band of
    positions (SEQ), or full orange marked + (a partial sum that still needs reducing)."""
    w, h = 26, 60
    if placement == REPLICATE:
        return [rect(x, y, w, h, BLUE, rx=0)]
    if placement == PARTIAL:
        return [rect(x, y, w, h, ORANGE, rx=0), text(x + w / 2, y + h / 2 + 5, "+", size=16)]
    band = h / tp_size
    return [rect(x, y, w, h, GREY, stroke="#999", rx=0), rect(x, y + band * tp_rank, w, band, BLUE, rx=0)]


def block_text(name, method, ctx):
    """What a block computes on this rank."""
    if method == "NONE":
        return "everything"
    if method == "SP":
        return f"positions {ctx.positions.start}-{ctx.positions.stop - 1}"
    owned = ctx.heads if name == "ATT" else ctx.columns
    unit = "heads" if name == "ATT" else "columns"
    return f"{unit} {owned.start}-{owned.stop - 1}"


def layer_boundaries(plan):
    """(label, placement of the tensor, method of the consuming block) in TransformerLayer's order."""
    rest = consumes(plan.con)
    return [("ATT in", rest, plan.att), ("ATT out -> CON1", PRODUCES[plan.att], plan.con),
            ("MLP in", rest, plan.mlp), ("MLP out -> CON2", PRODUCES[plan.mlp], plan.con)]


def contributed_mib(kind, tp_size):
    return FULL_MIB / tp_size if kind == "all_gather" else FULL_MIB


def boundary_label(src, method, tp_size):
    """Collectives at one boundary with the bytes this rank contributes, forward and backward."""
    lines = []
    for op in TABLE[src, method]:
        fwd, bwd = CONJUGATES[op]
        lines.append(op)
        lines.append(f"fwd {fwd or '-'}" + (f" {contributed_mib(fwd, tp_size):g} MiB" if fwd else ""))
        lines.append(f"bwd {bwd or '-'}" + (f" {contributed_mib(bwd, tp_size):g} MiB" if bwd else ""))
    return lines


def layer_figure(layout, cfg, world):
    """A steady-state layer (not the first, whose input comes replicated from the embeddings)."""
    plan = build_plan(cfg, world)
    ranks = range(plan.tp_size)
    methods = {"ATT": plan.att, "CON1": plan.con, "MLP": plan.mlp, "CON2": plan.con}
    bounds = layer_boundaries(plan)
    body, x0, y0, row = [], 20, 120, 110
    width = 80 + 5 * 70 + 4 * 120 + 40
    height = y0 + row * len(ranks) + 40
    body.append(text(20, 22, f"{layout}: one BERT-base layer, seq 512, batch 4, fp32, world {world} "
                             f"(ATT={plan.att} CON={plan.con} MLP={plan.mlp})", anchor="start", size=14))
    body.append(text(20, 40, "tall box = activation [T, H], T downwards  |  blue: values this rank holds  |  grey: positions only the other rank holds  |  orange +: a partial sum (one term per rank)",
                     anchor="start", size=11, fill="#555"))
    for r in ranks:
        ctx = ParallelContext(plan, r)
        y = y0 + r * row
        body.append(text(x0, y + 35, f"rank {r}", anchor="start", size=13))
        x = x0 + 60
        placement = consumes(plan.con)  # the layer's input
        for i, name in enumerate(methods):
            src, method = (placement, methods[name])
            needed = consumes(method)
            body += tensor_glyph(x, y, src, r, plan.tp_size)
            if TABLE[src, method]:
                body += tensor_glyph(x + 34, y, needed, r, plan.tp_size)
                body.append(arrow(x + 27, y + 30, x + 33, y + 30))
            x += 70
            body.append(arrow(x - 6, y + 30, x, y + 30))
            body.append(rect(x, y, 110, 60, "#d9ead3" if method != "NONE" else "#f3f3f3"))
            body.append(text(x + 55, y + 24, f"{name} ({method})", size=13))
            body.append(text(x + 55, y + 44, block_text(name[:3], method, ctx), size=11))
            x += 120
            placement = PRODUCES[method] if name in ("ATT", "MLP") else consumes(plan.con)
            body.append(arrow(x - 10, y + 30, x, y + 30))
        body += tensor_glyph(x + 4, y, placement, r, plan.tp_size)
    # boundary labels above the rows, one per boundary that communicates
    x = x0 + 60
    for (where, src, method), name in zip(bounds, methods):
        for k, line in enumerate(boundary_label(src, method, plan.tp_size)):
            body.append(text(x + 30, 62 + 14 * k, line, size=10, fill="#a61c00" if k % 3 else INK))
        x += 190
    if plan.att == "SP":
        body.append(text(20, height - 12, "inside ATT (SP): all_gather of K and of V over positions, "
                         f"fwd {contributed_mib('all_gather', plan.tp_size):g} MiB each, bwd reduce_scatter "
                         f"{contributed_mib('reduce_scatter', plan.tp_size):g} MiB each",
                         anchor="start", size=11))
    return svg(width, height, body)


def boxes_figure(title, rows, link, width=760):
    """DP / PP: one box per rank and one labelled link between them."""
    body = [text(20, 22, title, anchor="start", size=14)]
    for i, (label, detail) in enumerate(rows):
        y = 50 + i * 110
        body.append(rect(80, y, 400, 60, "#d9ead3"))
        body.append(text(280, y + 25, label, size=13))
        body.append(text(280, y + 45, detail, size=11))
        body.append(text(20, y + 35, f"rank {i}", anchor="start", size=13))
    body.append(arrow(200, 112, 200, 158, "#a61c00"))
    body.append(arrow(340, 158, 340, 112, "#a61c00"))
    for k, line in enumerate(link):
        body.append(text(500, 120 + 14 * k, line, anchor="start", size=11, fill="#a61c00"))
    return svg(width, 280, body)


def bert_base_params():
    from galaxy.models.bert import BertConfig, BertForMaskedLM
    return sum(p.numel() for p in BertForMaskedLM(BertConfig()).parameters())


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    figures = {}
    for layout in ("serial", "tp", "sp", "galaxy", "galaxy2"):
        cfg = load_config(None, {**BERT_BASE, "parallel": layout})
        figures[layout] = layer_figure(layout, cfg, 1 if layout == "serial" else 2)
    n = bert_base_params()
    act = FULL_MIB
    figures["dp"] = boxes_figure(
        "DP: two replicas of the whole model, batch 4 split 2 + 2 (world 2)",
        [("BERT-base, all 12 layers", "samples 0-1"), ("BERT-base, all 12 layers", "samples 2-3")],
        ["backward: all_reduce of every gradient", f"{n / 1e6:.1f} M params x 4 B = {4 * n / MIB:.0f} MiB",
         "per rank per step, in 25 MiB buckets", "overlapping the backward pass"])
    figures["pp"] = boxes_figure(
        "PP: layers split over two stages (stage_num_hidden_layers_list [6, 6])",
        [("stage 0: embeddings + layers 0-5", "all heads, columns, positions"),
         ("stage 1: layers 6-11 + MLM head", "all heads, columns, positions")],
        ["forward: send activation [4, 512, 768]", f"{act:g} MiB (in micro-batches)",
         "backward: send its gradient back,", f"{act:g} MiB"])
    for name, text_ in figures.items():
        (OUT / f"{name}.svg").write_text(text_)
        print(f"wrote {OUT / name}.svg")


if __name__ == "__main__":
    main()
