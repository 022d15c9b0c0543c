"""An INT8 program that stores INT8 weights: the PT2E graph Intel Neural Compressor converts keeps each weight in
fp32 behind a quantize node; fold_and_rename folds every one into its stored INT8 tensor (torchao's convert with
fold_quantize does the same) under the layer's own name, and drops the fp32 tensors nothing reads any more. What
each dtype stores, byte for byte: docs/quantization.md."""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def quant_ops():
    qd = torch.ops.quantized_decomposed
    return {
        qd.quantize_per_tensor.default,
        qd.quantize_per_tensor.tensor,
        qd.quantize_per_tensor.tensor2,
        qd.quantize_per_channel.default,
    }


def register_tensor(gm: torch.nn.Module, fqn: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` as a buffer at ``fqn`` (removing a parameter of that name)."""
    parent_name, _, leaf = fqn.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    if leaf in parent._parameters:
        del parent._parameters[leaf]
    if leaf in parent._buffers:
        del parent._buffers[leaf]
    if hasattr(parent, leaf):
        delattr(parent, leaf)
    parent.register_buffer(leaf, tensor)
    return fqn


def delete_attr(gm: torch.nn.Module, fqn: str) -> None:
    parent_name, _, leaf = fqn.rpartition(".")
    try:
        parent = gm.get_submodule(parent_name) if parent_name else gm
    except AttributeError:
        return
    for d in (parent._parameters, parent._buffers):
        if leaf in d:
            del d[leaf]
    if leaf in parent.__dict__:
        del parent.__dict__[leaf]


def drop_unused_tensors(gm: torch.fx.GraphModule) -> int:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            delete_attr(gm, name)
            dropped += 1
    return dropped


def fold_and_rename(q: torch.fx.GraphModule) -> list[str]:
    """Constant-fold the weight quantize ops (int8 weights become real int8 tensors),
    rename them to ``<layer>.weight`` / ``.weight_scale`` / ``.weight_zero_point`` and drop the
    now-unused fp32 parameters. Returns the FQN prefixes of the layers whose weights were folded."""
    from torchao.quantization.pt2e.constant_fold import constant_fold

    qops = quant_ops()
    try:
        from torchao.quantization.pt2e.quantize_pt2e import _quant_node_constraint
    except ImportError:  # pragma: no cover - private helper moved

        def _quant_node_constraint(n):
            return n.op == "call_function" and n.target in qops

    # dequant node -> weight fqn, recorded before folding (the dequant nodes survive folding)
    dq_to_weight: dict[torch.fx.Node, str] = {}
    for n in q.graph.nodes:
        if n.op != "call_function" or n.target not in qops:
            continue
        src = n.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "get_attr"):
            continue  # activation quantize
        for user in n.users:
            dq_to_weight[user] = str(src.target)

    # Exactly the step convert_pt2e(..., fold_quantize=True) runs; INC's convert() calls
    # convert_pt2e with fold_quantize=False because pt2e_static_quant_entry drops the kwarg.
    constant_fold(q, _quant_node_constraint)

    def _get(target: str) -> torch.Tensor:
        obj = q
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _retarget(old: str, new: str) -> None:
        for node in q.graph.nodes:
            if node.op == "get_attr" and node.target == old:
                node.target = new

    layers: list[str] = []
    done: set[str] = set()  # folded int8 targets already renamed (weight shared by several calls)
    for dq, wname in dq_to_weight.items():
        if dq.graph is not q.graph or getattr(dq, "_erased", False):
            continue
        qw = dq.args[0]
        if not (isinstance(qw, torch.fx.Node) and qw.op == "get_attr"):
            continue
        folded = _get(str(qw.target))
        if folded.dtype not in (torch.int8, torch.uint8):
            continue
        owner = wname.rpartition(".")[0]
        layers.append(owner)
        if qw.target in done:
            continue
        # name the int8 tensor after the fp32 weight it replaces, unless something still reads
        # that fp32 weight (then keep a distinct name)
        fp32_still_used = any(n.op == "get_attr" and n.target == wname for n in q.graph.nodes)
        base = wname + "_int8" if fp32_still_used else wname
        old = str(qw.target)
        if not fp32_still_used:
            delete_attr(q, wname)
        register_tensor(q, base, folded)
        delete_attr(q, old)
        _retarget(old, base)
        done.add(base)
        for idx, suffix in ((1, "_scale"), (2, "_zero_point")):
            a = dq.args[idx] if len(dq.args) > idx else None
            if isinstance(a, torch.fx.Node) and a.op == "get_attr" and str(a.target) != base + suffix:
                old_a = str(a.target)
                register_tensor(q, base + suffix, _get(old_a))
                delete_attr(q, old_a)
                _retarget(old_a, base + suffix)
    dropped = drop_unused_tensors(q)
    q.graph.lint()
    q.recompile()
    logger.info("folded %d int8 weights, dropped %d unused tensors", len(done), dropped)
    return layers
