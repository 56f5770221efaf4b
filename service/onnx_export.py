"""The ONNX graph of an exported model: featurized inputs to outputs, the arithmetic of
``Network.predict`` and ``EventModel.predict`` in inference mode.

Imports onnx, numpy, workers.ingest.schema and workers.nn; builds a ``ModelProto`` and
writes nothing (service/export.py writes the file).

**Inputs.** ``x`` float32 (batch, columns): the featurizer's assembled columns
(``FeatureSchema.columns``: standardized numbers, booleans, missing indicators), or for a
vector model the (batch, input_dim) features. Then one int64 input per categorical field,
named after it, holding rows of its table: (batch,) for a ``category`` field, (batch,
max_values) padded with -1 for a ``categories`` field, whose embedding is the mean of the
valid rows (a row of only -1 embeds to zeros). **Output** ``y`` float32 (batch,
n_outputs): probabilities (sigmoid, softmax) or values (identity).

**Graph.** Each field's Gather on its table (an initializer ``emb.<field>``), then for a
bag a masked sum divided by ``max(count, 1)``; Concat ``[x | emb_1 | ... | emb_F]``; per
hidden layer MatMul, batch norm folded into one Mul and one Add with the moving statistics
(``scale = gamma / sqrt(var + bn_epsilon)``, ``shift = beta - mean * scale``: the constants
``batchnorm_inference`` computes), the activation; MatMul and Add of the output layer and
its activation. A float64 network is exported in float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from workers.ingest.schema import FeatureSchema
from workers.nn.network import Network

OPSET = 17  # onnxruntime 1.14 and later run it
INPUT = "x"
OUTPUT = "y"
BATCH = "batch"  # the symbolic batch dimension of every input and the output
_ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}


class _Graph:
    """Nodes and initializers under construction; every name is checked to be new."""

    def __init__(self, inputs: Sequence[str]):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.names = set(inputs)

    def _claim(self, name: str) -> str:
        if name in self.names:
            raise ValueError(f"the ONNX graph would use the name {name!r} twice")
        self.names.add(name)
        return name

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), self._claim(name)))
        return name

    def node(self, op: str, inputs: Sequence[str], output: str, **attributes: Any) -> str:
        self.nodes.append(
            helper.make_node(op, list(inputs), [self._claim(output)], name=output, **attributes)
        )
        return output


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32)


def _bag_mean(g: _Graph, name: str, table: str, ids: str) -> str:
    """(batch, max_values) int64 rows padded with -1 -> (batch, dim): the valid rows' mean."""
    valid = g.node("GreaterOrEqual", [ids, "const/zero_i64"], f"{name}/valid")  # (b, k) bool
    safe = g.node("Where", [valid, ids, "const/zero_i64"], f"{name}/safe_ids")  # -1 -> row 0
    rows = g.node("Gather", [table, safe], f"{name}/rows", axis=0)  # (b, k, dim)
    weight = g.node("Cast", [valid], f"{name}/weight", to=TensorProto.FLOAT)  # (b, k)
    w3 = g.node("Unsqueeze", [weight, "const/axis_2"], f"{name}/weight3")  # (b, k, 1)
    kept = g.node("Mul", [rows, w3], f"{name}/kept")  # (b, k, dim) * (b, k, 1) broadcasts
    total = g.node("ReduceSum", [kept, "const/axis_1"], f"{name}/sum", keepdims=0)  # (b, dim)
    count = g.node("ReduceSum", [weight, "const/axis_1"], f"{name}/count", keepdims=1)  # (b, 1)
    divisor = g.node("Max", [count, "const/one_f32"], f"{name}/divisor")  # 0 valid -> 1: zeros
    return g.node("Div", [total, divisor], f"{name}/mean")  # (b, dim) / (b, 1) broadcasts


def onnx_model(
    net: Network,
    params: Mapping[str, np.ndarray],
    moving: Mapping[str, np.ndarray],
    schema: FeatureSchema | None = None,
    tables: Sequence[np.ndarray] = (),
    metadata: Mapping[str, str] | None = None,
) -> onnx.ModelProto:
    """The ONNX model of a network, and of a raw-event model's embeddings when ``schema``.

    Args:
        net: the network; params, moving: its parameters and moving statistics.
        schema: a raw-event model's schema (None: a vector model, input ``x`` only).
        tables: the (rows, dim) tables of ``schema.categoricals``, in order.
        metadata: ``metadata_props`` of the model (key -> text).

    Returns:
        A model that ``onnx.checker.check_model`` (with shape inference) accepts.

    Raises:
        ValueError: a categorical field named ``x`` or ``y`` or like a node of the graph,
            or tables that do not fit the schema.
    """
    fields = schema.categoricals if schema is not None else ()
    if len(tables) != len(fields):
        raise ValueError(f"`tables` must hold {len(fields)} table(s). Received: {len(tables)}")
    for spec, table in zip(fields, tables, strict=True):
        if np.shape(table) != (spec.table_rows, spec.dim):
            raise ValueError(
                f"table of {spec.name!r} must be {(spec.table_rows, spec.dim)}. "
                f"Received: {np.shape(table)}"
            )
        if spec.name in (INPUT, OUTPUT):
            raise ValueError(
                f"a categorical field named {spec.name!r} cannot be an ONNX input: "
                f"{INPUT!r} and {OUTPUT!r} are the graph's own"
            )
    n_columns = len(schema.columns) if schema is not None else net.input_dim
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [BATCH, n_columns])]
    for spec in fields:
        shape: list[str | int] = [BATCH] if spec.type == "category" else [BATCH, spec.max_values]
        inputs.append(helper.make_tensor_value_info(spec.name, TensorProto.INT64, shape))
    g = _Graph([i.name for i in inputs])

    a = INPUT
    if fields:
        g.constant("const/zero_i64", np.array(0, np.int64))
        g.constant("const/one_f32", np.array(1.0, np.float32))
        g.constant("const/axis_1", np.array([1], np.int64))
        g.constant("const/axis_2", np.array([2], np.int64))
        parts = [INPUT]
        for spec, table in zip(fields, tables, strict=True):
            name = g.constant(f"emb.{spec.name}", _f32(table))
            if spec.type == "category":
                parts.append(g.node("Gather", [name, spec.name], f"emb/{spec.name}", axis=0))
            else:
                parts.append(_bag_mean(g, f"emb/{spec.name}", name, spec.name))
        a = g.node("Concat", parts, "inputs", axis=1)  # (batch, input_dim)

    for i in range(len(net.hidden)):
        W = g.constant(f"dense{i}.W", _f32(params[f"dense{i}.W"]))
        z = g.node("MatMul", [a, W], f"dense{i}/z")
        # The constants of batchnorm_inference, in the network's dtype, as it computes them.
        gamma, beta = params[f"bn{i}.gamma"], params[f"bn{i}.beta"]
        scale = gamma / np.sqrt(moving[f"bn{i}.var"] + net.bn_epsilon)  # (n,)
        shift = beta - moving[f"bn{i}.mean"] * scale  # (n,)
        scaled = g.node("Mul", [z, g.constant(f"bn{i}.scale", _f32(scale))], f"bn{i}/scaled")
        zt = g.node("Add", [scaled, g.constant(f"bn{i}.shift", _f32(shift))], f"bn{i}/z")
        a = g.node(_ACTIVATIONS[net.activation], [zt], f"act{i}/a")

    W = g.constant("out.W", _f32(params["out.W"]))
    b = g.constant("out.b", _f32(params["out.b"]))
    logits = g.node("Add", [g.node("MatMul", [a, W], "out/matmul"), b], "out/logits")
    if net.output == "sigmoid":
        g.node("Sigmoid", [logits], OUTPUT)
    elif net.output == "softmax":
        g.node("Softmax", [logits], OUTPUT, axis=1)
    else:
        g.node("Identity", [logits], OUTPUT)

    graph = helper.make_graph(
        g.nodes,
        "streamtrain",
        inputs,
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [BATCH, net.n_outputs])],
        g.initializers,
    )
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        producer_name="streamtrain",
        ir_version=helper.find_min_ir_version_for(opsets),
    )
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    return model
