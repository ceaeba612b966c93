"""The CPU graph rewrites: each pattern rewritten gives the same outputs under ONNX Runtime;
what does not match is left exactly as it was."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.inference.config import InferenceConfig
from service.inference.cpu_graph import (
    cpu_graph,
    describe_rewrites,
    last_axis_softmax,
    rewrite_for_cpu,
    split_convs,
)
from service.inference.session import open_model_session

RNG = np.random.default_rng(7)


def model_of(
    nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: dict[str, np.ndarray],
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs,
        [numpy_helper.from_array(v.astype(v.dtype), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


def rewritten(model: onnx.ModelProto, rewrite: Callable[[Any], int]) -> tuple[Any, int]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    count = rewrite(copy)
    onnx.checker.check_model(copy)
    return copy, count


def assert_left_alone(model: onnx.ModelProto, rewrite: Callable[[Any], Any]) -> None:
    """``rewrite`` makes nothing (count 0 or no counts) and changes no byte of ``model``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert not rewrite(copy)
    assert copy.SerializeToString() == model.SerializeToString()


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def fvi(name: str, shape: list[Any]) -> Any:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_split_model(
    *, activation: str = "silu", sizes: tuple[int, ...] = (16, 32),
    opset: int = 17, group: int = 1, axis: int = 1, bias: bool = True, split_as: str = "input",
    extra_use: bool = False, shared_bias: bool = False,
) -> onnx.ModelProto:
    """x [1, 4, 10, 12] -> Conv(3x3) -> activation -> Split -> each part * 2."""
    c_out = sum(sizes) if axis == 1 else 48
    inits: dict[str, np.ndarray] = {
        "W": RNG.normal(size=(c_out, 4 // group, 3, 3)).astype(np.float32),
    }
    conv_in = ["x", "W"]
    nodes: list[Any] = []
    if bias:
        inits["B"] = RNG.normal(size=c_out).astype(np.float32)
        conv_in.append("B")
    if shared_bias:  # as torch's exporter shares equal initializers: B2 = Identity(B)
        nodes.append(helper.make_node("Identity", ["B"], ["B2"]))
        conv_in[2] = "B2"
    conv_out = "a" if activation == "none" else "c"
    nodes.append(helper.make_node("Conv", conv_in, [conv_out], name="conv", pads=[1, 1, 1, 1],
                                  group=group))
    if activation == "silu":
        nodes += [helper.make_node("Sigmoid", ["c"], ["s"]),
                  helper.make_node("Mul", ["c", "s"], ["a"])]
    elif activation != "none":
        nodes += [helper.make_node(activation, ["c"], ["a"], name="act")]
    parts = len(sizes)
    outs = [f"p{i}" for i in range(parts)]
    if split_as == "input":
        inits["sizes"] = np.array(sizes, np.int64)
        nodes.append(helper.make_node("Split", ["a", "sizes"], outs, axis=axis))
    elif split_as == "attribute":
        nodes.append(helper.make_node("Split", ["a"], outs, axis=axis, split=list(sizes)))
    elif split_as == "num_outputs":
        nodes.append(helper.make_node("Split", ["a"], outs, axis=axis, num_outputs=parts))
    else:  # equal parts, no sizes given (opsets 13-17)
        nodes.append(helper.make_node("Split", ["a"], outs, axis=axis))
    inits["two"] = np.array(2.0, np.float32)
    nodes += [helper.make_node("Mul", [o, "two"], [f"y{i}"]) for i, o in enumerate(outs)]
    outputs = [fvi(f"y{i}", ["n", "c", "h", "w"])
               for i in range(parts)]
    if extra_use:  # something else reads the Conv's output too
        nodes.append(helper.make_node("Relu", [conv_out], ["r"]))
        outputs.append(fvi("r", ["n", "c", "h", "w"]))
    return model_of(nodes, [fvi("x", [1, 4, 10, 12])], outputs, inits, opset)


def x_input() -> dict[str, np.ndarray]:
    return {"x": RNG.normal(size=(1, 4, 10, 12)).astype(np.float32)}


@pytest.mark.parametrize("activation,opset,split_as,sizes", [
    ("silu", 17, "input", [16, 32]),
    ("silu", 18, "num_outputs", [32, 32]),
    ("Relu", 11, "attribute", [32, 16]),
    ("LeakyRelu", 13, "equal", [16, 16]),
    ("none", 17, "input", [16, 16, 32]),
])
@pytest.mark.parametrize("shared_bias", [False, True])
def test_conv_split_becomes_one_conv_per_part_with_the_same_outputs(
    activation: str, opset: int, split_as: str, sizes: list[int], shared_bias: bool
) -> None:
    model = conv_split_model(activation=activation, opset=opset, split_as=split_as,
                             sizes=tuple(sizes), shared_bias=shared_bias)
    new, count = rewritten(model, split_convs)
    assert count == 1
    assert "Split" not in ops(new)
    assert ops(new).count("Conv") == len(sizes)
    assert {i.name for i in new.graph.initializer}.isdisjoint({"W", "B", "sizes"})
    x = x_input()
    for ours, theirs in zip(run(new, x), run(model, x), strict=True):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    {"group": 2},  # grouped: the weight rows of a part are not that part's channels
    {"axis": 2, "sizes": (4, 6)},  # the height, not the channel axis
    {"extra_use": True},  # the Conv's output is read elsewhere too
    {"sizes": (8, 40)},  # a part of 8 channels: not a whole NCHWc block of 16
    {"sizes": (4, 2, 2, 10, 20, 40)},  # a detection head's split (LineWatch's own model)
])
def test_conv_split_left_alone_when_it_is_not_the_pattern(options: dict[str, Any]) -> None:
    assert_left_alone(conv_split_model(**options), split_convs)


def test_conv_split_left_alone_when_weights_are_not_constant() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Split", ["c"], ["a", "b"], axis=1)]
    # 32 channels in two whole blocks of 16: only the weights (a graph input) stop it
    model = model_of(nodes, [fvi("x", [1, 4, 10, 12]), fvi("w", [32, 4, 3, 3])],
                     [fvi("a", [1, 16, 10, 12]), fvi("b", [1, 16, 10, 12])], {})
    assert_left_alone(model, split_convs)


def softmax_model(axis: int, opset: int, shape: tuple[int, ...] = (1, 16, 4, 50)) -> Any:
    nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=axis)]
    return model_of(nodes, [fvi("x", list(shape))], [fvi("y", list(shape))], {}, opset)


@pytest.mark.parametrize("axis,opset", [(1, 13), (1, 18), (-3, 17), (2, 20)])
def test_softmax_over_an_inner_axis_is_spelled_out_with_the_same_outputs(
    axis: int, opset: int
) -> None:
    model = softmax_model(axis, opset)
    new, count = rewritten(model, last_axis_softmax)
    assert count == 1
    assert "Softmax" not in ops(new)
    # large logits: the rewrite subtracts the maximum, or exp() would overflow to inf/nan
    x = {"x": (RNG.normal(size=(1, 16, 4, 50)) * 400).astype(np.float32)}
    ours, theirs = run(new, x)[0], run(model, x)[0]
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.sum(axis=axis), 1.0, rtol=1e-5)


@pytest.mark.parametrize("axis,opset", [(-1, 17), (3, 13), (1, 11)])
def test_softmax_over_the_last_axis_or_before_opset_13_is_left_alone(
    axis: int, opset: int
) -> None:
    assert_left_alone(softmax_model(axis, opset), last_axis_softmax)


def test_rewrite_for_cpu_counts_each_rewrite() -> None:
    model = conv_split_model()
    assert rewrite_for_cpu(model) == {"conv+split": 1}
    assert rewrite_for_cpu(softmax_model(1, 17)) == {"softmax (not last axis)": 1}
    assert rewrite_for_cpu(softmax_model(-1, 17)) == {}


def test_cpu_graph_of_a_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.onnx"
    onnx.save(softmax_model(-1, 17), plain)
    assert cpu_graph(plain).model is None
    split = tmp_path / "split.onnx"
    onnx.save(conv_split_model(), split)
    graph = cpu_graph(split)
    assert graph.model is not None
    assert describe_rewrites(graph.rewrites) == "1 conv+split"
    assert "Split" not in ops(onnx.load_from_string(graph.model))
    external = tmp_path / "external.onnx"  # weights in a file beside it: ORT loads it
    onnx.save(conv_split_model(), external, save_as_external_data=True,
              all_tensors_to_one_file=True, location="external.data", size_threshold=0)
    assert cpu_graph(external).model is None
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    assert cpu_graph(broken).model is None  # ORT's load reports it (test_session)


def test_the_cpu_session_runs_the_rewritten_graph_unless_turned_off(tmp_path: Path) -> None:
    path = tmp_path / "split.onnx"
    onnx.save(conv_split_model(), path)
    config = InferenceConfig(providers=["cpu"])
    on = open_model_session(path, config)
    off = open_model_session(path, config.model_copy(update={"cpu_rewrites": False}))
    assert on.cpu_rewrites == {"conv+split": 1}
    assert off.cpu_rewrites == {}
    x = x_input()
    for a, b in zip(on.session.run(None, x), off.session.run(None, x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_rewritten_graph_ort_refuses_falls_back_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from service.inference import cpu_graph as cpu_graph_mod
    from service.inference import session as session_mod

    path = tmp_path / "split.onnx"
    onnx.save(conv_split_model(), path)
    # a rewrite gone wrong: bytes ORT cannot load
    monkeypatch.setattr(session_mod, "cpu_graph", lambda p: cpu_graph_mod.CpuGraph(
        b"broken", {"conv+split": 1}))
    with caplog.at_level("WARNING"):
        opened = open_model_session(path, InferenceConfig(providers=["cpu"]))
    assert opened.cpu_rewrites == {}
    assert "refused the rewritten graph" in caplog.text
    assert len(opened.session.run(None, x_input())) == 2  # the file as it is runs


def test_float16_graphs_are_left_alone() -> None:
    nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=1)]
    shape = [1, 16, 4, 50]
    half = model_of(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, shape)],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT16, shape)], {})
    assert rewritten(half, last_axis_softmax)[1] == 0
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Split", ["c"], ["a", "b"], axis=1)]
    half_conv = model_of(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4, 10, 12])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [1, 16, 10, 12])
         for n in ("a", "b")],
        {"W": RNG.normal(size=(32, 4, 3, 3)).astype(np.float16)})
    assert rewritten(half_conv, split_convs)[1] == 0
    # the same graphs in float32 are rewritten (the tests above check their outputs)
    assert rewritten(softmax_model(1, 17), last_axis_softmax)[1] == 1


def test_operators_of_another_domain_are_left_alone() -> None:
    model = conv_split_model(activation="Relu")
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.domain = "com.example"  # someone's own "Relu": not ONNX's
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    assert_left_alone(model, split_convs)


def test_a_graph_with_control_flow_is_left_alone() -> None:
    """A subgraph may read any value of the graph (here the Conv's output), so nothing in
    a graph with If, Loop or Scan is rewritten."""
    model = conv_split_model(activation="none")
    branch = helper.make_graph([helper.make_node("Identity", ["a"], ["z"])], "then", [],
                               [fvi("z", ["n", "c", "h", "w"])])
    model.graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    model.graph.node.append(helper.make_node("If", ["flag"], ["picked"], then_branch=branch,
                                             else_branch=branch))
    model.graph.output.append(fvi("picked", ["n", "c", "h", "w"]))
    onnx.checker.check_model(model)
    assert_left_alone(model, rewrite_for_cpu)
