#!/usr/bin/env python3
"""A full-size Stable Diffusion 1.5-shaped pipeline for the GPU machine, without its weights.

The GPU figures of the diffusion benchmark (step time by batch at 512 px, worker ÷ raw) need a model
of real size, and no registry ships SD weights. This script builds the pipeline from SD 1.5's
configs (CLIP ViT-L/14 text encoder, the 860M-parameter UNet, the VAE) with random weights,
exports it with optimum in the layout kiln serves, and then keeps only the graphs: every large
tensor is moved to a `weights.bin` beside its `model.onnx`, and its place (offset, length, type,
shape, name) is written to `weights.json`. The result is a few MB (`sd15-random.tar.xz`);
`models/tools/fill_random_weights.py` writes the weights files on the GPU machine with numpy alone
(random weights made there), after which the folder is an ordinary kiln model.

    /work/fixture-venv/bin/python models/tools/make_sd15_shaped.py OUT_DIR

Needs the fixture venv (torch 2.15.0, diffusers 0.35.2, transformers 4.57.6, optimum 2.1.0,
optimum-onnx 0.1.0, onnx 1.23.2, onnxruntime 1.31.1, open_clip_torch 3.3.0), ~12 GB of disk and
~16 GB of memory; takes 10–20 minutes on 2 cores. Writes OUT_DIR/sd15-random/ (graphs, configs, tokenizer, manifest) and
OUT_DIR/sd15-random.tar.xz.

The UNet takes one timestep per batch row (`timestep` [batch_size], what step-level batching feeds):
right after the export, while the weights are still there, `per_row_timestep.apply` rewrites its graph
(removes the Unsqueeze(axes=[0]) on `timestep`; see models/tools/per_row_timestep.py) after checking it
with onnxruntime against the export (4 rows at different timesteps against each row alone). The
committed archive was rewritten that way afterwards, without re-exporting: unpacked, the UNet's weights
written with `fill_random_weights.py sd15-random/unet`, `per_row_timestep.py sd15-random` (every max
|diff| 0 on CPU), `weights.bin` deleted, repacked with `tarfile` as below (same members, same order; only
unet/model.onnx changed, 1,090,191 -> 1,090,547 bytes).
"""

import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clip_vocab  # noqa: E402
import per_row_timestep  # noqa: E402

# runwayml/stable-diffusion-v1-5's configs, key for key where it matters for shapes.
TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
           block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}
MANIFEST = """name = "sd15-random"
description = "Stable Diffusion 1.5's shapes with RANDOM weights (made on the machine that runs it), for GPU benchmarks"
licence = "Apache-2.0 (random weights); CLIP vocabulary MIT (OpenAI)"
origin = "models/tools/make_sd15_shaped.py (graphs), models/tools/fill_random_weights.py (weights)"

[pipeline]
kind = "diffusion"
"""
# Tensors at least this large leave the graph for weights.bin.
THRESHOLD = 1024


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def strip(model_path: Path):
    """Move every large initializer of model_path into weights.bin (then deleted) and describe it."""
    model = onnx.load(str(model_path), load_external_data=True)
    layout, offset = [], 0
    for tensor in model.graph.initializer:
        raw = onnx.numpy_helper.to_array(tensor)
        if raw.nbytes < THRESHOLD:
            continue
        layout.append({"name": tensor.name, "offset": offset, "length": raw.nbytes,
                       "dtype": str(raw.dtype), "shape": list(raw.shape)})
        tensor.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(field)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(raw.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        offset += raw.nbytes
    # The export's external data files (the part's config.json stays).
    for stale in model_path.parent.iterdir():
        if stale != model_path and stale.suffix != ".json":
            stale.unlink() if stale.is_file() else shutil.rmtree(stale)
    onnx.save_model(model, str(model_path))
    (model_path.parent / "weights.json").write_text(json.dumps({"file": "weights.bin", "bytes": offset,
                                                                "tensors": layout}))
    log(f"  {model_path.parent.name}: graph {model_path.stat().st_size / 1e6:.1f} MB, weights {offset / 1e9:.2f} GB "
        f"in {len(layout)} tensors")


def main(out: Path):
    from optimum.exporters.onnx import main_export

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        scratch = Path(scratch)
        tok = scratch / "tokenizer"
        clip_vocab.main(tok)
        t = time.time()
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)),
            tokenizer=CLIPTokenizer.from_pretrained(tok), unet=UNet2DConditionModel(**UNET),
            scheduler=PNDMScheduler.from_config(SCHEDULER), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.save_pretrained(scratch / "torch")
        del pipe
        log(f"built and saved in {time.time() - t:.0f} s")
        t = time.time()
        exported = scratch / "onnx"
        main_export(str(scratch / "torch"), output=str(exported), task="text-to-image", library_name="diffusers",
                    device="cpu", do_validation=False)
        log(f"exported in {time.time() - t:.0f} s")
        dest = out / "sd15-random"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(exported, dest)
    # One timestep per batch row; verified against the export with its weights, before they are moved out.
    per_row_timestep.apply(dest / "unet" / "model.onnx", log=log)
    for part in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        strip(dest / part / "model.onnx")
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    shutil.rmtree(dest / "tokenizer")
    clip_vocab.main(dest / "tokenizer")
    (dest / "manifest.toml").write_text(MANIFEST)
    archive = out / "sd15-random.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(dest, arcname="sd15-random")
    log(f"{archive}: {archive.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
