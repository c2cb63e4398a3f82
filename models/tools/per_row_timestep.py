#!/usr/bin/env python3
"""Make an optimum Stable Diffusion UNet take one timestep per batch row, and prove it before writing.

Why
    optimum's export declares the UNet input `timestep` as a float32 scalar (rank 0): diffusers'
    `UNet2DConditionModel` did `timesteps = timesteps[None]; timesteps = timesteps.expand(sample.shape[0])`
    on it, which the TorchScript exporter traced as

        timestep [] -> Unsqueeze(axes=[0]) -> [1] -> Cast(to=FLOAT) -> Expand(to [Shape(sample)[0]]) -> [B]
                    -> /time_proj/Unsqueeze(axes=[1]) -> /time_proj/Mul (the frequencies) -> Sin, Cos ...

    A `[B]` timestep then fails at `/time_proj/Mul` (the Unsqueeze makes it [1, B]). Step-level batching puts
    rows that are at different denoising steps into one UNet call, so kiln needs one timestep per row.

What it changes (nothing else)
    Every `Unsqueeze(axes=[0])` that consumes `timestep` is removed and its consumers read `timestep`
    directly (its axes Constant goes too when nothing else reads it); `timestep` is declared
    `[batch_size]` (optimum's name for the batch dimension of `sample`). The Cast and the Expand stay:
    Expand of a [B] tensor to [B] is a no-op, so each row's time embedding is computed from its own
    timestep. The model's doc_string and a metadata entry (`kiln.per_row_timestep`) record the rewrite.
    The weights are not touched (an external data file stays where it is and is not rewritten).

    The rewrite is refused (exit code 2, with the reason) unless the graph is exactly that: `timestep` a
    rank-0 input whose only consumers are Unsqueeze(axes=[0]) nodes, whose outputs reach, through Cast or
    Identity nodes only, Expand nodes (as their data input) whose target shape is computed from
    `sample`'s shape. A UNet whose `timestep` is already rank 1 is left untouched ("already per row,
    nothing to do", exit code 0).

How it is verified (before anything is written)
    The rewritten graph is saved to a temporary file beside the original (so that external data
    resolves) and run with onnxruntime's CPU provider on 4 rows with DIFFERENT timesteps, samples, text
    embeddings (and `timestep_cond` rows for LCM UNets); each output row is compared with the ORIGINAL
    graph run on that row alone with its scalar timestep. Then all rows at one timestep against the
    original on the whole batch, and batches of 1 and 2 at one timestep against the original. Every
    maximum absolute difference must be <= 1e-5, and the per-row timesteps must visibly matter (row i
    with its own timestep differs from row i at another row's timestep), or nothing is written.
    Shapes come from the model: `sample`'s channels, latents of the smallest valid side >= 8
    (a multiple of 2^(levels - 1), levels = len(block_out_channels) in config.json beside the model),
    `encoder_hidden_states` [B, seq, dim] and `timestep_cond` [B, dim] from the declared dims, else
    from the configs (seq: ../text_encoder/config.json max_position_embeddings, else 77).

Usage (from the repository root, with the venv of models/tools/requirements.txt; onnx, onnxruntime and
numpy are all it needs)

    python models/tools/per_row_timestep.py MODEL_DIR_OR_ONNX [--out PATH] [--check-only]

MODEL_DIR_OR_ONNX is an optimum export folder (its unet/model.onnx is taken), a UNet folder, or a
.onnx file. Without --out the file is rewritten in place; with --out the rewritten graph is written
there (external data files are copied beside it when it goes to another folder). --check-only does
everything but writing. Exit codes: 0 written / nothing to do / check passed, 2 refused or
verification failed (nothing written), 1 an unexpected error.

From Python: `per_row_timestep.apply(path, out=None, check_only=False, log=print)` returns
{"summary": the line printed, "what": the graph change, "diffs": {check: max abs difference}, "max_diff"},
or None when the input is already per row; it raises `Refusal` where the CLI exits 2.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TOLERANCE = 1e-5
# The per-row timesteps must change each row's output by more than this (else the check proves nothing).
MIN_SENSITIVITY = 1e-4
BATCH_DIM = "batch_size"  # optimum's dim_param for the batch dimension of `sample`
METADATA_KEY = "kiln.per_row_timestep"
PASS_THROUGH = ("Cast", "Identity")  # elementwise nodes allowed between the Unsqueeze and the Expand
ROWS = 4


class Refusal(Exception):
    """The graph is not the expected pattern, or the rewritten graph did not verify: nothing written."""


def resolve(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "unet" / "model.onnx", path / "model.onnx"):
            if candidate.is_file():
                return candidate
        raise Refusal(f"{path}: no unet/model.onnx or model.onnx in this folder")
    if not path.is_file():
        raise Refusal(f"{path}: no such file")
    return path


# ------------------------------------------------------------------------------------------------ graph


def _attr(node, name):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def _constant_value(graph, name):
    """The value of `name` if it is an initializer or a Constant node's output, else None."""
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and name in n.output:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_ints", "value_int"):
                    return np.asarray(helper.get_attribute_value(a))
    return None


def _unsqueeze_axes(graph, node):
    axes = _attr(node, "axes")  # opset < 13
    if axes is None and len(node.input) > 1:
        axes = _constant_value(graph, node.input[1])
    return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]


def _subgraph_reads(graph, name):
    """Whether a subgraph (If/Loop/Scan body) reads `name` from the outer scope."""
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                if any(name in n.input for n in g.node) or _subgraph_reads(g, name):
                    return True
    return False


def _ancestors_read(graph, name, producers, wanted, seen=None):
    """Whether the value `name` is computed from the graph input `wanted`."""
    seen = set() if seen is None else seen
    if name == wanted:
        return True
    if name in seen or name not in producers:
        return False
    seen.add(name)
    return any(_ancestors_read(graph, i, producers, wanted, seen) for i in producers[name].input if i)


def timestep_rank(model):
    for i in model.graph.input:
        if i.name == "timestep":
            tt = i.type.tensor_type
            return len(tt.shape.dim) if tt.HasField("shape") else None
    raise Refusal("the graph has no input named `timestep`: not an optimum Stable Diffusion UNet")


def plan(model):
    """Check the pattern; return (unsqueezes to remove, the pass-through chain, the Expand nodes)."""
    g = model.graph
    rank = timestep_rank(model)
    if rank is None:
        raise Refusal("`timestep` has no declared shape (unknown rank); refusing to guess")
    if rank != 0:
        raise Refusal(f"`timestep` has rank {rank}, expected 0 (a scalar)")
    if any(o.name == "timestep" for o in g.output) or _subgraph_reads(g, "timestep"):
        raise Refusal("`timestep` is a graph output or read inside a subgraph: unexpected, refusing")
    consumers, producers = {}, {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
        for y in n.output:
            producers[y] = n
    outputs = {o.name for o in g.output}
    first = consumers.get("timestep", [])
    if not first:
        raise Refusal("nothing in the graph reads `timestep`")
    unsqueezes, chain, expands = [], [], []
    for node in first:
        axes = _unsqueeze_axes(g, node) if node.op_type == "Unsqueeze" else None
        if node.op_type != "Unsqueeze" or axes != [0] or node.input[0] != "timestep":
            how = f"{node.op_type} {node.name!r}" + (f" (axes {axes})" if node.op_type == "Unsqueeze" else "")
            raise Refusal(f"`timestep` is read by {how}; expected only Unsqueeze(axes=[0]) as diffusers' "
                          "`timesteps[None]` traces; refusing")
        unsqueezes.append(node)
        todo = [node.output[0]]
        while todo:  # every path from the [1] value must reach an Expand through Cast/Identity only
            value = todo.pop()
            if value in outputs:
                raise Refusal(f"`{value}` (timestep, unsqueezed) is a graph output; refusing")
            users = consumers.get(value, [])
            if not users:
                raise Refusal(f"`{value}` (timestep, unsqueezed) is read by nothing; unexpected, refusing")
            for user in users:
                if user.op_type in PASS_THROUGH and list(user.input) == [value]:
                    chain.append(user)
                    todo.append(user.output[0])
                elif user.op_type == "Expand" and user.input[0] == value:
                    if not _ancestors_read(g, user.input[1], producers, "sample"):
                        raise Refusal(f"Expand {user.name!r} does not expand to a shape taken from `sample`; "
                                      "refusing")
                    if _ancestors_read(g, user.input[1], producers, "timestep"):
                        raise Refusal(f"Expand {user.name!r}'s target shape depends on `timestep`; refusing")
                    expands.append(user)
                else:
                    raise Refusal(f"the unsqueezed timestep `{value}` is read by {user.op_type} {user.name!r} "
                                  f"(inputs {list(user.input)}); expected only {'/'.join(PASS_THROUGH)} on the "
                                  "way to an Expand to the batch; refusing")
    return unsqueezes, chain, expands


def rewrite(model):
    """Apply the rewrite to `model` (a ModelProto, changed in place); return a description of it."""
    unsqueezes, chain, expands = plan(model)
    g = model.graph
    removed, constants, rewired = [], [], []
    for node in unsqueezes:
        out = node.output[0]
        for n in g.node:
            for k, x in enumerate(n.input):
                if x == out:
                    n.input[k] = "timestep"
                    rewired.append(f"`{n.name}` ({n.op_type})")
        g.node.remove(node)
        removed.append(f"`{node.name or out}`")
        if len(node.input) > 1:  # the axes Constant, when nothing else reads it
            axes = node.input[1]
            if not any(axes in n.input for n in g.node) and not _subgraph_reads(g, axes):
                for n in list(g.node):
                    if n.op_type == "Constant" and list(n.output) == [axes]:
                        g.node.remove(n)
                        constants.append(f"`{n.name or axes}`")
    # Shapes recorded for the values between timestep and the Expand were [1]; they are now [B].
    stale = {n.output[0] for n in chain} | {n.output[0] for n in unsqueezes}
    for vi in [v for v in g.value_info if v.name in stale]:
        g.value_info.remove(vi)
    for i in g.input:
        if i.name == "timestep":
            shape = i.type.tensor_type.shape
            del shape.dim[:]
            shape.dim.add().dim_param = BATCH_DIM
    what = (f"removed {', '.join(removed)} (Unsqueeze(axes=[0]) of `timestep`)"
            + (f" and {', '.join(constants)} (its axes)" if constants else "")
            + f"; {', '.join(rewired)} now reads `timestep` directly, so that "
            f"{', '.join(f'`{n.name}`' for n in expands)} (Expand to `Shape(sample)[0]`) is a no-op")
    note = ("kiln models/tools/per_row_timestep.py: `timestep` declared [batch_size], one timestep per row "
            f"(was a scalar); {what}.")
    model.doc_string = (model.doc_string + "\n" if model.doc_string else "") + note
    for p in [p for p in model.metadata_props if p.key == METADATA_KEY]:
        model.metadata_props.remove(p)
    model.metadata_props.add(key=METADATA_KEY, value=what)
    return what


# ------------------------------------------------------------------------------------------------ verification


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _dims(value_info):
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def feeds_spec(model, onnx_path):
    """Shapes (without the batch) and dtypes of the inputs to feed, from the declared dims and configs."""
    cfg = _read_json(onnx_path.parent / "config.json")
    text_cfg = _read_json(onnx_path.parent.parent / "text_encoder" / "config.json")
    inputs = {i.name: i for i in model.graph.input}
    levels = len(cfg.get("block_out_channels", ()))
    if not levels:  # no config: count the down-sampling convolutions
        levels = 1 + sum(1 for n in model.graph.node if n.op_type == "Conv" and "downsamplers" in n.name)
    multiple = 2 ** (levels - 1)
    side = multiple * -(-8 // multiple)  # the smallest multiple >= 8
    spec = {}
    for name, vi in inputs.items():
        dims = _dims(vi)
        elem = vi.type.tensor_type.elem_type
        if name == "sample":
            channels = dims[1] if len(dims) == 4 and dims[1] else cfg.get("in_channels")
            if not channels:
                raise Refusal("cannot tell `sample`'s channels (no fixed dim, no in_channels in config.json)")
            spec[name] = ((channels, side, side), np.float32)
        elif name == "timestep":
            if elem not in (TensorProto.FLOAT, TensorProto.INT64):
                raise Refusal(f"`timestep` has element type {TensorProto.DataType.Name(elem)}; expected float or int64")
            spec[name] = ((), np.float32 if elem == TensorProto.FLOAT else np.int64)
        elif name == "encoder_hidden_states":
            seq = (dims[1] if len(dims) == 3 and dims[1] else None) or text_cfg.get("max_position_embeddings") or 77
            dim = (dims[2] if len(dims) == 3 and dims[2] else None) or cfg.get("cross_attention_dim")
            if not dim:
                raise Refusal("cannot tell encoder_hidden_states' width (no fixed dim, no cross_attention_dim)")
            spec[name] = ((seq, dim), np.float32)
        elif name == "timestep_cond":
            dim = (dims[1] if len(dims) == 2 and dims[1] else None) or cfg.get("time_cond_proj_dim")
            if not dim:
                raise Refusal("cannot tell timestep_cond's width (no fixed dim, no time_cond_proj_dim)")
            spec[name] = ((dim,), np.float32)
        else:
            raise Refusal(f"input `{name}` is not one of sample, timestep, encoder_hidden_states, timestep_cond: "
                          "this tool does not know how to feed it (not an SD 1.x/2.x/LCM/pix2pix UNet?)")
    for needed in ("sample", "encoder_hidden_states"):
        if needed not in spec:
            raise Refusal(f"the graph has no input `{needed}`: not an optimum Stable Diffusion UNet")
    return spec, side


def _session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def verify(original_path, rewritten_path, model, log):
    """Run both graphs; return {check: max abs difference}; raise Refusal if a check fails."""
    spec, side = feeds_spec(model, original_path)
    ts_dtype = spec["timestep"][1]
    rng = np.random.default_rng(0)
    batch = {name: rng.standard_normal((ROWS, *shape)).astype(dtype)
             for name, (shape, dtype) in spec.items() if name != "timestep"}
    steps = [999.0, 741.5, 260.25, 1.0] if ts_dtype == np.float32 else [999, 741, 260, 1]
    steps = np.asarray(steps[:ROWS], ts_dtype)
    out_name = model.graph.output[0].name
    log(f"  verifying on {ROWS} rows, latents {side}x{side}, inputs "
        + ", ".join(f"{n} {[ROWS, *s] if n != 'timestep' else [ROWS]}" for n, (s, _) in spec.items())
        + f", timesteps {steps.tolist()} (onnxruntime CPU)")
    original, rewritten = _session(original_path), _session(rewritten_path)

    def run_original(rows, t):
        return original.run([out_name], {**{k: v[rows] for k, v in batch.items()},
                                         "timestep": np.asarray(t, ts_dtype)})[0]

    def run_rewritten(rows, ts):
        return rewritten.run([out_name], {**{k: v[rows] for k, v in batch.items()},
                                          "timestep": np.asarray(ts, ts_dtype).reshape(-1)})[0]

    every = slice(0, ROWS)
    diffs = {}
    per_row = run_rewritten(every, steps)
    rows_alone = np.concatenate([run_original(slice(i, i + 1), steps[i]) for i in range(ROWS)])
    diffs["different timesteps vs each row alone"] = float(np.abs(per_row - rows_alone).max())
    at_first = run_original(every, steps[0])  # every row at row 0's timestep
    sensitivity = float(min(np.abs(rows_alone[i] - at_first[i]).max() for i in range(1, ROWS)))
    equal = run_rewritten(every, np.full(ROWS, steps[1], ts_dtype))
    diffs["equal timesteps vs original batch"] = float(np.abs(equal - run_original(every, steps[1])).max())
    for n in (1, 2):
        got = run_rewritten(slice(0, n), np.full(n, steps[2], ts_dtype))
        diffs[f"batch {n}, one timestep vs original"] = float(np.abs(got - run_original(slice(0, n), steps[2])).max())
    scale = float(np.abs(rows_alone).max())
    for k, v in diffs.items():
        log(f"  {k}: max |diff| {v:.3g} (<= {TOLERANCE:g}; outputs up to {scale:.3g})")
    log(f"  sensitivity: another row's timestep changes each row by >= {sensitivity:.3g} (> {MIN_SENSITIVITY:g})")
    bad = [k for k, v in diffs.items() if not v <= TOLERANCE]
    if bad:
        raise Refusal(f"verification failed ({', '.join(bad)}): the rewritten graph does not reproduce the "
                      "original; nothing written")
    if not sensitivity > MIN_SENSITIVITY:
        raise Refusal(f"verification proves nothing: the timestep changes the output by only {sensitivity:.3g}; "
                      "nothing written")
    return {**diffs, "sensitivity": sensitivity}


# ------------------------------------------------------------------------------------------------ files


def _external_files(model):
    files = set()
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            files.update(e.value for e in t.external_data if e.key == "location")
    return sorted(files)


def apply(path, out=None, check_only=False, log=print):
    """Rewrite the UNet at `path` (folder or .onnx) in place or to `out`; see the module docstring."""
    src = resolve(Path(path))
    model = onnx.load(str(src), load_external_data=False)
    rank = timestep_rank(model)
    if rank == 1:
        log(f"{src}: `timestep` is already rank 1 (one per row): already per row, nothing to do")
        return None
    log(f"{src}: `timestep` consumers: " + ", ".join(
        f"{n.op_type} {n.name!r}" for n in model.graph.node if "timestep" in n.input))
    what = rewrite(model)
    log(f"  rewrite: {what}")
    externals = _external_files(model)
    missing = [f for f in externals if not (src.parent / f).is_file()]
    if missing:
        raise Refusal(f"external data {missing} not beside {src.name} (graph-only model? write its weights first, "
                      "e.g. models/tools/fill_random_weights.py): cannot verify, nothing written")
    tmp = src.parent / f".{src.name}.per-row-timestep.tmp"
    try:
        onnx.save_model(model, str(tmp))
        onnx.checker.check_model(str(tmp))
        diffs = verify(src, tmp, model, log)
        worst = max(v for k, v in diffs.items() if k != "sensitivity")
        if check_only:
            summary = f"{src}: check only, per-row rewrite verified (max |diff| {worst:.3g}); nothing written"
        else:
            dest = Path(out) if out else src
            if dest.is_dir() or str(out).endswith(("/", os.sep)):
                dest = dest / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.parent.resolve() != src.parent.resolve():
                for f in externals:
                    if not (dest.parent / f).exists():
                        shutil.copy2(src.parent / f, dest.parent / f)
                        log(f"  copied external data {f} to {dest.parent}")
            shutil.move(tmp, dest)
            summary = (f"{dest}: timestep [] -> [{BATCH_DIM}] (one per row), verified with max |diff| {worst:.3g} "
                       f"on {ROWS} rows at different timesteps")
    finally:
        tmp.unlink(missing_ok=True)
    log(summary)
    return {"summary": summary, "what": what, "diffs": diffs, "max_diff": worst}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="an optimum export folder, its unet/ folder, or the UNet .onnx file")
    ap.add_argument("--out", help="write here (a file, or a folder: same file name) instead of in place")
    ap.add_argument("--check-only", action="store_true", help="rewrite and verify in memory; write nothing")
    args = ap.parse_args()
    try:
        apply(args.model, args.out, args.check_only)
    except Refusal as e:
        print(f"refused: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
