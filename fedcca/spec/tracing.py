"""Derive a model's alignment spec from its ``torch.fx`` graph.

:func:`derive_spec` traces the model symbolically (``torch.fx``; modules of ``torch.nn`` are
leaves, the user's own modules are traced through), runs the graph once on an example batch to
learn every tensor's shape, and walks the nodes in forward order. Every tensor gets a *feature
group*: a union-find class standing for the feature on its dim 1.

* A conv/linear layer (a *producer*) reads its input's group — weight axis 1, role ``"in"``,
  with ``block = H * W`` when the input is conv features ``[C, H, W]`` flattened — and starts a
  new group (weight and bias axis 0, role ``"out"``).
* A BatchNorm right after a producer joins the producer's group; ReLU in every spelling,
  pooling, dropout, identity, spatial means and reshapes that keep the channels hand the group
  on unchanged.
* A residual sum (``+``, ``torch.add``, ``+=``) unites the groups of its operands, so
  everything writing into one chain of sums becomes one point, as ResNet20's streams.
* Groups that reach the model's input or output are never aligned: their axes go to
  ``fixed`` (the first layer's input channels, the classifier's outputs).

Any other operation on features between a producer and a consumer (concatenation, a grouped
conv, LayerNorm, attention, GELU, a slice, ...) is refused with an
:class:`~fedcca.spec.alignment.UnsupportedModelError` naming the graph node, its op and its module:
a general transform cannot be pushed through it, and treating it as an identity would merge
silently wrong. Operations on the raw input before the first layer, or on the logits after the
last one (e.g. ``log_softmax``), are allowed: those features are fixed anyway.

Taps (where statistics are collected): a point is tapped at the ReLU outputs of its feature —
for a point with residual sums, at the ReLUs applied to the sums (at the sums without one); for
a point without ReLU, at its producers' (or their BatchNorms') outputs. A tap names the
outermost module, called once per forward and not a ``Sequential`` container, whose output is
that tensor (a block whose forward ends in the ReLU, or an ``nn.ReLU`` module). A functional
ReLU (``F.relu``, ``torch.relu``, ``x.relu()``, in-place variants) or a ReLU module called more
than once has no such module; its tap is then ``"<module>+relu"`` (see
:func:`fedcca.spec.alignment.resolve_tap`): the module producing the ReLU's input is hooked and ReLU
is applied to its output.

The example input (a batch of real inputs) fixes the flatten block sizes; there is no
derivation without one.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fedcca.spec.alignment import (
    CONVS,
    INPUT_TAP_SUFFIX,
    KNOWN_LAYERS,
    NORMS,
    PRODUCERS,
    RELU_TAP_SUFFIX,
    AlignmentPoint,
    AlignmentSpec,
    LeftOut,
    ParamAxis,
    Role,
    UnsupportedModelError,
    own_tensors,
)

WHAT_TO_DO = "write an alignment_spec() method returning a fedcca.spec.alignment.AlignmentSpec, or use method='direct'"
"""What a user can do when a model's spec cannot be derived (ends every refusal)."""

_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

_RELU_FUNCTIONS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_})
_POOL_FUNCTIONS = frozenset({F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                             F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d})
_PASS_FUNCTIONS = frozenset({F.dropout, F.dropout1d, F.dropout2d})
_RESHAPE_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.squeeze})
_ADD_FUNCTIONS = frozenset({operator.add, operator.iadd, torch.add})
_RELU_METHODS = frozenset({"relu", "relu_"})
_PASS_METHODS = frozenset({"contiguous"})
_RESHAPE_METHODS = frozenset({"view", "reshape", "flatten", "squeeze"})
_ADD_METHODS = frozenset({"add", "add_"})

def derive_spec(model: nn.Module, example_input: torch.Tensor | None = None, *, strict: bool = False) -> AlignmentSpec:
    """Describe ``model`` as an :class:`~fedcca.spec.alignment.AlignmentSpec` by tracing it with ``torch.fx``.

    The spec is of the kind a hand-written ``alignment_spec()`` returns (see the module
    docstring for the rules); it is not validated here (:func:`spec_for` does).
    The model is not modified (its train/eval modes are restored after the shape pass).

    Args:
        model: The model to describe.
        example_input: A batch of inputs ``[N, ...]`` (two samples are used) that fixes the
            tensor shapes, notably the block size of a flatten into a linear layer.
        strict: Refuse the model at the first operation a transform cannot be pushed through.
            Otherwise (partial alignment) the feature groups on both sides of such an
            operation, and layers fedcca cannot transform (LayerNorm, GroupNorm, grouped convs,
            ...), are left unaligned — their parameters are averaged as FedAvg does — and
            listed in the spec's ``left``, each with the graph node and the reason.

    Raises:
        UnsupportedModelError: naming the graph node, op and module the spec cannot describe
            (``strict``), or when tracing or running the example fails, or when there is no
            example input.
    """
    example = _example(model, example_input)
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: no derivation
        raise UnsupportedModelError(
            f"model type {type(model).__name__} has no alignment spec and torch.fx cannot trace its forward "
            f"({type(err).__name__}: {_first_line(err)}); data-dependent control flow and calls fx cannot "
            f"record prevent deriving one. To merge it, {WHAT_TO_DO}") from err
    module = fx.GraphModule(model, graph, type(model).__name__)
    shapes = _run_shapes(model, module, example)
    spec = _Walk(model, graph, tracer.returns, shapes, strict).spec()
    return spec


# ----------------------------------------------------------------------------- tracing and shapes


class _Tracer(fx.Tracer):
    """``torch.fx`` tracer that also records which node every submodule call returns."""

    def __init__(self) -> None:
        super().__init__()
        self.returns: dict[str, list[fx.Node | None]] = {}

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        """Trace the call as usual; remember the node it returned (None for a non-tensor result)."""
        result = super().call_module(m, forward, args, kwargs)
        path = self.path_of_module(m)
        self.returns.setdefault(path, []).append(result.node if isinstance(result, fx.Proxy) else None)
        return result


@dataclass(frozen=True)
class _Shape:
    """What running a node produced: a tensor's shape, or whether a non-tensor result holds tensors."""

    shape: tuple[int, ...] | None
    holds_tensors: bool


class _ShapeRun(fx.Interpreter):
    """Runs the graph once, recording every node's output shape."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.shapes: dict[fx.Node, _Shape] = {}
        self.failed: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        """Run ``n`` and record its output's shape."""
        try:
            result = super().run_node(n)
        except Exception:
            self.failed = n
            raise
        if isinstance(result, torch.Tensor):
            self.shapes[n] = _Shape(tuple(result.shape), True)
        else:
            self.shapes[n] = _Shape(None, _holds_tensors(result))
        return result


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensors(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensors(v) for v in value.values())
    return False


def _run_shapes(model: nn.Module, module: fx.GraphModule, example: torch.Tensor) -> dict[fx.Node, _Shape]:
    """Every node's output shape on ``example``, in eval mode (modes restored)."""
    modes = [(m, m.training) for m in model.modules()]
    runner = _ShapeRun(module)
    try:
        model.eval()
        with torch.no_grad():
            runner.run(example)
    except Exception as err:  # noqa: BLE001 - the example does not fit the model
        node = f" at graph node {runner.failed.name!r}" if runner.failed is not None else ""
        raise UnsupportedModelError(
            f"model type {type(model).__name__}: the example input of shape {tuple(example.shape)} does not run "
            f"through its traced graph{node} ({type(err).__name__}: {_first_line(err)}); pass a batch of the "
            "model's real inputs as example_input") from err
    finally:
        for m, mode in modes:
            m.training = mode
    return runner.shapes


def _example(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    """Two input samples of ``example_input`` on the model's device."""
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    if example_input is None:
        raise UnsupportedModelError(
            f"model type {type(model).__name__} has no alignment spec and no example input was given to derive "
            f"one from its torch.fx graph: pass example_input= (a batch of inputs), or {WHAT_TO_DO}")
    x = torch.as_tensor(example_input)
    if x.dim() < 2 or len(x) == 0:
        raise UnsupportedModelError(f"example_input must be a batch [N, ...] with N > 0, got shape {tuple(x.shape)}")
    # Two samples: a batch dimension of 1 could not be told apart from the others in reshapes.
    return x[:2].expand(2, *x.shape[1:]).to(device) if len(x) == 1 else x[:2].to(device)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# ----------------------------------------------------------------------------- the walk over the graph


@dataclass(frozen=True)
class _Value:
    """A tensor whose dim 1 carries the features of union-find element ``group``, ``block`` entries each."""

    group: int
    block: int = 1


@dataclass
class _Group:
    """What one union-find element collected; elements of one class are merged at the end."""

    fixed: bool = False
    producers: list[fx.Node] = field(default_factory=list)
    batchnorms: list[fx.Node] = field(default_factory=list)
    relus: list[fx.Node] = field(default_factory=list)
    sums: list[fx.Node] = field(default_factory=list)
    norms: list[tuple[str, str]] = field(default_factory=list)
    norm_groups: list[int] = field(default_factory=list)  # GroupNorm / LayerNorm group counts on these features

    def absorb(self, other: _Group) -> None:
        """Add ``other``'s records to this one's."""
        self.fixed = self.fixed or other.fixed
        self.norm_groups.extend(other.norm_groups)
        for name in ("producers", "batchnorms", "relus", "sums", "norms"):
            getattr(self, name).extend(getattr(other, name))


@dataclass(frozen=True)
class _Opaque:
    """An operation the walk cannot see through: its feature inputs, its (fixed) result and why."""

    node: fx.Node
    inputs: tuple[int, ...]
    result: int
    reason: str | None = None


@dataclass(frozen=True)
class _Claim:
    """A parameter axis and the group that indexes it."""

    group: int
    role: Role
    block: int


class _Walk:
    """One forward-order pass over a traced graph, then the spec built from the groups."""

    def __init__(self, model: nn.Module, graph: fx.Graph, returns: dict[str, list[fx.Node | None]],
                 shapes: dict[fx.Node, _Shape], strict: bool) -> None:
        self.model_type = type(model).__name__
        self.strict = strict
        self.returns = returns
        self.layer_axes: list[tuple[str, int]] = []  # axes of layers left out whole (partial alignment)
        self.left: dict[int, LeftOut] = {}  # group element -> why it is left unaligned
        self.modules = dict(model.named_modules())
        self.state_keys = set(model.state_dict())
        self.shapes = shapes
        self.order = {node: index for index, node in enumerate(graph.nodes)}
        # node -> modules called exactly once per forward that return it (candidate tap names)
        self.returned_by: dict[fx.Node, list[str]] = {}
        for path, nodes in returns.items():
            if len(nodes) == 1 and nodes[0] is not None:
                self.returned_by.setdefault(nodes[0], []).append(path)
        self.called = set(returns)
        self.parent: list[int] = []
        self.groups: list[_Group] = []
        self.claims: dict[tuple[str, int], _Claim] = {}
        self.values: dict[fx.Node, _Value | None] = {}
        self.opaque: list[_Opaque] = []
        self.loose_norms: list[tuple[fx.Node, int]] = []  # BatchNorms not right after a producer
        self.seen_input = False
        for node in graph.nodes:
            self.values[node] = self._visit(node)

    # -- union-find

    def _new(self, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.groups.append(_Group(fixed=fixed))
        return len(self.parent) - 1

    def _find(self, element: int) -> int:
        while self.parent[element] != element:
            self.parent[element] = self.parent[self.parent[element]]
            element = self.parent[element]
        return element

    def _union(self, a: int, b: int) -> int:
        a, b = self._find(a), self._find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)  # the older element stays the root
        return min(a, b)

    def _claim(self, node: fx.Node, key: str, axis: int, role: Role, block: int, group: int) -> None:
        """``group`` indexes axis ``axis`` of ``key``; a shared layer unites the groups of its calls."""
        old = self.claims.get((key, axis))
        if old is None:
            self.claims[(key, axis)] = _Claim(group, role, block)
        elif (old.role, old.block) != (role, block):
            raise self._refuse(node, f"axis {axis} of {key!r} is used both as {old.role!r} (block {old.block}) "
                                     f"and as {role!r} (block {block})")
        else:
            self._union(old.group, group)

    # -- visiting nodes

    def _visit(self, node: fx.Node) -> _Value | None:
        if node.op == "placeholder":
            if self.seen_input:  # further arguments keep their defaults: constants
                return None
            self.seen_input = True
            return _Value(self._new(fixed=True))
        if node.op == "get_attr":
            return None
        if node.op == "output":
            for value in self._inputs(node):
                self.groups[value.group].fixed = True
            return None
        if node.op == "call_module":
            module = self.modules[node.target]
            if isinstance(module, PRODUCERS + NORMS) or _has_own_tensors(module):
                return self._layer(node, module)
        inputs = self._inputs(node)
        shape = self.shapes.get(node, _Shape(None, False))
        if shape.shape is None:  # metadata (x.size(), x.shape) or a tuple of tensors
            return self._opaque(node, inputs) if inputs and shape.holds_tensors else None
        if not inputs:
            return None  # a constant
        kind = self._kind(node)
        source = self._source(node)
        if kind == "add":
            return self._add(node, inputs)
        if source is None or len(inputs) != 1:
            return self._opaque(node, inputs)
        if kind in ("relu", "pass", "pool"):
            return self._pass(node, source, kind)
        if kind == "reshape":
            return self._reshape(node, source)
        if kind == "mean":
            return self._mean(node, source)
        return self._opaque(node, inputs)

    def _kind(self, node: fx.Node) -> str:
        """What an op does to the features on dim 1: relu, pass, pool, reshape, mean, add or other."""
        target = node.target
        if node.op == "call_module":
            module = self.modules[target]
            if isinstance(module, nn.ReLU):
                return "relu"
            if isinstance(module, _POOL_MODULES):
                return "pool"
            if isinstance(module, _PASS_MODULES):
                return "pass"
            if isinstance(module, nn.Flatten):
                return "reshape"
            return "other"
        if node.op == "call_function":
            table = ((_RELU_FUNCTIONS, "relu"), (_POOL_FUNCTIONS, "pool"), (_PASS_FUNCTIONS, "pass"),
                     (_RESHAPE_FUNCTIONS, "reshape"), (_ADD_FUNCTIONS, "add"))
            for functions, kind in table:
                if _is_in(target, functions):
                    return kind
            return "mean" if target is torch.mean else "other"
        if node.op == "call_method":
            table = ((_RELU_METHODS, "relu"), (_PASS_METHODS, "pass"), (_RESHAPE_METHODS, "reshape"),
                     (_ADD_METHODS, "add"), (frozenset({"mean"}), "mean"))
            for methods, kind in table:
                if target in methods:
                    return kind
        return "other"

    def _inputs(self, node: fx.Node) -> list[_Value]:
        """The feature-carrying values among the node's arguments."""
        found: list[_Value] = []
        fx.node.map_arg((node.args, node.kwargs), lambda arg: found.append(self.values[arg]) or arg)
        return [value for value in found if value is not None]

    def _source(self, node: fx.Node) -> fx.Node | None:
        """The tensor an op applies to: its first argument (or ``input=``), if it carries features."""
        first = node.args[0] if node.args else node.kwargs.get("input")
        return first if isinstance(first, fx.Node) and self.values.get(first) is not None else None

    def _layer(self, node: fx.Node, module: nn.Module) -> _Value:
        """A module with parameters: a producer, a BatchNorm, or a layer fedcca cannot align."""
        kind = type(module).__name__
        source = self._source(node)
        if isinstance(module, CONVS) and module.groups != 1:
            return self._left_layer(node, module, source, f"it is a grouped or depthwise conv (groups={module.groups}); "
                                                          "a general transform of its input channels cannot be applied "
                                                          "to it")
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and source is not None:
            groups = self._norm_groups(module, source)
            if groups is not None:
                return self._group_norm(node, module, self.values[source], groups)
        if not isinstance(module, PRODUCERS + NORMS):
            return self._left_layer(node, module, source, f"fedcca can align only Conv1d/Conv2d (groups=1), Linear and "
                                                          f"BatchNorm1d/2d layers (and GroupNorm/LayerNorm over the "
                                                          f"channels, by permutation), not {kind}")
        value = self.values[source] if source is not None else _Value(self._new(fixed=True))
        if isinstance(module, NORMS):
            return self._batchnorm(node, module, source, value)
        shape = self._shape(source) if source is not None else None
        if isinstance(module, nn.Linear) and (shape is None or len(shape) != 2):
            return self._left_layer(node, module, source, f"a Linear layer on an input of shape {shape} acts on its "
                                                          "last dim; fedcca aligns features on dim 1 and needs "
                                                          "[N, features] inputs")
        if isinstance(module, CONVS) and value.block != 1:
            return self._left_layer(node, module, source, "a conv reading flattened features")
        self._claim(node, f"{node.target}.weight", 1, "in", value.block, value.group)
        out = self._new()
        self._claim(node, f"{node.target}.weight", 0, "out", 1, out)
        if module.bias is not None:
            self._claim(node, f"{node.target}.bias", 0, "out", 1, out)
        self.groups[out].producers.append(node)
        return _Value(out)

    def _norm_groups(self, module: nn.Module, source: fx.Node) -> int | None:
        """Groups of a GroupNorm over the channels (or a LayerNorm over the features of ``[N, C]``), else None."""
        value, shape = self.values.get(source), self._shape(source)
        if value is None or value.block != 1 or shape is None or len(shape) < 2:
            return None
        if isinstance(module, nn.GroupNorm) and module.num_channels == shape[1]:
            return int(module.num_groups)
        if isinstance(module, nn.LayerNorm) and len(shape) == 2 and tuple(module.normalized_shape) == (shape[1],):
            return 1
        return None

    def _group_norm(self, node: fx.Node, module: nn.Module, value: _Value, groups: int) -> _Value:
        """A GroupNorm / LayerNorm over the features: they stay in their group, aligned by permutations
        within its ``groups`` groups (no dense transform, no rescaling passes through it)."""
        for name in ("weight", "bias"):
            if getattr(module, name, None) is not None:
                self._claim(node, f"{node.target}.{name}", 0, "out", 1, value.group)
        self.groups[value.group].norm_groups.append(groups)
        return value

    def _batchnorm(self, node: fx.Node, module: nn.Module, source: fx.Node | None, value: _Value) -> _Value:
        """A BatchNorm joins its input's group; one not right after a producer is allowed only where fixed."""
        after_producer = (source is not None and source.op == "call_module"
                          and isinstance(self.modules[source.target], PRODUCERS))
        if not after_producer:
            self.loose_norms.append((node, value.group))
        path = node.target
        for name, role in (("weight", "out"), ("bias", "out"), ("running_mean", "out"), ("running_var", "var")):
            if getattr(module, name, None) is not None:
                self._claim(node, f"{path}.{name}", 0, role, value.block, value.group)
        group = self.groups[value.group]
        group.batchnorms.append(node)
        if after_producer and module.affine and module.track_running_stats:
            group.norms.append((str(source.target), str(path)))
        return value

    def _pass(self, node: fx.Node, source: fx.Node, kind: str) -> _Value:
        """ReLU, pooling, dropout, identity: the same features, checked by shape."""
        value = self.values[source]
        before, after = self._shape(source), self._shape(node)
        same_channels = before is not None and after is not None and len(before) >= 2 and len(after) >= 2 \
            and before[:2] == after[:2]
        if not same_channels or (kind == "pool" and value.block != 1):
            return self._opaque(node, [value])
        if kind == "relu" and value.block == 1:
            self.groups[value.group].relus.append(node)
        return value

    def _reshape(self, node: fx.Node, source: fx.Node) -> _Value:
        """A reshape keeping each channel's entries together (e.g. flatten of [N, C, H, W] into [N, C*H*W])."""
        value = self.values[source]
        before, after = self._shape(source), self._shape(node)
        if before is None or after is None or len(before) < 2:
            return self._opaque(node, [value])
        if len(after) >= 2 and after[:2] == before[:2]:
            return value  # row-major: channel c keeps its own entries
        if len(after) == 2 and after[0] == before[0] and after[1] == math.prod(before[1:]):
            return _Value(value.group, value.block * math.prod(before[2:]))  # channel c owns a block of H*W
        return self._opaque(node, [value])

    def _mean(self, node: fx.Node, source: fx.Node) -> _Value:
        """A mean over spatial dims (global average pooling written by hand)."""
        value = self.values[source]
        before = self._shape(source)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if before is None or dims is None or value.block != 1:
            return self._opaque(node, [value])
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if not dims or not all(isinstance(d, int) and d % len(before) >= 2 for d in dims):
            return self._opaque(node, [value])
        return value

    def _add(self, node: fx.Node, inputs: list[_Value]) -> _Value:
        """A residual sum: both operands' groups become one."""
        operands = [*node.args[:2], *([node.kwargs["other"]] if "other" in node.kwargs else [])]
        nodes = [arg for arg in operands if isinstance(arg, fx.Node) and self.values.get(arg) is not None]
        if len(operands) != 2 or len(nodes) != 2:
            return self._opaque(node, inputs)  # a constant, a scalar or a parameter is added
        a, b = (self.values[n] for n in nodes)
        if a.block != b.block or len({self._shape(nodes[0]), self._shape(nodes[1]), self._shape(node)}) != 1:
            return self._opaque(node, inputs)
        root = self._union(a.group, b.group)
        self.groups[root].sums.append(node)
        return _Value(root, a.block)

    def _opaque(self, node: fx.Node, inputs: list[_Value], reason: str | None = None) -> _Value:
        """An op the walk cannot see through; its inputs are aligned only if fixed anyway (else refused,
        or left unaligned under partial alignment)."""
        result = self._new(fixed=True)
        self.opaque.append(_Opaque(node, tuple(value.group for value in inputs), result, reason))
        return _Value(result)

    def _left_layer(self, node: fx.Node, module: nn.Module, source: fx.Node | None, reason: str) -> _Value:
        """A layer with parameters fedcca cannot transform: refused (strict) or averaged as it is.

        Its own tensors' feature axes are fixed, and it is an opaque op on its input: the group
        it reads is left unaligned.
        """
        if self.strict:
            raise self._refuse(node, reason)
        for key, tensor in own_tensors(str(node.target), module):
            if key in self.state_keys:
                self.layer_axes += [(key, axis) for axis in range(min(tensor.dim(), 2))]
        inputs = [self.values[source]] if source is not None else []
        return self._opaque(node, inputs, reason)

    def _shape(self, node: fx.Node) -> tuple[int, ...] | None:
        entry = self.shapes.get(node)
        return None if entry is None else entry.shape

    # -- the spec

    def spec(self) -> AlignmentSpec:
        """The points, fixed axes and BatchNorm pairs, after checking every opaque op."""
        fixed = self._fixed_roots()
        merged: dict[int, _Group] = {}
        for element, group in enumerate(self.groups):
            merged.setdefault(self._find(element), _Group()).absorb(group)
        points = []
        for root, group in sorted(merged.items(), key=lambda item: self._first(item[1])):
            if root in fixed or not group.producers:
                continue
            try:
                taps = self._taps(group)
            except UnsupportedModelError as err:
                if self.strict:
                    raise
                fixed.add(root)
                self._leave(root, group.producers[0], str(err).split(" cannot be aligned: ", 1)[-1].split(". To")[0])
                continue
            axes = tuple(ParamAxis(key, axis, claim.role, claim.block)
                         for (key, axis), claim in self.claims.items() if self._find(claim.group) == root)
            first = group.producers[0]
            size = self._shape(first)[1]
            points.append(AlignmentPoint(str(first.target), size, taps, axes, _common_groups(size, group.norm_groups)))
        fixed_axes = [slot for slot, claim in self.claims.items() if self._find(claim.group) in fixed]
        fixed_axes += self._unused_layer_axes() + [slot for slot in self.layer_axes if slot not in fixed_axes]
        norms = tuple(pair for element in sorted(merged) for pair in merged[element].norms
                      if self._find(element) not in fixed)
        return AlignmentSpec(tuple(points), tuple(dict.fromkeys(fixed_axes)), norms, self._left_out(merged))

    def _leave(self, element: int, node: fx.Node, reason: str) -> None:
        """Record that the group of ``element`` is left unaligned because of ``node`` (the first reason wins)."""
        self.left.setdefault(self._find(element), LeftOut(self._where(node), reason))

    def _left_out(self, merged: dict[int, _Group]) -> tuple[LeftOut, ...]:
        """What partial alignment left out: groups with layers (named), and layers left out whole."""
        out, seen = [], set()
        for element, entry in self.left.items():
            root = self._find(element)
            layers = tuple(str(n.target) for n in merged.get(root, _Group()).producers)
            if layers and root not in seen:
                seen.add(root)
                out.append(LeftOut(entry.where, entry.reason, layers))
        named = {entry.where for entry in out}
        for op in self.opaque:  # a layer left out whose input group held no layer (e.g. on the raw input)
            if op.node.op == "call_module" and op.reason is not None and self._where(op.node) not in named:
                out.append(LeftOut(self._where(op.node), op.reason))
        return tuple(dict.fromkeys(out))

    def _fixed_roots(self) -> set[int]:
        """Roots of fixed groups; raises for an opaque op or loose BatchNorm between aligned layers."""
        fixed = {self._find(e) for e, group in enumerate(self.groups) if group.fixed}
        # Roots whose tensors reach a layer's input, directly or through further opaque ops.
        feeding = {self._find(claim.group) for claim in self.claims.values() if claim.role == "in"}
        grown = True
        while grown:
            before = len(feeding)
            for op in self.opaque:
                if self._find(op.result) in feeding:
                    feeding.update(self._find(e) for e in op.inputs)
            grown = len(feeding) > before
        for op in self.opaque:
            # An op whose result feeds no layer only leads to the output (e.g. log_softmax of the
            # logits): its inputs are then model outputs too, and fixed.
            if self._find(op.result) not in feeding:
                fixed.update(self._find(e) for e in op.inputs)
        problems = [(op.node, op.reason or self._opaque_reason(op.node), op.inputs) for op in self.opaque
                    if (self._find(op.result) in feeding or op.reason is not None)
                    and any(self._find(e) not in fixed for e in op.inputs)]
        problems += [(node, "a BatchNorm that does not directly follow a conv/linear layer; fedcca aligns "
                            "BatchNorm only as part of its producer", (group,)) for node, group in self.loose_norms
                     if self._find(group) not in fixed]
        problems.sort(key=lambda problem: self.order[problem[0]])
        if problems and self.strict:
            node, reason, _ = problems[0]
            raise self._refuse(node, reason)
        for node, reason, groups in problems:  # partial alignment: what feeds the op stays unaligned
            for element in groups:
                if self._find(element) not in fixed:
                    self._leave(element, node, reason)
                    fixed.add(self._find(element))
        return fixed

    def _opaque_reason(self, node: fx.Node) -> str:
        return (f"it lies between aligned layers and {_target_name(node)} is not an operation a feature transform "
                "can be pushed through (fedcca traces conv/linear, BatchNorm after them, ReLU, pooling, dropout, "
                "identity, flatten into a linear layer and residual sums)")

    def _first(self, group: _Group) -> int:
        return min((self.order[n] for n in group.producers), default=len(self.order))

    def _taps(self, group: _Group) -> tuple[str, ...]:
        """Tap names of a point (see the module docstring); raises when no candidate can be hooked.

        Candidates come in tiers, the first tier with a hookable tensor wins: the ReLUs after
        the residual sums (or the sums), then every ReLU of the point, then — for a point
        without ReLU only — its producers' or their BatchNorms' outputs. Only when no module
        outputs any of them is the feature read at the input of a module consuming it
        (``"<module>:input"``, e.g. a functional ReLU of a residual sum in the model's forward).
        """
        tiers = []
        if group.sums:
            tiers.append([self._relu_after(node, group) or node for node in group.sums])
        if group.relus:
            tiers.append(list(group.relus))
        else:
            normed = {node.args[0] for node in group.batchnorms}
            tiers.append([*group.batchnorms, *(node for node in group.producers if node not in normed)])
        for consumers in (False, True):  # a consumer's input only where no module outputs the feature
            for candidates in tiers:
                candidates.sort(key=self.order.__getitem__)
                names = (self._consumer_input(node) if consumers else self._tap_name(node) for node in candidates)
                taps = list(dict.fromkeys(name for name in names if name is not None))
                if taps:
                    return tuple(taps)
        raise self._refuse(tiers[0][0], "no module outputs this feature (fedcca collects statistics with forward "
                                        "hooks on modules): compute it in an nn.ReLU module or apply the ReLU "
                                        "directly to a module's output")

    def _relu_after(self, node: fx.Node, group: _Group) -> fx.Node | None:
        relus = set(group.relus)
        return next((user for user in node.users if user in relus), None)

    def _tap_name(self, node: fx.Node) -> str | None:
        """The module to hook for ``node``'s value: one that returns it, or ``<module>+relu`` for a ReLU."""
        names = self.returned_by.get(node)
        if names:
            return min(names, key=self._preference)
        if self._kind(node) == "relu":
            source = self._source(node)
            names = self.returned_by.get(source) if source is not None else None
            if names:
                return min(names, key=self._preference) + RELU_TAP_SUFFIX
        return None

    def _consumer_input(self, node: fx.Node, depth: int = 0) -> str | None:
        """``"<module>:input"`` of a module called once whose first input is ``node``'s feature.

        Channel-preserving ops in between (pooling, spatial means, dropout, a flatten of
        ``[N, C, 1, 1]``) are followed: the feature is then read after them, still channel by
        channel (e.g. the pooled stream at the classifier).
        """
        value = self.values.get(node)
        if value is None or depth > 4:
            return None
        for user in sorted(node.users, key=self.order.__getitem__):
            if user.op == "call_module" and user.args and user.args[0] is node \
                    and len(self.returns.get(str(user.target), ())) == 1 and value.block == 1:
                return f"{user.target}{INPUT_TAP_SUFFIX}"
        for user in sorted(node.users, key=self.order.__getitem__):
            after = self.values.get(user)
            if after is not None and self._find(after.group) == self._find(value.group) and after.block == 1 \
                    and self._source(user) is node:
                found = self._consumer_input(user, depth + 1)
                if found is not None:
                    return found
        return None

    def _preference(self, path: str) -> tuple[bool, int]:
        """Outermost first, but a container only when nothing else returns the tensor."""
        return isinstance(self.modules[path], _CONTAINERS), path.count(".")

    def _unused_layer_axes(self) -> list[tuple[str, int]]:
        """Axes of conv/linear/BatchNorm layers the forward never calls: they do not affect the function."""
        slots = []
        for path, module in self.modules.items():
            if path in self.called or not isinstance(module, PRODUCERS + NORMS):
                continue
            for key, tensor in own_tensors(path, module):
                if key in self.state_keys:
                    slots += [(key, axis) for axis in range(min(tensor.dim(), 2))]
        return slots

    def _refuse(self, node: fx.Node, reason: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"model type {self.model_type} has no alignment spec; {self._where(node)} "
                                     f"cannot be aligned: {reason}. To merge it, {WHAT_TO_DO}")

    def _where(self, node: fx.Node) -> str:
        """``layer 'path' (Type) at graph node 'name'`` or ``graph node 'name' (op) in module 'path' (Type)``."""
        if node.op == "call_module":
            return f"layer {node.target!r} ({type(self.modules[node.target]).__name__}) at graph node {node.name!r}"
        stack = node.meta.get("nn_module_stack") or {}
        inside = " in the model's forward"
        if stack:
            path, kind = list(stack.values())[-1]
            inside = f" in module {path!r} ({getattr(kind, '__name__', kind)})"
        return f"graph node {node.name!r} ({_target_name(node)}){inside}"


def _common_groups(size: int, counts: list[int]) -> int | None:
    """The finest partition into contiguous groups that refines every normalisation's (None: none)."""
    if not counts:
        return None
    width = math.gcd(*(size // count for count in counts))
    return size // width


def _is_in(target: Any, functions: frozenset) -> bool:
    try:
        return target in functions
    except TypeError:  # an unhashable target
        return False


def _target_name(node: fx.Node) -> str:
    """The op of a node as a user would write it: ``torch.cat``, ``Tensor.softmax``, ``LayerNorm``."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return str(node.target)
    target = node.target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    return f"{module}.{name}" if module and module != "_operator" else f"operator.{name}"


def _has_own_tensors(module: nn.Module) -> bool:
    return any(True for _ in own_tensors("", module))


# ----------------------------------------------------------------------------- the spec of a model

def _first_layer_without_description(model: nn.Module) -> str:
    """The first layer fedcca cannot describe: of an unknown type if any, else the first with tensors."""
    layers = [(n, m) for n, m in model.named_modules() if _has_own_tensors(m)]
    unknown = [(n, m) for n, m in layers if not isinstance(m, KNOWN_LAYERS)]
    if unknown:
        n, m = unknown[0]
        return f"layer {n!r} ({type(m).__name__}) is of a type fedcca cannot align"
    if layers:
        n, m = layers[0]
        return (f"layer {n!r} ({type(m).__name__}) is the first layer it cannot describe "
                "without an example input to trace the model on")
    return "it has no layers with parameters"


def spec_for(model: nn.Module, example_input: torch.Tensor | None = None, *, strict: bool = False) -> AlignmentSpec:
    """Return the validated alignment spec of ``model``.

    A model's own ``alignment_spec()`` method wins (all of :mod:`fedcca.models` have one).
    Otherwise the spec is derived from the model's ``torch.fx`` graph by
    :func:`derive_spec`, run on ``example_input``; a model that cannot be traced, or has an
    operation on its features that a transform cannot be pushed through, is refused naming it.

    Args:
        model: The model to describe.
        example_input: A batch of the model's inputs (its shapes fix flatten block sizes);
            used only when the model has no ``alignment_spec()``.
        strict: Refuse a derived spec that leaves anything unaligned (see :func:`derive_spec`).

    Raises:
        UnsupportedModelError: when no spec can be found or derived, or the spec does not match it.
    """
    describe = getattr(model, "alignment_spec", None)
    if callable(describe):
        spec = describe()
        if not isinstance(spec, AlignmentSpec):
            raise UnsupportedModelError(
                f"{type(model).__name__}.alignment_spec() returned {type(spec).__name__}, not an AlignmentSpec"
            )
    else:
        if example_input is None:
            raise UnsupportedModelError(
                f"model type {type(model).__name__} has no alignment spec; {_first_layer_without_description(model)}. "
                "Pass example_input= (a batch of inputs) to derive one from its torch.fx graph, or "
                f"{WHAT_TO_DO}"
            )
        spec = derive_spec(model, example_input, strict=strict)
    spec.validate(model)
    return spec
