"""A stage's backward in two parts, for zero-bubble schedules: B, the gradient of the stage's input,
which the previous stage waits for, and W, the weights' gradients, which nobody waits for.

B runs autograd toward the input only, and autograd then computes, at a node that also takes a
weight (a matmul, a norm), only the gradient toward the input. A pre-hook on each such node keeps
the gradient that arrived there (dy of y = x W^T). W resumes from each node with that gradient,
toward its weights only: the node computes dW = dy^T x and nothing else. No work is done twice,
and each weight's gradient is the same product of the same tensors as in one whole backward.
"""
import torch
from torch.autograd.graph import GradientEdge


def _node(t):
    """The autograd node a tensor's gradient enters: its grad_fn, or a leaf's AccumulateGrad."""
    return t.grad_fn if t.grad_fn is not None else t.view_as(t).grad_fn.next_functions[0][0]


def _input_path(roots, targets):
    """The nodes under `roots` from which a gradient flows on to a target node (targets included):
    where B's autograd pass runs. Depth-first, each node after its children (the graph is a DAG)."""
    path, seen, stack = set(targets), set(), [(r, False) for r in roots]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            if any(fn in path for fn, _ in node.next_functions):
                path.add(node)
        elif node not in seen:
            seen.add(node)
            stack.append((node, True))
            stack += [(fn, False) for fn, _ in node.next_functions if fn is not None]
    return path


def _weights_under(nodes):
    """The leaf tensors (weights) whose AccumulateGrad lies at or under `nodes`."""
    found, stack, seen = [], list(nodes), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            found.append(node.variable)
        stack += [fn for fn, _ in node.next_functions if fn is not None]
    return found


def _weight_consumers(path):
    """(node, its weights) for each node on B's path with edges off it: toward weights only."""
    consumers, owner = [], {}
    for node in path:
        off = [fn for fn, _ in node.next_functions if fn is not None and fn not in path]
        weights = _weights_under(off)
        for w in weights:  # resumed from two nodes, a weight's other use would be run again
            if owner.setdefault(id(w), node) is not node:
                raise ValueError("a weight is used twice in one pipeline stage; the backward cannot be split")
        if weights:
            consumers.append((node, weights))
    return consumers


def backward_input(outputs, grads, inputs):
    """B: accumulate the inputs' gradients into .grad; return W's work for `backward_weight`.
    Without inputs (the first stage) nobody waits, and W runs the whole backward."""
    if not inputs:
        return [(outputs, grads, None)]
    consumers = _weight_consumers(_input_path([o.grad_fn for o in outputs], {_node(x) for x in inputs}))
    arrived = {}
    hooks = [node.register_prehook(lambda g, node=node: arrived.__setitem__(node, g)) for node, _ in consumers]
    try:
        torch.autograd.backward(outputs, grads, inputs=inputs, retain_graph=True)
    finally:
        for hook in hooks:
            hook.remove()
    work = []
    for node, weights in consumers:
        edges = [(GradientEdge(node, i), g) for i, g in enumerate(arrived.get(node, ())) if g is not None]
        if edges:
            work.append(([e for e, _ in edges], [g for _, g in edges], weights))
    return work


def backward_weight(work):
    """W: each weight node's gradient product, accumulated into the weights' .grad (their
    post-accumulate hooks, e.g. data-parallel bucketing, fire as in one whole backward)."""
    for edges, grads, weights in work:
        torch.autograd.backward(edges, grads, inputs=weights)
