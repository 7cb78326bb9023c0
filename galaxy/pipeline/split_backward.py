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
    where B's autograd pass runs. Depth-first, each node after its children (the graph is a DAG);
    a dict in that order, the same on every rank, so W's calls (and any collectives in them) are too."""
    path, seen, stack = dict.fromkeys(targets), set(), [(r, False) for r in roots]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            if any(fn in path for fn, _ in node.next_functions):
                path[node] = None
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


def _weight_groups(path):
    """[(nodes, weights)]: the nodes on B's path with edges off it, toward weights only, and the
    weights under those edges. Nodes that share a weight (a gate g in g * a + (1 - g) * b) form one group."""
    group_of, groups = {}, {}  # id(weight) -> key of its group; key -> (nodes, {id: weight})
    for node in reversed(path):  # from the outputs toward the input, as one whole backward goes
        weights = _weights_under(fn for fn, _ in node.next_functions if fn is not None and fn not in path)
        if not weights:
            continue
        nodes, members = [node], {id(w): w for w in weights}
        for key in {group_of[i] for i in members if i in group_of}:
            old_nodes, old_members = groups.pop(key)
            nodes, members = nodes + old_nodes, {**old_members, **members}
        group_of.update((i, node) for i in members)
        groups[node] = nodes, members
    return [(nodes, list(members.values())) for nodes, members in groups.values()]


def _resume(nodes, arrived, weights):
    """From `nodes` with the gradients that arrived there in B, toward `weights` only. In a group
    of several nodes, one may lie on another's way to the input: a pre-hook pins each node's
    gradient to B's, so nothing flowing from another node is counted twice."""
    seeds = [(GradientEdge(n, i), g) for n in nodes for i, g in enumerate(arrived.get(n, ())) if g is not None]
    if not seeds:
        return
    pins = [n.register_prehook(lambda _, g=arrived.get(n): g) for n in nodes] if len(nodes) > 1 else []
    try:
        torch.autograd.backward([e for e, _ in seeds], [g for _, g in seeds], inputs=weights)
    finally:
        for pin in pins:
            pin.remove()


def backward_input(outputs, grads, inputs):
    """B: accumulate the inputs' gradients into .grad; return W, a function of no arguments that
    accumulates the weights' gradients (their post-accumulate hooks, e.g. data-parallel bucketing,
    fire as in one whole backward). Without inputs (the first stage) nobody waits: W does it all."""
    if not inputs:
        return lambda: torch.autograd.backward(outputs, grads)
    groups = _weight_groups(_input_path([o.grad_fn for o in outputs], {_node(x) for x in inputs}))
    arrived = {}
    hooks = [n.register_prehook(lambda g, n=n: arrived.__setitem__(n, g)) for nodes, _ in groups for n in nodes]
    try:
        torch.autograd.backward(outputs, grads, inputs=inputs, retain_graph=True)
    finally:
        for hook in hooks:
            hook.remove()

    def weights_part():
        for nodes, weights in groups:
            _resume(nodes, arrived, weights)
    return weights_part
