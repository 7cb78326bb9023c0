"""The backward split for zero-bubble schedules (B: the stage input's gradient, W: the weights'),
timed on one process against one whole backward, side by side in each round:

    whole        torch.autograd.backward(outputs): what 1F1B runs
    galaxy       galaxy.pipeline.split_backward: W resumes at each weight's node with the gradient
                 B left there
    second pass  B toward the input, then a second backward over the kept graph toward the
                 weights (what Galaxy's ZB-H1 did before: W repeats the input-gradient path)
    torch        torch.distributed.pipelining's stage_backward_input / stage_backward_weight

A middle pipeline stage: BERT layers of Galaxy's BertModel, input a leaf that requires grad (as a
received activation does). Forward not timed; medians over rounds, order rotated each round.
B + W near `whole` means W repeats nothing; the gradients of every variant are compared.

    python -m benchmarks.split_backward [--layers 2] [--hidden 256] [--seq 128] [--batch 8] [--rounds 20]
"""
import argparse
import statistics
import time

import torch
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from galaxy.config.load import load_config
from galaxy.models.bert.model import BertConfig, BertModel
from galaxy.pipeline.split_backward import backward_input


def whole(out, dy, x, weights):
    torch.autograd.backward(out, dy)
    return lambda: None


def galaxy(out, dy, x, weights):
    return backward_input([out], [dy], [x])


def second_pass(out, dy, x, weights):
    torch.autograd.backward(out, dy, inputs=[x], retain_graph=True)
    return lambda: torch.autograd.backward(out, dy, inputs=weights)


def torch_split(out, dy, x, weights):
    _, groups = stage_backward_input([out], [dy], [x], iter(weights))
    return lambda: stage_backward_weight(iter(weights), groups)


VARIANTS = {"whole": whole, "galaxy": galaxy, "second pass": second_pass, "torch": torch_split}


def run(encoder, x0, dy, variant):
    """(B seconds, W seconds, gradients) of one backward split the variant's way."""
    weights = list(encoder.parameters())
    encoder.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    out = encoder(x, None)[0]
    start = time.perf_counter()
    weights_part = VARIANTS[variant](out, dy, x, weights)
    mid = time.perf_counter()
    weights_part()
    end = time.perf_counter()
    return mid - start, end - mid, [x.grad] + [w.grad for w in weights]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared; one core as one pipeline rank has
    h = args.hidden
    cfg = load_config(None, dict(hidden_size=h, intermediate_size=4 * h, num_attention_heads=h // 64,
                                 num_hidden_layers=args.layers, vocab_size=1000, seq_length=args.seq,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, data="synthetic"))
    encoder = BertModel(BertConfig.from_dict(cfg)).encoder
    g = torch.Generator().manual_seed(0)
    x0, dy = (torch.randn(args.batch, args.seq, h, generator=g) for _ in range(2))
    names = list(VARIANTS)
    times = {n: [] for n in names}
    grads = {}
    for r in range(args.rounds + 2):  # two warm-up rounds
        for name in names[r % len(names):] + names[:r % len(names)]:
            b, w, grads[name] = run(encoder, x0, dy, name)
            if r >= 2:
                times[name].append((b, w))
    print(f"BERT encoder, {args.layers} layers, hidden {h}, batch {args.batch} x seq {args.seq}, one thread, "
          f"median of {args.rounds} rounds")
    print(f"  {'backward':12s} {'B ms':>8s} {'W ms':>8s} {'B + W ms':>9s} {'vs whole':>9s} {'max grad diff':>14s}")
    base = statistics.median(b + w for b, w in times["whole"])
    for name in names:
        b, w = (statistics.median(t[i] for t in times[name]) for i in (0, 1))
        total = statistics.median(b + w for b, w in times[name])
        diff = max(((a - c).norm() / c.norm()).item() for a, c in zip(grads[name], grads["whole"], strict=True))
        print(f"  {name:12s} {b * 1e3:8.1f} {w * 1e3:8.1f} {total * 1e3:9.1f} {total / base:9.2f} {diff:14.1e}")


if __name__ == "__main__":
    main()
