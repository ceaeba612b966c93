"""Graph rewrites for ONNX Runtime's CPU provider, made at load (the file is not changed).

ONNX Runtime's CPU provider runs convolutions in a channel-blocked layout (NCHWc) and
converts back to plain NCHW around every operator that layout lacks. Two patterns of
Ultralytics' YOLOv8 and YOLO11 exports (checked on pose exports at opsets 11-17) cost it
more than they should, and each has an exact rewrite (same arithmetic, float rounding
aside):

- :func:`split_convs`: ``Conv -> activation -> Split`` on the channel axis (the ``cv1``
  of each C2f/C3k2 block, ``.chunk(2, 1)``). NCHWc has no Split, so the block leaves the
  blocked layout twice. The rewrite runs one Conv per part (the weight rows of that
  part) with the activation after each; nothing is split and the parts stay blocked.
- :func:`last_axis_softmax`: ``Softmax`` over an axis that is not the last (the DFL
  head: ``[B, 16, 4, A]`` over axis 1), which the provider transposes, runs row by row
  over 16 values and transposes back. The rewrite spells it out as
  ``exp(x - max) / sum`` over that axis, elementwise along the anchors.

On YOLO11n-pose at 640 (one thread, this project's 2-vCPU Xeon) the two take a run from
71 to 60 ms (docs/benchmarks.md). :func:`cpu_graph` applies both to a model file and says
what changed; ``InferenceConfig.cpu_rewrites: false`` turns them off. The GPU providers
and OpenVINO get the file as it is (they fuse these themselves).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Larger files stay as they are: the rewritten copy is handed to ORT as bytes (protobuf's
# 2 GB limit), and models that large are not the ones these patterns slow down.
MAX_REWRITE_BYTES = 512 * 1024 * 1024

# A part of a Split must have a multiple of this many channels for the rewrite: the
# NCHWc block (8 channels on AVX2, 16 on AVX512). Parts that are not keep leaving the
# blocked layout, and several small Convs then cost more than one Conv and a Split (a
# detection head's 1x1 Conv split 4/2/2/10/20/40 ran 2.5 % slower rewritten).
CHANNEL_BLOCK = 16

_ONNX = ("", "ai.onnx")  # the default domain (a custom domain's "Relu" is another operator)

# Elementwise activations of one input that may sit between the Conv and the Split.
_UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
    "Softplus", "Mish", "Gelu",
})


@dataclass(frozen=True, slots=True)
class CpuGraph:
    """``model``: the rewritten file as bytes for ``InferenceSession`` (None: run the file
    unchanged); ``rewrites``: how many of each rewrite were made."""

    model: bytes | None
    rewrites: dict[str, int]


def describe_rewrites(rewrites: dict[str, int]) -> str:
    """``9 conv+split, 1 softmax (not last axis)`` (``none`` when empty)."""
    return ", ".join(f"{n} {name}" for name, n in rewrites.items()) or "none"


def cpu_graph(path: Path) -> CpuGraph:
    """The model file with :func:`rewrite_for_cpu` applied (``model`` None when nothing
    matched, the file is too large or ONNX cannot read it: ORT then reports on the file)."""
    model, rewrites = _rewritten(path)
    if model is None or not rewrites:
        return CpuGraph(None, {})
    return CpuGraph(model.SerializeToString(), rewrites)


def cpu_rewrites_of(path: Path) -> dict[str, int]:
    """What :func:`cpu_graph` would rewrite in the file (``model inspect``), without
    serializing the rewritten copy."""
    return _rewritten(path)[1]


def _rewritten(path: Path) -> tuple[Any, dict[str, int]]:
    """The file's ``onnx.ModelProto`` with the rewrites made, and their counts; (None, {})
    for a file left as it is (too large, unreadable, weights in external files)."""
    import onnx

    if path.stat().st_size > MAX_REWRITE_BYTES:
        return None, {}
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a damaged file: ORT's own load names what is wrong
        log.debug("cpu graph rewrites skipped for %s: %s", path, exc)
        return None, {}
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer):
        return None, {}  # weights in files beside it: ORT loads it from its path
    return model, rewrite_for_cpu(model)


def rewrite_for_cpu(model: Any) -> dict[str, int]:
    """Apply every CPU rewrite to ``model`` (an ``onnx.ModelProto``) in place; return
    the count of each that was made (empty: the model is unchanged). A graph with
    control flow (If, Loop, Scan: subgraphs may read any value) is left alone."""
    from onnx import AttributeProto

    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS)
           for n in model.graph.node for a in n.attribute):
        return {}
    counts = {
        "conv+split": split_convs(model),
        "softmax (not last axis)": last_axis_softmax(model),
    }
    return {name: n for name, n in counts.items() if n}


def _opset(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in _ONNX), default=1)


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Graph:
    """Producers, consumers and constant values of one graph, for pattern matching."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        g = model.graph
        self.graph = g
        self.initializers = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.uses: Counter[str] = Counter(i for n in g.node for i in n.input if i)
        self.uses.update(o.name for o in g.output)
        self._constant = {
            n.output[0]: numpy_helper.to_array(n.attribute[0].t)
            for n in g.node
            if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"
        }
        self._used_names = {*self.producer, *self.initializers, *(i.name for i in g.input)}

    def value(self, name: str) -> np.ndarray | None:
        """The constant ``name`` holds: an initializer or a Constant node's output,
        through Identity nodes (exporters share equal initializers that way)."""
        from onnx import numpy_helper

        for _ in range(16):
            if name in self.initializers:
                return numpy_helper.to_array(self.initializers[name])
            if name in self._constant:
                return self._constant[name]
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return None

    def only_use(self, name: str) -> bool:
        return self.uses[name] == 1

    def fresh(self, stem: str) -> str:
        name, k = stem, 0
        while name in self._used_names:
            k += 1
            name = f"{stem}_{k}"
        self._used_names.add(name)
        return name

    def replace(self, replaced: dict[int, list[Any]]) -> None:
        """Put each node whose id is a key by the key's nodes (an empty list drops it),
        keeping the topological order, then drop the Constant and Identity nodes and the
        initializers nothing uses any more (a split Conv's weights, sizes, shared bias)."""
        nodes = []
        for n in self.graph.node:
            nodes.extend(replaced.get(id(n), [n]))
        outputs = {v.name for v in self.graph.output}
        while True:
            read = Counter(i for n in nodes for i in n.input if i)
            dead = {id(n) for n in nodes if n.op_type in ("Constant", "Identity")
                    and not any(read[o] or o in outputs for o in n.output)}
            if not dead:
                break
            nodes = [n for n in nodes if id(n) not in dead]
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        used = set(read) | outputs | {v.name for v in self.graph.input}
        keep = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)


def _activation_chain(g: _Graph, split_input: str) -> tuple[Any, list[Any]] | None:
    """``(conv, activation nodes)`` when ``split_input`` is a Conv's output, directly or
    through one activation (SiLU as Sigmoid + Mul, or one of ``_UNARY``), and nothing
    else reads the Conv's output or the activation's intermediate values."""
    node = g.producer.get(split_input)
    if node is None or node.domain not in _ONNX:
        return None
    if node.op_type == "Conv":
        return node, []
    if node.op_type in _UNARY and len(node.input) == 1:
        conv = g.producer.get(node.input[0])
        if (conv is not None and conv.op_type == "Conv" and conv.domain in _ONNX
                and g.only_use(conv.output[0])):
            return conv, [node]
        return None
    if node.op_type == "Mul" and len(node.input) == 2:  # SiLU: x * sigmoid(x)
        for x, s in (node.input, node.input[::-1]):
            sig = g.producer.get(s)
            conv = g.producer.get(x)
            if (sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == x
                    and sig.domain in _ONNX and conv is not None and conv.op_type == "Conv"
                    and conv.domain in _ONNX and g.uses[x] == 2 and g.only_use(s)):
                return conv, [sig, node]
    return None


def _split_sizes(g: _Graph, split: Any, opset: int, channels: int) -> list[int] | None:
    parts = len(split.output)
    sizes: Any = None
    if opset < 13:
        sizes = _attr(split, "split")
    elif len(split.input) > 1 and split.input[1]:
        sizes = g.value(split.input[1])
        if sizes is None:
            return None
    if sizes is None:  # equal parts (opset 18: num_outputs says how many)
        if channels % parts:
            return None
        return [channels // parts] * parts
    sizes = [int(s) for s in np.asarray(sizes).ravel()]
    return sizes if sum(sizes) == channels and all(s > 0 for s in sizes) else None


def split_convs(model: Any) -> int:
    """Rewrite each ``Conv -> [activation] -> Split(channel axis)`` into one Conv (and
    activation) per part; return how many Splits went. A Conv with groups, weights that
    are not constants, or an output something else also reads is left alone, and so is a
    Split into parts of other than a multiple of ``CHANNEL_BLOCK`` channels."""
    from onnx import helper, numpy_helper

    g = _Graph(model)
    opset = _opset(model)
    replaced: dict[int, list[Any]] = {}
    for split in list(g.graph.node):
        if (split.op_type != "Split" or split.domain not in _ONNX or not split.input
                or not g.only_use(split.input[0])):
            continue
        chain = _activation_chain(g, split.input[0])
        if chain is None:
            continue
        conv, acts = chain
        weight = g.value(conv.input[1]) if len(conv.input) > 1 else None
        bias = g.value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if weight is None or (len(conv.input) > 2 and conv.input[2] and bias is None):
            continue
        if weight.dtype != np.float32:  # float16 models: the CPU provider's kernels vary
            continue
        if _attr(conv, "group", 1) != 1 or any(id(n) in replaced for n in (conv, *acts)):
            continue
        rank = weight.ndim  # the Conv's output has the weight's rank: [N, C, spatial...]
        axis = _attr(split, "axis", 0)
        if axis not in (1, 1 - rank):
            continue
        sizes = _split_sizes(g, split, opset, weight.shape[0])
        if sizes is None or any(size % CHANNEL_BLOCK for size in sizes):
            continue
        new: list[Any] = []
        start = 0
        for part, (size, out) in enumerate(zip(sizes, split.output, strict=True)):
            stem = f"{conv.name or conv.output[0]}/part{part}"
            w_name = g.fresh(stem + "/W")
            g.graph.initializer.append(
                numpy_helper.from_array(weight[start:start + size].copy(), w_name))
            inputs = [conv.input[0], w_name]
            if bias is not None:
                b_name = g.fresh(stem + "/B")
                g.graph.initializer.append(
                    numpy_helper.from_array(bias[start:start + size].copy(), b_name))
                inputs.append(b_name)
            start += size
            y = out if not acts else g.fresh(stem + "/Y")
            part_conv = helper.make_node("Conv", inputs, [y], name=g.fresh(stem))
            part_conv.attribute.extend(conv.attribute)
            new.append(part_conv)
            if len(acts) == 1:  # a unary activation
                act = helper.make_node(acts[0].op_type, [y], [out], name=g.fresh(stem + "/act"))
                act.attribute.extend(acts[0].attribute)
                new.append(act)
            elif acts:  # SiLU
                s = g.fresh(stem + "/sigmoid")
                new += [helper.make_node("Sigmoid", [y], [s], name=s),
                        helper.make_node("Mul", [y, s], [out], name=g.fresh(stem + "/mul"))]
        # The parts go where the Split was (its input is ready there); the Conv and its
        # activation go.
        replaced[id(split)] = new
        for n in (conv, *acts):
            replaced[id(n)] = []
    if replaced:
        g.replace(replaced)
    return sum(1 for nodes in replaced.values() if nodes)


def _ranks(model: Any) -> dict[str, int]:
    """The rank of every float32 value whose shape ONNX's shape inference knows."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # inference is best effort: no ranks, no softmax rewrite
        log.debug("shape inference failed: %s", exc)
        return {}
    ranks = {}
    g = inferred.graph
    for v in (*g.value_info, *g.input, *g.output):
        t = v.type.tensor_type
        if t.HasField("shape") and t.elem_type == onnx.TensorProto.FLOAT:
            ranks[v.name] = len(t.shape.dim)
    return ranks


def last_axis_softmax(model: Any) -> int:
    """Rewrite each Softmax over an axis that is not the last (opset 13 and later, where
    the axis is one axis) into ReduceMax, Sub, Exp, ReduceSum, Div over that axis; return
    how many. A Softmax whose input rank shape inference cannot tell, or whose input is
    not float32, is left alone."""
    from onnx import helper, numpy_helper

    opset = _opset(model)
    if opset < 13:  # before 13, Softmax flattens [axis:] into one: another operator
        return 0
    candidates = [n for n in model.graph.node
                  if n.op_type == "Softmax" and n.domain in _ONNX]
    if not candidates:
        return 0
    ranks = _ranks(model)
    g = _Graph(model)
    replaced: dict[int, list[Any]] = {}
    for sm in candidates:
        rank = ranks.get(sm.input[0])
        if rank is None:
            continue
        axis = _attr(sm, "axis", -1)
        axis = axis + rank if axis < 0 else axis
        if axis == rank - 1:
            continue
        stem = sm.name or sm.output[0]
        axes = g.fresh(stem + "/axes")
        g.graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), axes))
        x = sm.input[0]
        top, shifted, e, total = (g.fresh(f"{stem}/{s}") for s in ("max", "sub", "exp", "sum"))
        reduce_max = (helper.make_node("ReduceMax", [x, axes], [top], keepdims=1, name=top)
                      if opset >= 18 else
                      helper.make_node("ReduceMax", [x], [top], axes=[axis], keepdims=1,
                                       name=top))
        replaced[id(sm)] = [
            reduce_max,
            helper.make_node("Sub", [x, top], [shifted], name=shifted),
            helper.make_node("Exp", [shifted], [e], name=e),
            helper.make_node("ReduceSum", [e, axes], [total], keepdims=1, name=total),
            helper.make_node("Div", [e, total], [sm.output[0]], name=g.fresh(stem + "/div")),
        ]
    if replaced:
        g.replace(replaced)
    return len(replaced)
