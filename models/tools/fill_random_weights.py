#!/usr/bin/env python3
"""Write random weights for a graph-only model folder (made by make_sd15_shaped.py), with numpy alone.

Every `weights.json` under FOLDER lists the tensors its `model.onnx` keeps in `weights.bin`
(offset, length, dtype, shape, name); this writes that file. Weights are drawn like a fresh
network's: matrices and convolution kernels uniform in ±1/sqrt(fan_in) (PyTorch's default
initialisation), normalisation scales 1, everything else of rank 1 (biases) 0, other tensors
(embeddings) normal with std 0.02. The pictures are noise; the arithmetic is a real model's.

    python3 models/tools/fill_random_weights.py FOLDER [SEED]

Needs only Python 3 and numpy (the GPU machine has both in /opt/torch/.venv).
"""

import json
import sys
from pathlib import Path

import numpy as np


def fill(layout_path: Path, rng: np.random.Generator) -> int:
    layout = json.loads(layout_path.read_text())
    target = layout_path.parent / layout["file"]
    with open(target, "wb") as out:
        for t in layout["tensors"]:
            shape, dtype = tuple(t["shape"]), np.dtype(t["dtype"])
            if dtype.kind != "f":
                values = np.zeros(shape, dtype)
            elif len(shape) >= 2 and "embed" not in t["name"]:
                fan_in = int(np.prod(shape[1:]))
                bound = 1.0 / np.sqrt(fan_in)
                values = rng.uniform(-bound, bound, size=shape).astype(dtype)
            elif len(shape) == 1:
                one = "norm" in t["name"] and t["name"].endswith("weight")
                values = np.full(shape, 1.0 if one else 0.0, dtype)
            else:
                values = (rng.standard_normal(size=shape, dtype=np.float32) * 0.02).astype(dtype)
            assert out.tell() == t["offset"] and values.nbytes == t["length"], t["name"]
            out.write(values.tobytes())
    return layout["bytes"]


def main(folder: Path, seed: int):
    rng = np.random.default_rng(seed)
    total = sum(fill(p, rng) for p in sorted(folder.rglob("weights.json")))
    print(f"{folder}: {total / 1e9:.2f} GB of random weights", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
