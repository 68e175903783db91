"""Small ONNX graphs for tests, built with the `onnx` package."""

import numpy
from onnx import TensorProto, helper, numpy_helper

BATCH = "batch"


def every_type_model() -> bytes:
    """One path per datatype, each with a dynamic batch dimension: FP32 (MatMul + Relu),
    FP16 (Mul by 2), INT64 (Add 7), BOOL (Not), STRING (Identity), UINT8 (Identity)."""
    weight = numpy.arange(12, dtype=numpy.float32).reshape(4, 3) / 10 - 0.5
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["XW"]),
        helper.make_node("Relu", ["XW"], ["Y"]),
        helper.make_node("Mul", ["H", "TWO"], ["H2"]),
        helper.make_node("Add", ["I", "SEVEN"], ["I7"]),
        helper.make_node("Not", ["B"], ["NB"]),
        helper.make_node("Identity", ["S"], ["S_OUT"]),
        helper.make_node("Identity", ["U"], ["U_OUT"]),
    ]
    initializers = [numpy_helper.from_array(weight, "W"),
                    numpy_helper.from_array(numpy.array(2, numpy.float16), "TWO"),
                    numpy_helper.from_array(numpy.array(7, numpy.int64), "SEVEN")]
    value = helper.make_tensor_value_info
    inputs = [value("X", TensorProto.FLOAT, [BATCH, 4]),
              value("H", TensorProto.FLOAT16, [BATCH, 2]),
              value("I", TensorProto.INT64, [BATCH, 3]), value("B", TensorProto.BOOL, [BATCH, 2]),
              value("S", TensorProto.STRING, [BATCH, 1]),
              value("U", TensorProto.UINT8, [BATCH, 5])]
    outputs = [value("Y", TensorProto.FLOAT, [BATCH, 3]),
               value("H2", TensorProto.FLOAT16, [BATCH, 2]),
               value("I7", TensorProto.INT64, [BATCH, 3]),
               value("NB", TensorProto.BOOL, [BATCH, 2]),
               value("S_OUT", TensorProto.STRING, [BATCH, 1]),
               value("U_OUT", TensorProto.UINT8, [BATCH, 5])]
    return _model(helper.make_graph(nodes, "types", inputs, outputs, initializers))


def fixed_shape_model() -> bytes:
    """X FP32 [2, 3] -> Y = -X: no batch dimension."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["X"], ["Y"])], "neg",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3])])
    return _model(graph)


def _model(graph) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def bf16_model() -> bytes:
    """X BF16 [batch, 2] -> Y = X (onnxruntime's CPU provider has little BF16 arithmetic)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])], "bf16",
        [helper.make_tensor_value_info("X", TensorProto.BFLOAT16, [BATCH, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.BFLOAT16, [BATCH, 2])])
    return _model(graph)


def bf16_and_string_model() -> bytes:
    """C BF16 [batch, 2] -> C1 = C, D STRING [batch, 1] -> D1 = D."""
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Identity", ["C"], ["C1"]), helper.make_node("Identity", ["D"], ["D1"])],
        "bf16_and_string",
        [value("C", TensorProto.BFLOAT16, [BATCH, 2]), value("D", TensorProto.STRING, [BATCH, 1])],
        [value("C1", TensorProto.BFLOAT16, [BATCH, 2]),
         value("D1", TensorProto.STRING, [BATCH, 1])])
    return _model(graph)


def reshape_model() -> bytes:
    """X FP32 [batch, 2, 2] -> Y = X transposed (each row's 2x2 matrix)."""
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["X"], ["Y"], perm=[0, 2, 1])], "transpose",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [BATCH, 2, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [BATCH, 2, 2])])
    return _model(graph)


def row_scalar_model() -> bytes:
    """X FP32 [batch] -> Y = X * X: one scalar a row."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["X", "X"], ["Y"])], "square",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [BATCH])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [BATCH])])
    return _model(graph)


def scalar_model() -> bytes:
    """X FP32 scalar -> Y = X + X, a scalar: no batch dimension, no dimension at all."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "X"], ["Y"])], "twice",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [])])
    return _model(graph)


def initializer_input_model() -> bytes:
    """Triton's add_with_initializer (onnxruntime_backend test/initializer_as_input):
    OUTPUT = INPUT + INITIALIZER, all FP32 [5, 5]; INITIALIZER is a graph input that the
    graph also holds, as ones."""
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT", "INITIALIZER"], ["OUTPUT"])], "init_input",
        [value("INPUT", TensorProto.FLOAT, [5, 5]),
         value("INITIALIZER", TensorProto.FLOAT, [5, 5])],
        [value("OUTPUT", TensorProto.FLOAT, [5, 5])],
        [numpy_helper.from_array(numpy.ones((5, 5), numpy.float32), "INITIALIZER")])
    return _model(graph)
