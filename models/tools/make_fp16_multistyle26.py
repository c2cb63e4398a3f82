"""Build models/multistyle26/multistyle26-batched-fp16.onnx: half precision with fp32 normalization.

What
    Takes multistyle26-batched.onnx (made by make_batched_multistyle26.py) and rewrites it so that
    the convolutions, reflect pads, nearest upsamples, ReLUs and residual adds run in float16,
    while every conditional instance norm stays in float32:

        ... -> Conv (fp16) -> Cast fp32 -> InstanceNormalization -> Mul gamma -> Add beta
            -> Cast fp16 -> Relu (fp16) -> ...

    The style affine (gamma, beta = style_weights @ table) is computed in fp32 as before. The last
    layer's sigmoid also runs in fp32, so `stylized` is float32. The inputs stay float32 as well
    (`image` is cast to fp16 in the graph), so the worker feeds this file exactly like the fp32
    one: it is a drop-in variant, selected per model by `[models.variants]` in kiln's config.

Why
    On a GPU the convolutions are what tensor cores accelerate in half precision, and halving the
    bytes of every activation halves the memory traffic of the elementwise passes. A naive fp16
    conversion of the whole graph overflows in the normalization (sum of squares of large
    activations) and produces inf/NaN on CUDA (../shared/gpu/README.md): the statistics need fp32.

Quality bound (PSNR vs fp32 >= 40 dB, checked here on the CPU)
    onnxruntime's CPU provider has no fp16 kernels for these ops: it lifts the whole fp16 island
    back to fp32 (its InsertCastTransformer removes the casts and widens the fp16 weights), so
    running the variant on a CPU only measures the weights' rounding. The script therefore also
    builds an *emulation*: the fp32 graph with every value that the variant stores in fp16
    (the input, the weights, each convolution's and residual add's output) rounded to fp16's
    11-bit significand in place (Veltkamp split: t = 8193 x, x16 = t - (t - x)), and it checks
    that none of those values exceeds fp16's range (65504). Both are compared with the fp32
    model over four photos x four style rows (single styles, a blend, the uniform mix) at
    256x256, 512x512 and 384x288, in batches of 4, after quantizing to 8 bits as the worker
    does; the script exits non-zero when any sample is under 40 dB, any output is not finite, or
    any stored value would overflow fp16. What the emulation cannot show is the accumulation
    inside a half-precision cuDNN convolution; that needs the comparison rerun on a GPU.

Usage (from the repository root, with models/tools/requirements.txt installed):
    python models/tools/make_fp16_multistyle26.py [--threads 2]
The output is byte-for-byte deterministic for a given onnx version.
"""

import argparse
import hashlib
import os
import pathlib
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from skimage import data as skdata

MODEL_DIR = pathlib.Path(__file__).resolve().parent.parent / "multistyle26"
SRC = MODEL_DIR / "multistyle26-batched.onnx"
DST = MODEL_DIR / "multistyle26-batched-fp16.onnx"

NUM_STYLES = 26
MIN_PSNR_DB = 40.0
FP16_MAX = 65504.0

# Ops that run in fp16 in the variant; everything else (InstanceNormalization, the style
# MatMul/Unsqueeze, the affine Mul/Add, the final Sigmoid) stays fp32.
HALF_OPS = {"Conv", "Pad", "Resize", "Relu"}


def convert(src: onnx.ModelProto) -> onnx.ModelProto:
    graph = src.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    half = set()  # tensors that are fp16 in the new graph

    def is_half_op(node):
        if node.op_type in HALF_OPS:
            return True
        # The residual adds: Add of two activations (neither is a style beta).
        return node.op_type == "Add" and node.output[0].startswith("res.") and node.output[0].endswith("/out")

    nodes, new_inits = [], []
    casts = {}

    def cast(name, to):
        key = (name, to)
        if key not in casts:
            suffix = "fp16" if to == TensorProto.FLOAT16 else "fp32"
            out = f"{name}/{suffix}"
            nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"cast:{out}"))
            casts[key] = out
        return casts[key]

    for node in graph.node:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        if is_half_op(node):
            for i, name in enumerate(node.input):
                if not name:
                    continue
                if node.op_type == "Conv" and i == 1:
                    w = numpy_helper.to_array(inits[name]).astype(np.float16)
                    new_inits.append(numpy_helper.from_array(w, name + "/fp16"))
                    node.input[i] = name + "/fp16"
                elif node.op_type in ("Pad", "Resize") and i > 0:
                    continue  # pads (int64) and scales (float32) are shape arguments
                elif name not in half:
                    node.input[i] = cast(name, TensorProto.FLOAT16)
            half.update(node.output)
        else:
            for i, name in enumerate(node.input):
                if name in half:
                    node.input[i] = cast(name, TensorProto.FLOAT)
        nodes.append(node)

    used = {name for node in nodes for name in node.input}
    initializers = [t for t in graph.initializer if t.name in used] + new_inits
    out = helper.make_graph(
        nodes, "multistyle26_batched_fp16", inputs=list(graph.input), outputs=list(graph.output),
        initializer=initializers,
        doc_string=graph.doc_string + " Convolutions, pads, upsamples, ReLUs and residual adds in "
                   "float16; instance norms, the style affine and the sigmoid in float32.")
    model = helper.make_model(out, opset_imports=list(src.opset_import), ir_version=src.ir_version,
                              producer_name="kiln models/tools/make_fp16_multistyle26.py")
    model.doc_string = ("multistyle26-batched in half precision with fp32 normalization; derived "
                        "from multistyle26-batched.onnx, see ORIGIN.md.")
    helper.set_model_props(model, {"source_sha256": hashlib.sha256(SRC.read_bytes()).hexdigest()})
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    del model.graph.value_info[:]  # inference was a type check; keep the file small and stable
    onnx.checker.check_model(model, full_check=True)
    return model


def emulate(variant: onnx.ModelProto):
    """The variant as an fp32 graph that rounds every fp16-stored value to fp16 precision, plus
    one extra output per rounded activation (to check fp16's range). See the module docs."""
    sigma = "emulate/sigma"
    nodes, inits, watched = [], [numpy_helper.from_array(np.array(8193.0, np.float32), sigma)], []

    def round16(name, out):
        nodes.append(helper.make_node("Mul", [name, sigma], [f"{out}/t"]))
        nodes.append(helper.make_node("Sub", [f"{out}/t", name], [f"{out}/d"]))
        nodes.append(helper.make_node("Sub", [f"{out}/t", f"{out}/d"], [out]))

    for t in variant.graph.initializer:
        array = numpy_helper.to_array(t)
        if array.dtype == np.float16:
            array = array.astype(np.float32)  # exact: fp16 values are fp32 values
        inits.append(numpy_helper.from_array(array, t.name))
    for node in variant.graph.node:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        if node.op_type == "Cast":
            if node.attribute[0].i == TensorProto.FLOAT16:
                round16(node.input[0], node.output[0])
            else:
                nodes.append(helper.make_node("Identity", list(node.input), list(node.output)))
        elif node.op_type in ("Conv", "Add") and node.output[0] != "stylized" and (
                node.op_type == "Conv" or node.output[0].endswith("/out")):
            # An fp16 op computes in higher precision and stores its result in fp16.
            raw = node.output[0]
            node.output[0] = raw + "/exact"
            nodes.append(node)
            round16(raw + "/exact", raw)
            watched.append(raw)
        else:
            nodes.append(node)
    outputs = list(variant.graph.output) + [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in watched]
    graph = helper.make_graph(nodes, "fp16_emulation", list(variant.graph.input), outputs, inits)
    return helper.make_model(graph, opset_imports=list(variant.opset_import), ir_version=variant.ir_version)


def session(model, threads, optimized=None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if optimized:
        opts.optimized_model_filepath = optimized
    source = str(model) if isinstance(model, pathlib.Path) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def one_hot(i):
    w = np.zeros(NUM_STYLES, np.float32)
    w[i] = 1
    return w


def quantize(x):
    """As the worker does: clamp to [0,1], scale to 0..255, round."""
    return np.round(np.clip(x, 0, 1) * 255)


def psnr(a, b):
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def compare(fp32, candidates):
    """PSNR (8-bit) of each sample of each candidate against the fp32 model, and the largest
    magnitude among a candidate's extra outputs (its fp16-stored activations, if it has any)."""
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    blend = np.zeros(NUM_STYLES, np.float32)
    blend[[3, 12]] = 0.5
    rows = np.stack([one_hot(7), one_hot(19), blend, np.full(NUM_STYLES, 1 / NUM_STYLES, np.float32)])
    failures, worst = [], {label: float("inf") for label in candidates}
    for w, h in [(256, 256), (512, 512), (384, 288)]:
        images = np.stack([np.asarray(Image.fromarray(p).resize((w, h), Image.LANCZOS), np.float32) / 255
                           for p in photos]).transpose(0, 3, 1, 2)
        feeds = {"image": images, "style_weights": rows}
        ref = quantize(fp32.run(None, feeds)[0])
        for label, sess in candidates.items():
            out, *stored = sess.run(None, feeds)
            peak = max((float(np.abs(a).max()) for a in stored), default=0.0)
            per_sample = [psnr(quantize(out[n]), ref[n]) for n in range(len(photos))]
            worst[label] = min(worst[label], *per_sample)
            levels = int(np.abs(quantize(out) - ref).max())
            print(f"  {label:>9} {w}x{h} (WxH), N=4: PSNR per sample "
                  f"{', '.join(f'{p:.1f}' for p in per_sample)} dB, max diff {levels} levels"
                  + (f", largest fp16-stored activation {peak:.0f}" if stored else ""))
            if not np.isfinite(out).all():
                failures.append(f"{label} {w}x{h}: non-finite output")
            if peak > FP16_MAX:
                failures.append(f"{label} {w}x{h}: an activation of {peak:.0f} overflows fp16")
            if min(per_sample) < MIN_PSNR_DB:
                failures.append(f"{label} {w}x{h}: PSNR {min(per_sample):.1f} dB < {MIN_PSNR_DB} dB")
    return worst, failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count()),
                        help="onnxruntime intra-op threads for the comparison")
    args = parser.parse_args()

    src = onnx.load(SRC)
    model = convert(src)
    DST.write_bytes(model.SerializeToString(deterministic=True))
    print(f"wrote {DST.relative_to(MODEL_DIR.parent.parent)}  sha256 "
          f"{hashlib.sha256(DST.read_bytes()).hexdigest()}  ({DST.stat().st_size} bytes, "
          f"fp32 {SRC.stat().st_size})")
    ops = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    print(f"nodes: fp32 {len(src.graph.node)}, fp16 variant {len(model.graph.node)} "
          f"({ops.get('Cast', 0)} casts)")

    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        variant = session(DST, args.threads, optimized)
        placed = onnx.load(optimized)
    fp16_values = {t.name for t in placed.graph.initializer if t.data_type == TensorProto.FLOAT16}
    fp16_values |= {o for n in placed.graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16
                    for o in n.output}
    half = sum(1 for n in placed.graph.node if n.op_type == "Conv" and n.input[1] in fp16_values)
    print(f"onnxruntime {ort.__version__}, CPU, {args.threads} intra-op threads: {half} of "
          f"{ops['Conv']} convolutions kept in fp16 by the CPU provider (the rest run in fp32)")
    worst, failures = compare(session(SRC, args.threads),
                              {"variant": variant, "emulation": session(emulate(model), args.threads)})
    for failure in failures:
        print(f"FAIL: {failure}")
    if failures:
        sys.exit(1)
    print(f"OK: worst PSNR vs fp32: variant on CPU {worst['variant']:.1f} dB, fp16 emulation "
          f"{worst['emulation']:.1f} dB (bound {MIN_PSNR_DB} dB)")


if __name__ == "__main__":
    main()
