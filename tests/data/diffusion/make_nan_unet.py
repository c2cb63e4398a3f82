#!/usr/bin/env python3
"""A UNet that answers NaN: `out_sample = sample / 0 * 0` (inf × 0), with optimum's inputs.

The worker must answer a model's non-finite output with `inference_failed`, never a black PNG;
tests/integration/diffusion_worker.rs serves sd-tiny-random with this UNet in its place.

    /work/fixture-venv/bin/python tests/data/diffusion/make_nan_unet.py   # any Python with onnx 1.23

writes tests/data/diffusion/nan-unet/model.onnx (a few hundred bytes).
"""

from pathlib import Path

import onnx
from onnx import TensorProto, helper

sample = helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 4, "height", "width"])
timestep = helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [])
hidden = helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch", "sequence", 32])
out = helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["batch", 4, "height", "width"])
zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
graph = helper.make_graph(
    [
        helper.make_node("Div", ["sample", "zero"], ["infinite"]),
        helper.make_node("Mul", ["infinite", "zero"], ["out_sample"]),
    ],
    "nan_unet",
    [sample, timestep, hidden],
    [out],
    initializer=[zero],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="kiln tests")
model.ir_version = 9
onnx.checker.check_model(model)
path = Path(__file__).resolve().parent / "nan-unet" / "model.onnx"
path.parent.mkdir(exist_ok=True)
onnx.save(model, path)
print(path, path.stat().st_size, "bytes")
