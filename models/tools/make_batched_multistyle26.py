"""Build models/multistyle26/multistyle26-batched.onnx from the upstream multistyle26.onnx.

What
    The upstream file (PyTorch 2.4.1 export, see models/multistyle26/ORIGIN.md) takes
    `image` [1,3,h,w] and `style_weights` [26], one weight vector shared by the whole batch.
    Each of its 18 conditional instance norms (CIN) is exported as ~20 small nodes (mean,
    subtract, pow, mean, add eps, sqrt, reciprocal, weight-table reductions, reshapes), and each
    reflect pad as ~15 nodes of shape arithmetic: 709 nodes in all (360 after onnxruntime's
    constant folding).

    This script rebuilds the same network with onnx.helper from the original's initializers
    (the weights are copied bit for bit) so that:
      * `image` is [N,3,H,W] and `style_weights` is [N,26]: one weight row per sample, already
        normalised to sum 1 by the caller, so requests with different styles share a batch;
      * each CIN is the fused `InstanceNormalization` op (scale 1, bias 0, eps 1e-5) followed by
        a per-sample affine: gamma = style_weights @ gamma_table ([N,C] -> [N,C,1,1]), Mul,
        then the same for beta, Add. Biased variance over H,W per sample and channel, exactly
        what the upstream graph computes.
      * reflect pads and the nearest x2 upsamples use constant initializers.

Why
    Batching requests needs a per-sample style and a symbolic N. The fused norm also replaces
    the chain of memory-bound elementwise passes over each activation with one kernel per layer.

Architecture (read off the upstream graph; no conv has a bias):
    contract.0  reflect-pad 4, conv 9x9 s1 3->32,  CIN, relu
    contract.1  reflect-pad 1, conv 3x3 s2 32->32, CIN, relu
    contract.2  reflect-pad 1, conv 3x3 s2 32->32, CIN, relu
    res.k (k=0..5)  x + CIN(conv3x3(pad1(relu(CIN(conv3x3(pad1(x)))))))
    expand.0    nearest x2 (Resize asymmetric/floor), reflect-pad 1, conv 3x3 32->8, CIN, relu
    expand.1    nearest x2, reflect-pad 1, conv 3x3 8->4, CIN, relu
    expand.2    reflect-pad 4, conv 9x9 4->3, CIN, sigmoid

The script then checks the rewrite against the original with onnxruntime on the CPU (each
sample of an N=4 batch with four different weight rows against the original run alone with
that row), exits non-zero when the largest absolute difference exceeds 1e-4 (outputs are in
[0,1]), and prints CPU throughput of both files.

Usage (from the repository root, with models/tools/requirements.txt installed):
    python models/tools/make_batched_multistyle26.py [--threads 4]
The output is byte-for-byte deterministic for a given onnx version.
"""

import argparse
import hashlib
import os
import pathlib
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from skimage import data as skdata

MODEL_DIR = pathlib.Path(__file__).resolve().parent.parent / "multistyle26"
SRC = MODEL_DIR / "multistyle26.onnx"
DST = MODEL_DIR / "multistyle26-batched.onnx"

NUM_STYLES = 26
EPS = 1e-5
TOLERANCE = 1e-4


def build(src: onnx.ModelProto) -> onnx.ModelProto:
    weights = {t.name: t for t in src.graph.initializer}
    strides = {n.input[1]: list(helper.get_attribute_value(a))
               for n in src.graph.node if n.op_type == "Conv"
               for a in n.attribute if a.name == "strides"}
    nodes, consts, used = [], {}, set()

    def const(name, array):
        consts.setdefault(name, numpy_helper.from_array(array, name))
        return name

    def weight(name):
        used.add(name)
        return name

    def conv_cin(x, layer, stride, activation):
        """reflect pad, conv (no bias), InstanceNormalization, per-sample style affine."""
        w = numpy_helper.to_array(weights[f"{layer}.w"])
        channels, kernel = w.shape[0], w.shape[2]
        assert strides[f"{layer}.w"] == [stride, stride], layer
        pad = kernel // 2
        pads = const(f"pads_{pad}", np.array([0, 0, pad, pad, 0, 0, pad, pad], np.int64))
        nodes.append(helper.make_node("Pad", [x, pads], [f"{layer}/pad"], mode="reflect"))
        nodes.append(helper.make_node(
            "Conv", [f"{layer}/pad", weight(f"{layer}.w")], [f"{layer}/conv"],
            kernel_shape=[kernel, kernel], strides=[stride, stride]))
        nodes.append(helper.make_node(
            "InstanceNormalization",
            [f"{layer}/conv", const(f"ones_{channels}", np.ones(channels, np.float32)),
             const(f"zeros_{channels}", np.zeros(channels, np.float32))],
            [f"{layer}/norm"], epsilon=EPS))
        for param in ("gamma", "beta"):
            # [N,26] @ [26,C] -> [N,C] -> [N,C,1,1]
            nodes.append(helper.make_node(
                "MatMul", ["style_weights", weight(f"{layer}.norm.{param}")], [f"{layer}/{param}_nc"]))
            nodes.append(helper.make_node(
                "Unsqueeze", [f"{layer}/{param}_nc", const("axes_hw", np.array([2, 3], np.int64))],
                [f"{layer}/{param}"]))
        nodes.append(helper.make_node("Mul", [f"{layer}/norm", f"{layer}/gamma"], [f"{layer}/scaled"]))
        out = f"{layer}/out" if activation else f"{layer}/shifted"
        nodes.append(helper.make_node("Add", [f"{layer}/scaled", f"{layer}/beta"], [f"{layer}/shifted"]))
        if activation:
            nodes.append(helper.make_node(activation, [f"{layer}/shifted"], [out]))
        return out

    def upsample(x, layer):
        scales = const("scales_x2", np.array([1, 1, 2, 2], np.float32))
        nodes.append(helper.make_node(
            "Resize", [x, "", scales], [f"{layer}/up"], mode="nearest",
            coordinate_transformation_mode="asymmetric", nearest_mode="floor"))
        return f"{layer}/up"

    x = conv_cin("image", "contract.0", 1, "Relu")
    x = conv_cin(x, "contract.1", 2, "Relu")
    x = conv_cin(x, "contract.2", 2, "Relu")
    for k in range(6):
        h = conv_cin(x, f"res.{k}.0", 1, "Relu")
        h = conv_cin(h, f"res.{k}.1", 1, None)
        nodes.append(helper.make_node("Add", [x, h], [f"res.{k}/out"]))
        x = f"res.{k}/out"
    x = conv_cin(upsample(x, "expand.0"), "expand.0", 1, "Relu")
    x = conv_cin(upsample(x, "expand.1"), "expand.1", 1, "Relu")
    x = conv_cin(x, "expand.2", 1, "Sigmoid")
    nodes[-1].output[0] = "stylized"  # the sigmoid is the graph output

    missing = set(weights) - used
    assert not missing, f"initializers of the original not used: {sorted(missing)}"

    graph = helper.make_graph(
        nodes, "multistyle26_batched",
        inputs=[helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"]),
                helper.make_tensor_value_info("style_weights", TensorProto.FLOAT, ["N", NUM_STYLES])],
        outputs=[helper.make_tensor_value_info("stylized", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        initializer=[weights[name] for name in sorted(used)] + list(consts.values()),
        doc_string="image: RGB in [0,1], H and W multiples of 4. style_weights: one row per "
                   "sample, summing to 1. stylized: RGB in [0,1].")
    # IR 8 / opset 17, the same as the original, so any runtime that loads it loads this.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="kiln models/tools/make_batched_multistyle26.py")
    model.doc_string = ("multistyle26 with per-sample style weights [N,26] and fused "
                        "InstanceNormalization; derived from multistyle26.onnx, see ORIGIN.md.")
    helper.set_model_props(model, {"source_sha256": hashlib.sha256(SRC.read_bytes()).hexdigest()})
    onnx.checker.check_model(model, full_check=True)
    return model


def session(path, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def one_hot(i):
    w = np.zeros(NUM_STYLES, np.float32)
    w[i] = 1
    return w


def blend(spec):
    w = np.zeros(NUM_STYLES, np.float32)
    for i, v in spec.items():
        w[i] = v
    return w / w.sum()


def verify(original, batched):
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    rows = np.stack([one_hot(7), one_hot(19), blend({3: 0.5, 12: 0.5}),
                     np.full(NUM_STYLES, 1 / NUM_STYLES, np.float32)])
    worst = 0.0
    for w, h in [(64, 64), (128, 96), (96, 128), (256, 256), (260, 200)]:
        images = np.stack([np.asarray(Image.fromarray(p).resize((w, h), Image.LANCZOS), np.float32) / 255
                           for p in photos]).transpose(0, 3, 1, 2)
        out = batched.run(None, {"image": images, "style_weights": rows})[0]
        diffs = []
        for n in range(len(photos)):
            ref = original.run(None, {"image": images[n:n + 1], "style_weights": rows[n]})[0]
            diffs.append(np.abs(out[n:n + 1] - ref))
        diff = np.stack(diffs)
        worst = max(worst, float(diff.max()))
        print(f"  {w}x{h} (WxH), N=4: max abs diff {diff.max():.3g}, mean {diff.mean():.3g}, "
              f"per sample max {[f'{d.max():.2g}' for d in diffs]}")
    return worst


def images_per_second(runs, *cases):
    """Median images/s of each (session, feeds) case, timed in alternation so that a
    noisy machine slows every case alike."""
    for sess, feeds in cases:
        for _ in range(2):
            sess.run(None, feeds)
    times = [[] for _ in cases]
    for _ in range(runs):
        for t, (sess, feeds) in zip(times, cases):
            start = time.perf_counter()
            sess.run(None, feeds)
            t.append(time.perf_counter() - start)
    return [len(feeds["image"]) / float(np.median(t)) for t, (_, feeds) in zip(times, cases)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count()),
                        help="onnxruntime intra-op threads for verification and timing")
    args = parser.parse_args()

    src = onnx.load(SRC)
    model = build(src)
    DST.write_bytes(model.SerializeToString(deterministic=True))
    print(f"wrote {DST.relative_to(MODEL_DIR.parent.parent)}  sha256 "
          f"{hashlib.sha256(DST.read_bytes()).hexdigest()}")
    print(f"nodes: original {len(src.graph.node)}, batched {len(model.graph.node)}")

    original, batched = session(SRC, args.threads), session(DST, args.threads)
    print(f"onnxruntime {ort.__version__}, CPU, {args.threads} intra-op threads")
    worst = verify(original, batched)

    rng = np.random.default_rng(0)
    weights = one_hot(7)
    for side in (256, 512):
        image = rng.random((1, 3, side, side), dtype=np.float32)
        a, b = images_per_second(10, (original, {"image": image, "style_weights": weights}),
                                 (batched, {"image": image, "style_weights": weights[None]}))
        print(f"  {side}x{side}, batch 1: original {a:.1f} images/s, batched {b:.1f} images/s")
    image = rng.random((4, 3, 256, 256), dtype=np.float32)
    (b,) = images_per_second(5, (batched, {"image": image, "style_weights": np.tile(weights, (4, 1))}))
    print(f"  256x256, batch 4: batched {b:.1f} images/s")

    if worst > TOLERANCE:
        sys.exit(f"FAIL: max abs diff {worst:.3g} > {TOLERANCE}")
    print(f"OK: max abs diff {worst:.3g} <= {TOLERANCE}")


if __name__ == "__main__":
    main()
