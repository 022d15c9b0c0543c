"""Trace a model once into operator rows, in execution order, with their tensors.

Module forward hooks catch the module types the cost registry knows (their inner calls are not
recorded again); a TorchFunctionMode catches every other torch function, Tensor method or aten op
that produces a tensor. A tensor-producing call the registry does not know becomes an
`unsupported` row: listed, never silently costed as zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from . import registry as R
from .modelspec import as_inputs

# calls that read metadata or bookkeeping and move no data, even when they return a tensor
IGNORED_CALLS = {"__get__", "__set__", "size", "dim", "numel", "__len__", "item", "tolist", "__bool__", "__format__",
            "__repr__", "is_floating_point", "requires_grad_", "__setitem__", "_assert", "__index__", "__int__",
            "__float__", "stride", "data_ptr",
            "untyped_storage", "storage_offset", "is_contiguous", "get_device", "type", "__hash__", "equal",
            "__contains__", "__iter__", "__reversed__", "element_size", "__deepcopy__", "_is_view", "ndimension",
            "nelement", "has_names", "__dlpack__", "numpy", "cpu", "requires_grad", "backward", "register_hook"}


@dataclass
class TensorInfo:
    tid: int
    shape: tuple[int, ...]
    elem_bytes: int
    storage: int  # storage key: tensors sharing one are views or in-place versions of each other
    producer: int  # row index; -1 for a model input, -2 for a constant made outside any row
    storage_bytes: int = 0
    axis: int | None = None  # channel dim where known (R.TMeta.chan_axis); None: the shape's convention

    @property
    def meta(self) -> R.TMeta:
        return R.TMeta(self.shape, self.axis)


@dataclass
class RawRow:
    name: str
    op: str  # module type name or function name
    is_module: bool
    module_name: str
    cost: R.Cost | None  # None: unsupported
    rule: str  # channel rule for functions; "module" for module rows
    inputs: list[int]
    outputs: list[int]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    owned: list[str] = field(default_factory=list)  # names of parameters/buffers this row stores
    stored: list = field(default_factory=list)  # an unsupported row's parameters/buffers (still counted as stored)


@dataclass
class Trace:
    rows: list[RawRow]
    tensors: list[TensorInfo]
    input_tids: list[int]
    output_tids: list[int]
    unowned: list[tuple[str, torch.Tensor]]  # parameters/buffers no row used (still stored)
    batch: int


class _Tracer(TorchFunctionMode):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.rows: list[RawRow] = []
        self.tensors: list[TensorInfo] = []
        self.by_obj: dict[int, int] = {}  # id(tensor object) -> latest TensorInfo
        self.keep: list[torch.Tensor] = []  # keep every tensor alive so ids and storages stay unique
        self.suppress = 0
        self.pending: list[tuple[nn.Module, list[int] | None]] = []
        self.name_stack: list[str] = [""]
        self.mod_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.param_names: dict[int, str] = {}
        self.param_storages: dict[int, str] = {}
        for n, p in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
            self.param_names.setdefault(id(p), n)
            if p.numel():
                self.param_storages.setdefault(p.untyped_storage().data_ptr(), n)
        self.owned: set[str] = set()
        self.name_count: dict[str, int] = {}

    # -- tensors
    def _is_param(self, t: torch.Tensor) -> str | None:
        if id(t) in self.param_names:
            return self.param_names[id(t)]
        if t.numel() and t.untyped_storage().data_ptr() in self.param_storages and id(t) not in self.by_obj:
            return self.param_storages[t.untyped_storage().data_ptr()]
        return None

    def new_info(self, t: torch.Tensor, producer: int) -> int:
        self.keep.append(t)
        st = t.untyped_storage()
        info = TensorInfo(len(self.tensors), tuple(t.shape), t.element_size(), st.data_ptr() if t.numel() else -len(self.tensors) - 10,
                          producer, st.nbytes())
        self.tensors.append(info)
        self.by_obj[id(t)] = info.tid
        return info.tid

    def resolve(self, t: torch.Tensor) -> int:
        tid = self.by_obj.get(id(t))
        if tid is None:
            tid = self.new_info(t, -2)
        return tid

    def split_args(self, args, kwargs) -> tuple[list[int], list[torch.Tensor]]:
        flat, _ = tree_flatten((args, kwargs))
        acts, params = [], []
        for a in flat:
            if isinstance(a, torch.Tensor):
                if self._is_param(a) is not None:
                    params.append(a)
                else:
                    acts.append(self.resolve(a))
        return acts, params

    def row_metas(self, in_ids: list[int], out_ids: list[int], layout: str) -> tuple[list[R.TMeta], list[R.TMeta]]:
        """What a row's cost function sees of its inputs and outputs, with the channel dim of each output set
        by the row's `layout`: "linear" (a linear map puts its features on the last dim, whatever the rank),
        "keep" (elementwise or last-dim ops: operands shaped like the output are aligned with it, so all share
        the channel dim known for any of them), "cat" (the same over the inputs of the output's rank) or ""
        (the shape's convention)."""
        ins = [self.tensors[i] for i in in_ids]
        metas = [t.meta for t in ins]
        for o in out_ids:
            out = self.tensors[o]
            if layout == "linear":
                out.axis = -1 if len(out.shape) >= 2 else None
            elif layout in ("keep", "cat"):
                aligned = [j for j, t in enumerate(ins)
                           if (t.shape == out.shape if layout == "keep" else len(t.shape) == len(out.shape))]
                out.axis = next((ins[j].axis for j in aligned if ins[j].axis is not None), None)
                for j in aligned:
                    metas[j] = R.TMeta(ins[j].shape, out.axis)
        return metas, [self.tensors[o].meta for o in out_ids]

    def _row_name(self, base: str) -> str:
        k = self.name_count.get(base, 0) + 1
        self.name_count[base] = k
        return base if k == 1 else f"{base}#{k}"

    # -- modules
    def pre_hook(self, module: nn.Module, args):
        name = self.mod_names.get(id(module), "?")
        self.name_stack.append(name)
        if R.module_cost_fn(module) is not None:
            if self.suppress == 0:
                acts, _ = self.split_args(args, {})
                self.pending.append((module, acts))
            else:
                self.pending.append((module, None))
            self.suppress += 1

    def hook(self, module: nn.Module, args, output):
        self.name_stack.pop()
        if R.module_cost_fn(module) is None:
            return
        mod, acts = self.pending.pop()
        self.suppress -= 1
        if acts is None:
            return
        name = self.mod_names.get(id(module), "?")
        outs = [o for o in tree_flatten(output)[0] if isinstance(o, torch.Tensor)]
        row_idx = len(self.rows)
        out_ids = [self.new_info(o, row_idx) for o in outs]
        layout = "linear" if isinstance(module, R.LINEAR_MODULES) else \
            "keep" if isinstance(module, R.LAYOUT_KEEPING_MODULES) else ""
        ctx = R.Ctx(*self.row_metas(acts, out_ids, layout), module=module)
        cost = R.module_cost_fn(module)(ctx)
        owned = []
        for n, p in list(module.named_parameters(prefix=name)) + list(module.named_buffers(prefix=name)):
            pname = self.param_names.get(id(p), n)
            if pname not in self.owned:
                self.owned.add(pname)
                owned.append(pname)
        self.rows.append(RawRow(self._row_name(name or type(module).__name__), type(module).__name__, True, name, cost,
                                "module", acts, out_ids, owned=owned))

    # -- functions
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.suppress:
            return func(*args, **kwargs)
        fname = R.function_name(func)
        if fname in IGNORED_CALLS:
            return func(*args, **kwargs)
        acts, params = self.split_args(args, kwargs)
        out = func(*args, **kwargs)
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not outs:
            return out
        row_idx = len(self.rows)
        out_ids = [self.new_info(o, row_idx) for o in outs]
        entry = R.FUNCTION_COSTS.get(fname)
        owned = []
        fresh_params = []
        for p in params:
            pname = self._is_param(p)
            if pname not in self.owned:
                self.owned.add(pname)
                owned.append(pname)
                fresh_params.append(p)
        if entry is None:
            cost, rule = None, "fixed"
        else:
            fn, rule = entry
            layout = "linear" if fname in R.LINEAR_FUNCTIONS else {"same": "keep", "cat": "cat"}.get(rule, "")
            ctx = R.Ctx(*self.row_metas(acts, out_ids, layout), params=fresh_params, args=args, kwargs=kwargs)
            cost = fn(ctx)
        scope = self.name_stack[-1]
        base = f"{scope}:{fname}" if scope else fname
        self.rows.append(RawRow(self._row_name(base), fname, False, scope, cost, rule, acts, out_ids,
                                args=_light(args), kwargs=_light(kwargs), owned=owned,
                                stored=fresh_params if cost is None else []))
        return out


def _light(obj):
    """Keep the non-tensor arguments a channel rule needs (e.g. cat's dim), drop tensors."""
    if isinstance(obj, torch.Tensor):
        return None
    if isinstance(obj, (list, tuple)):
        return type(obj)(_light(o) for o in obj) if not hasattr(obj, "_fields") else None
    if isinstance(obj, dict):
        return {k: _light(v) for k, v in obj.items()}
    if isinstance(obj, (int, float, str, bool, type(None), torch.Size)):
        return obj
    return None


def trace_model(model: nn.Module, example) -> Trace:
    """Trace `model` on `example`: a tensor, or a tuple of tensors fed positionally (a model of several inputs).
    The batch is the first input's first dimension."""
    tracer = _Tracer(model)
    h1 = torch.nn.modules.module.register_module_forward_pre_hook(tracer.pre_hook)
    h2 = torch.nn.modules.module.register_module_forward_hook(tracer.hook)
    try:
        xs = [x.clone() for x in as_inputs(example)]
        in_ids = [tracer.new_info(x, -1) for x in xs]
        with torch.no_grad(), tracer:
            out = model(*xs)
    finally:
        h1.remove()
        h2.remove()
    outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
    out_ids = [tracer.by_obj[id(o)] for o in outs if id(o) in tracer.by_obj]
    unowned = []
    seen = set()
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        if n not in tracer.owned and id(p) not in seen:
            seen.add(id(p))
            unowned.append((n, p))
    tr = Trace(tracer.rows, tracer.tensors, in_ids, out_ids, unowned, xs[0].shape[0])
    tracer.keep.clear()
    return tr


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
