#!/usr/bin/env python3
"""Build kiln's tiny random-weight Stable Diffusion ONNX models and their PyTorch reference images.

What it makes (paths relative to the repository root)
    models/sd-tiny-random/       StableDiffusionPipeline (text-to-image, img2img), PNDM scheduler config
    models/pix2pix-tiny-random/  StableDiffusionInstructPix2PixPipeline (UNet in_channels 8)
    models/lcm-tiny-random/      LatentConsistencyModelPipeline (UNet with time_cond_proj_dim 32)
        each in optimum's ONNX Stable Diffusion layout: model_index.json, scheduler/scheduler_config.json,
        text_encoder/, tokenizer/, unet/, vae_decoder/, vae_encoder/ (model.onnx + config.json, weights
        inside the .onnx files), plus ORIGIN.md and LICENSE (manifest.toml is not written here).
        The text encoder, tokenizer and VAE files of pix2pix-tiny-random and lcm-tiny-random are byte
        copies of sd-tiny-random's.
    tests/data/diffusion/        cases.json, the reference PNGs, the input PNGs and README.md.

How
    Every part is built from a config in code with random weights (fixed torch seeds; a few weights are
    scaled so that the images are not flat and every request parameter visibly moves them, see
    `tune_*`), saved as diffusers pipelines with `save_pretrained` into a temporary folder outside the
    repository, and exported with `optimum.exporters.onnx.main_export` (optimum's own validation on).
    The scheduler configs are then overwritten with the upstream hub files' contents. The UNets of
    sd-tiny-random and pix2pix-tiny-random then get one timestep per batch row (`timestep` [batch_size]
    instead of a scalar) from `per_row_timestep.apply` (models/tools/per_row_timestep.py, which verifies
    the rewritten graph against the export before writing it); lcm-tiny-random's UNet keeps optimum's
    scalar `timestep` on purpose, so that kiln's path for exports that are not rewritten stays tested. The references
    are computed with diffusers' own PyTorch pipelines (float32, CPU) on the saved torch weights, with
    schedulers built by `<Scheduler>.from_pretrained(<exported model folder>, subfolder="scheduler")`.
    The script then re-renders every case with the ONNX files swapped in for the torch modules (same
    diffusers pipeline and scheduler code), checks the sensitivity of the images to each parameter, times
    the ONNX parts at 256x256 on onnxruntime's CPU provider, and exits 1 if a check fails.

Versions (the venv it was run with, outside the repository; CI never needs torch)
    Python 3.11.7, torch 2.15.0 (PyPI wheel, run on CPU), diffusers 0.35.2, transformers 4.57.6,
    optimum 2.1.0, optimum-onnx 0.1.0, onnx 1.23.2, onnxruntime 1.31.1, open_clip_torch 3.3.0 (for
    the CLIP vocabulary, via models/tools/clip_vocab.py), ftfy 6.3.1, pillow 13.0.0, numpy 2.4.6.
    Nothing is downloaded (HF_HUB_OFFLINE=1 is set here).

Usage (from the repository root)
    /work/fixture-venv/bin/python models/tools/make_tiny_diffusion.py [--keep-scratch]
Takes 2-3.5 minutes on 2 busy CPU cores (optimum exports ~1 min, torch references ~1.5 min, ONNX
re-renders ~10 s). Deterministic: a rerun with the same versions rewrites every file byte for byte.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata as md  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

warnings.filterwarnings("ignore")

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
DATA = REPO / "tests" / "data"
OUT = DATA / "diffusion"
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import clip_vocab  # noqa: E402
import per_row_timestep  # noqa: E402

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from diffusers.models.modeling_outputs import AutoencoderKLOutput  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

diffusers_logging.set_verbosity_error()
transformers_logging.set_verbosity_error()
diffusers_logging.disable_progress_bar()

# The scheduler configs exactly as the upstream hub files (key order kept).
SCHED_SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SCHED_PIX2PIX = {  # timbrooks/instruct-pix2pix scheduler/scheduler_config.json
    "_class_name": "EulerAncestralDiscreteScheduler",
    "_diffusers_version": "0.10.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "trained_betas": None,
}
SCHED_LCM = {  # SimianLuo/LCM_Dreamshaper_v7 scheduler/scheduler_config.json
    "_class_name": "LCMScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "lcm": LCMScheduler,
}

# Architecture (kept in one place so ORIGIN.md can print it).
TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 16, 16, 16],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
# Seeds of torch's global RNG before each part is built.
SEEDS = {"text_encoder": 0, "vae": 1, "unet-sd": 2, "unet-pix2pix": 3, "unet-lcm": 4}
# Weight scales applied after the random init (see tune_unet); with PyTorch's default init alone, two
# prompts differ by ~2.5 levels, image guidance 1.5 vs 1.0 by ~0.9 and LCM guidance 8 vs 2 by ~0.3.
UNET_SCALES = {
    "attn2.to_out.0": 4.0,  # every cross-attention output projection (weight, bias): text conditioning
    "conv_out": 3.0,  # the noise prediction's amplitude (weight, bias): guidance and schedulers differ more
    "time_emb_proj": 2.0,  # every ResNet's timestep-embedding projection (weight, bias)
    "time_embedding.cond_proj": 40.0,  # LCM only: timestep_cond (guidance embedding) projection (no bias)
    "conv_in[:, 4:]": 2.5,  # pix2pix only: conv_in weights of the 4 image-latent input channels
}
# The random VAE encoder gives posterior means of std ~0.17 and std devs ~0.9 (log-variance ~0): img2img
# would ignore its input image. Like a real SD VAE (mean * 0.18215 ~ unit variance, small posterior std):
VAE_MEAN_SCALE = 30.0  # quant_conv output channels 0-3 (the mean), weight and bias: mean std ~5
VAE_LOGVAR_SHIFT = -4.0  # added to quant_conv's bias of channels 4-7 (the log-variance): posterior std ~0.13

PROMPT = "a photo of an astronaut riding a horse on mars"
OTHER_PROMPT = "a red cube on a wooden table"
LONG_PROMPT = (
    "A highly detailed digital painting of an old lighthouse standing on a rocky cliff above a stormy sea at "
    "dusk, with towering waves crashing against the black rocks below, seagulls circling the beam of light, "
    "heavy purple and orange clouds rolling across the sky, rain streaking diagonally through the air, a small "
    "fishing boat with a red hull struggling through the swell in the distance, warm yellow light glowing from "
    "the keeper's cottage windows, wet grass bending in the wind along the narrow path that winds up the hill, "
    "a wooden fence half broken by the weather, dramatic lighting in the style of romantic nineteenth century "
    "landscape painters, intricate brushwork, rich textures, cinematic composition, wide angle view, ultra "
    "sharp focus and vivid colors"
)
NON_ASCII_PROMPT = "東京の夜景、café crème – “naïve” ﬁsh"

PIPELINE_CLASSES = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionImg2ImgPipeline": StableDiffusionImg2ImgPipeline,
    "StableDiffusionInstructPix2PixPipeline": StableDiffusionInstructPix2PixPipeline,
    "LatentConsistencyModelPipeline": LatentConsistencyModelPipeline,
}


def case(name, model, task, pipeline, scheduler, prompt=PROMPT, negative_prompt=None, steps=10, guidance_scale=7.5,
         image_guidance_scale=None, strength=None, seed=42, width=64, height=64, image=None):
    return {
        "name": name, "model": model, "task": task, "prompt": prompt, "negative_prompt": negative_prompt,
        "steps": steps, "guidance_scale": guidance_scale, "image_guidance_scale": image_guidance_scale,
        "strength": strength, "seed": seed, "width": width, "height": height, "scheduler": scheduler,
        "image": image, "reference": f"diffusion/{name}.png", "pipeline": pipeline,
    }


SD, P2P, LCM = "sd-tiny-random", "pix2pix-tiny-random", "lcm-tiny-random"
# UNets rewritten to take one timestep per batch row (models/tools/per_row_timestep.py); LCM's stays scalar.
PER_ROW_TIMESTEP = (SD, P2P)
T2I, I2I, EDIT = "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInstructPix2PixPipeline"
ASTRONAUT, CHELSEA = "diffusion/astronaut-64x64.png", "diffusion/chelsea-64x64.png"
CASES = [
    case("t2i-euler", SD, "text_to_image", T2I, "euler"),
    case("t2i-euler-ancestral", SD, "text_to_image", T2I, "euler_ancestral"),
    case("t2i-ddim", SD, "text_to_image", T2I, "ddim"),
    case("t2i-lcm", SD, "text_to_image", T2I, "lcm", steps=4, guidance_scale=1.0),
    case("t2i-euler-no-guidance", SD, "text_to_image", T2I, "euler", guidance_scale=1.0),
    case("t2i-negative", SD, "text_to_image", T2I, "euler", negative_prompt="blurry, low quality"),
    case("t2i-non-square", SD, "text_to_image", T2I, "euler", width=96, height=64),
    case("t2i-tall", SD, "text_to_image", T2I, "euler", width=64, height=128),
    case("t2i-long-prompt", SD, "text_to_image", T2I, "euler", prompt=LONG_PROMPT),
    case("t2i-non-ascii", SD, "text_to_image", T2I, "euler", prompt=NON_ASCII_PROMPT),
    case("i2i-euler", SD, "image_to_image", I2I, "euler", strength=0.6, image=ASTRONAUT,
         prompt="a painting of an astronaut, oil on canvas"),
    case("i2i-ddim", SD, "image_to_image", I2I, "ddim", strength=0.8, image=CHELSEA, seed=5,
         prompt="a tiger in the jungle"),
    case("edit", P2P, "edit", EDIT, "euler_ancestral", image_guidance_scale=1.5, image=CHELSEA,
         prompt="make it look like a watercolour"),
    case("edit-again", P2P, "edit", EDIT, "euler", image_guidance_scale=1.5, image="diffusion/edit.png", seed=7,
         prompt="turn it into a night scene with stars"),
    case("edit-no-guidance", P2P, "edit", EDIT, "euler_ancestral", guidance_scale=1.0, image_guidance_scale=1.5,
         image=ASTRONAUT, prompt="make it look like a watercolour"),
    case("lcm-distilled", LCM, "text_to_image", "LatentConsistencyModelPipeline", "lcm", steps=4,
         guidance_scale=8.0, seed=3),
]
# Extra renders that are not cases, only for the sensitivity checks: (name, base case, overrides).
VARIANTS = [
    ("seed-43", "t2i-euler", {"seed": 43}),
    ("other-prompt", "t2i-euler", {"prompt": OTHER_PROMPT}),
    ("edit-image-guidance-1.0", "edit", {"image_guidance_scale": 1.0}),
    ("lcm-distilled-guidance-2.0", "lcm-distilled", {"guidance_scale": 2.0}),
    ("i2i-euler-chelsea", "i2i-euler", {"image": CHELSEA}),
    ("edit-astronaut", "edit", {"image": ASTRONAUT}),
]


def log(*a):
    print(*a, flush=True)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------- parts


def make_text_encoder():
    torch.manual_seed(SEEDS["text_encoder"])
    return CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)).eval()


def make_vae():
    torch.manual_seed(SEEDS["vae"])
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    with torch.no_grad():
        vae.quant_conv.weight[:4].mul_(VAE_MEAN_SCALE)
        vae.quant_conv.bias[:4].mul_(VAE_MEAN_SCALE)
        vae.quant_conv.bias[4:].add_(VAE_LOGVAR_SHIFT)
    return vae


def make_unet(seed_key, **overrides):
    torch.manual_seed(SEEDS[seed_key])
    unet = UNet2DConditionModel(**{**UNET_CONFIG, **overrides}).eval()
    tune_unet(unet)
    return unet


@torch.no_grad()
def tune_unet(unet):
    """Scale weights by UNET_SCALES so that each request parameter visibly moves the image."""
    for name, module in unet.named_modules():
        for suffix in ("attn2.to_out.0", "conv_out", "time_emb_proj", "time_embedding.cond_proj"):
            if name == suffix or name.endswith("." + suffix):
                module.weight.mul_(UNET_SCALES[suffix])
                if module.bias is not None:
                    module.bias.mul_(UNET_SCALES[suffix])
    if unet.config.in_channels == 8:
        unet.conv_in.weight[:, 4:].mul_(UNET_SCALES["conv_in[:, 4:]"])


def scheduler_from(cfg):
    cls = {"PNDMScheduler": PNDMScheduler, "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
           "LCMScheduler": LCMScheduler}[cfg["_class_name"]]
    return cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})


def save_torch_pipelines(scratch):
    tok_dir = scratch / "clip-tokenizer"
    clip_vocab.main(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder, vae = make_text_encoder(), make_vae()
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    pipes = {
        SD: StableDiffusionPipeline(unet=make_unet("unet-sd"), scheduler=scheduler_from(SCHED_SD15), **common),
        P2P: StableDiffusionInstructPix2PixPipeline(unet=make_unet("unet-pix2pix", in_channels=8),
                                                    scheduler=scheduler_from(SCHED_PIX2PIX), **common),
        LCM: LatentConsistencyModelPipeline(unet=make_unet("unet-lcm", time_cond_proj_dim=32),
                                            scheduler=scheduler_from(SCHED_LCM), **common),
    }
    dirs = {}
    for name, pipe in pipes.items():
        dirs[name] = scratch / "torch" / name
        pipe.save_pretrained(dirs[name], safe_serialization=True)
    return dirs, tok_dir


# ---------------------------------------------------------------------------------------------------- export


def export(torch_dir, scratch, name):
    from optimum.exporters.onnx import main_export

    out = scratch / "onnx" / name
    t = time.time()
    main_export(str(torch_dir), output=str(out), task="text-to-image", library_name="diffusers", device="cpu",
                do_validation=True)
    log(f"  exported {name} with optimum main_export in {time.time() - t:.0f} s")
    leftovers = [p for p in out.rglob("*") if p.is_file() and (p.name.endswith(".data") or "_data" in p.name)]
    for onnx_path in out.rglob("*.onnx"):  # weights must live inside the .onnx files
        import onnx

        m = onnx.load(str(onnx_path), load_external_data=True)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer) or leftovers:
            onnx.save_model(m, str(onnx_path), save_as_external_data=False)
            log(f"  repacked {onnx_path} without external data")
    for p in leftovers:
        p.unlink()
    return out


def install(exported, name, sd_dir, sched_cfg, tok_dir, torch_root):
    """Move an export into models/<name>, keeping a manifest.toml that the lead wrote there."""
    dest = MODELS / name
    keep = {}
    if dest.exists():
        for k in ("manifest.toml",):
            if (dest / k).exists():
                keep[k] = (dest / k).read_bytes()
        shutil.rmtree(dest)
    shutil.copytree(exported, dest)
    for k, v in keep.items():
        (dest / k).write_bytes(v)
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2) + "\n")
    for cfg in dest.rglob("*.json"):  # "_name_or_path": the scratch folder -> "<model>/<part>"
        text = cfg.read_text()
        if str(torch_root) in text:
            cfg.write_text(text.replace(str(torch_root) + os.sep, ""))
    shutil.rmtree(dest / "tokenizer")
    shutil.copytree(tok_dir, dest / "tokenizer")  # exactly clip_vocab.py's files
    if sd_dir is not None:  # shared parts: byte copies of sd-tiny-random's
        for part in ("text_encoder", "tokenizer", "vae_decoder", "vae_encoder"):
            same = all(sha256(f) == sha256(sd_dir / part / f.name) for f in (dest / part).iterdir())
            log(f"  {name}/{part}: export {'byte-identical to' if same else 'differs from'} sd-tiny-random's; copying")
            shutil.rmtree(dest / part)
            shutil.copytree(sd_dir / part, dest / part)
    return dest


def onnx_io(model_dir):
    io = {}
    for part in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        s = ort.InferenceSession(str(model_dir / part / "model.onnx"), providers=["CPUExecutionProvider"])
        io[part] = (
            [(i.name, i.type, i.shape) for i in s.get_inputs()],
            [(o.name, o.type, o.shape) for o in s.get_outputs()],
        )
    return io


# ---------------------------------------------------------------------------------------------------- renders


class DrawLog:
    """Records every torch.randn call that is given a generator (diffusers' randn_tensor), in order."""

    def __init__(self):
        self.draws = None
        self._orig = torch.randn

    def __enter__(self):
        self.draws = []
        orig = self._orig

        def randn(*args, **kwargs):
            out = orig(*args, **kwargs)
            if kwargs.get("generator") is not None:
                self.draws.append({"shape": list(out.shape), "first4": [float(v) for v in out.flatten()[:4]]})
            return out

        torch.randn = randn
        return self

    def __exit__(self, *exc):
        torch.randn = self._orig


def first4(t):
    return [float(v) for v in t.detach().flatten()[:4]]


def tokenizer_without_ftfy(folder):
    """transformers' CLIPTokenizer decides in __init__: `import ftfy` succeeding sets self.fix_text =
    ftfy.fix_text, an ImportError sets fix_text = None and self.nlp = BasicTokenizer(strip_accents=False,
    do_split_on_punc=False). Setting sys.modules['ftfy'] = None makes that import raise ImportError."""
    saved = sys.modules.get("ftfy")
    sys.modules["ftfy"] = None
    try:
        tok = CLIPTokenizer.from_pretrained(folder)
    finally:
        if saved is not None:
            sys.modules["ftfy"] = saved
        else:
            del sys.modules["ftfy"]
    assert tok.fix_text is None
    return tok


def load_pipeline(cls_name, torch_dir):
    pipe = PIPELINE_CLASSES[cls_name].from_pretrained(torch_dir, safety_checker=None, requires_safety_checker=False,
                                                      torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def use_onnx(pipe, model_dir):
    """Swap the torch modules' forward passes for the exported ONNX files (same pipeline and scheduler code)."""
    opts = ort.SessionOptions()
    sess = {p: ort.InferenceSession(str(model_dir / p / "model.onnx"), opts, providers=["CPUExecutionProvider"])
            for p in ("text_encoder", "unet", "vae_encoder", "vae_decoder")}
    unet_inputs = {i.name for i in sess["unet"].get_inputs()}
    per_row = any(i.name == "timestep" and len(i.shape) == 1 for i in sess["unet"].get_inputs())

    def text_encoder(input_ids, attention_mask=None, **kw):
        out = sess["text_encoder"].run(["last_hidden_state"], {"input_ids": input_ids.numpy().astype(np.int64)})
        return (torch.from_numpy(out[0]),)

    def unet(sample, timestep, encoder_hidden_states, timestep_cond=None, return_dict=True, **kw):
        t = np.asarray(float(timestep), dtype=np.float32)  # rank 0, or one per row after per_row_timestep.py
        feed = {"sample": sample.numpy().astype(np.float32),
                "timestep": np.full(sample.shape[0], t, np.float32) if per_row else t,
                "encoder_hidden_states": encoder_hidden_states.numpy().astype(np.float32)}
        if "timestep_cond" in unet_inputs:
            feed["timestep_cond"] = timestep_cond.numpy().astype(np.float32)
        return (torch.from_numpy(sess["unet"].run(["out_sample"], feed)[0]),)

    def vae_decode(z, return_dict=True, generator=None):
        return (torch.from_numpy(sess["vae_decoder"].run(["sample"], {"latent_sample": z.numpy()})[0]),)

    def vae_encode(x, return_dict=True):
        params = sess["vae_encoder"].run(["latent_parameters"], {"sample": x.numpy().astype(np.float32)})[0]
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(torch.from_numpy(params)))

    pipe.text_encoder.forward = text_encoder
    pipe.unet.forward = unet
    pipe.vae.decode = vae_decode
    pipe.vae.encode = vae_encode
    return pipe


def render(pipe, c, model_dir, prompt_embeds=None, record=None):
    """Run one case through a diffusers pipeline; fill `record` with what a reimplementer may need."""
    pipe.scheduler = SCHEDULERS[c["scheduler"]].from_pretrained(model_dir, subfolder="scheduler")
    kw = dict(num_inference_steps=c["steps"], guidance_scale=c["guidance_scale"],
              generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="pil")
    if prompt_embeds is not None:
        kw["prompt_embeds"] = prompt_embeds
    else:
        kw["prompt"] = c["prompt"]
    if c["negative_prompt"] is not None:
        kw["negative_prompt"] = c["negative_prompt"]
    if c["task"] == "text_to_image":
        kw.update(width=c["width"], height=c["height"])
    else:
        kw["image"] = Image.open(DATA / c["image"]).convert("RGB")
    if c["task"] == "image_to_image":
        kw["strength"] = c["strength"]
    if c["task"] == "edit":
        kw["image_guidance_scale"] = c["image_guidance_scale"]
    if c["scheduler"] == "ddim":
        kw["eta"] = 0.0

    steps, unet_calls, prepared = [], [], []
    is_lcm_pipe = isinstance(pipe, LatentConsistencyModelPipeline)

    def on_step(p, i, t, tensors):
        steps.append({"t": float(t), "latents": tensors["latents"].clone(),
                      "denoised": tensors["denoised"].clone() if is_lcm_pipe else None})
        return tensors

    kw["callback_on_step_end"] = on_step
    kw["callback_on_step_end_tensor_inputs"] = ["latents", "denoised"] if is_lcm_pipe else ["latents"]

    def unet_hook(module, args, kwargs, out):
        if not unet_calls:
            sample = args[0] if args else kwargs["sample"]
            unet_calls.append({"sample": first4(sample[0]), "batch": int(sample.shape[0]),
                               "channels": int(sample.shape[1]), "out": first4(out[0][0]),
                               "timestep_cond": first4(kwargs["timestep_cond"][0])
                               if kwargs.get("timestep_cond") is not None else None})
        else:
            unet_calls.append(None)

    hook = pipe.unet.register_forward_hook(unet_hook, with_kwargs=True)
    orig_prepare = pipe.prepare_latents

    def prepare_latents(*a, **k):
        out = orig_prepare(*a, **k)
        prepared.append(out[0] if isinstance(out, tuple) else out)
        return out

    pipe.prepare_latents = prepare_latents
    try:
        with DrawLog() as draws:
            image = pipe(**kw).images[0]
    finally:
        hook.remove()
        del pipe.prepare_latents
    if record is not None:
        sch = pipe.scheduler
        final = steps[-1]["denoised"] if is_lcm_pipe else steps[-1]["latents"]
        record.update({
            "timesteps": [s["t"] for s in steps],
            "unet_calls": len(unet_calls),
            "unet_batch": unet_calls[0]["batch"],
            "unet_in_channels": unet_calls[0]["channels"],
            "init_noise_sigma": float(sch.init_noise_sigma),
            "rng_draws": draws.draws,
            "initial_latents_first4": first4(prepared[0]),
            "first_unet_input_first4": unet_calls[0]["sample"],
            "first_unet_output_first4": unet_calls[0]["out"],
            "final_latents_first4": first4(final),
        })
        if hasattr(sch, "sigmas") and c["scheduler"] in ("euler", "euler_ancestral"):
            record["sigmas"] = [float(s) for s in sch.sigmas]
        if unet_calls[0]["timestep_cond"] is not None:
            record["timestep_cond_first4"] = unet_calls[0]["timestep_cond"]
    return image


def ids_of(tok, text):
    return tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids


def to_np(img):
    return np.asarray(img.convert("RGB")).astype(np.float64)


def diff(a, b):
    d = np.abs(to_np(a) - to_np(b))
    return float(d.mean()), float(d.max())


# ---------------------------------------------------------------------------------------------------- docs


NOTES = {
    "text_to_image": "latents = randn(generator, [1,4,H/8,W/8]) * init_noise_sigma; each step: x_in = "
                     "scheduler.scale_model_input(cat([latents]*rows), t); with guidance rows are "
                     "[negative_or_empty, prompt] and eps = uncond + g*(text - uncond); image = "
                     "vae_decoder(latents / 0.18215), (x/2+0.5).clamp(0,1), *255, round.",
    "image_to_image": "image -> [-1,1] -> vae_encoder -> latent_parameters [1,8,h,w]; mean, logvar = chunk(2, dim=1);"
                      " logvar clamped to [-30,20]; init = (mean + exp(0.5*logvar) * randn_1) * 0.18215; "
                      "latents = scheduler.add_noise(init, randn_2, timesteps[0]); the loop runs the last "
                      "int(steps*strength) timesteps.",
    "edit": "image_latents = vae_encoder mean (argmax, NOT scaled by 0.18215); latents = randn * init_noise_sigma;"
            " UNet input = cat([scale_model_input(latents), image_latents]) along channels (8); with guidance rows"
            " are [prompt+image, empty+image, empty+zeros] and eps = uncond + g*(text - image) + ig*(image - uncond);"
            " guidance_scale <= 1 gives one row [prompt+image].",
    "lcm": "LatentConsistencyModelPipeline: one row, no negative prompt; timestep_cond = "
           "guidance-scale embedding of w = (guidance_scale - 1) * 1000 (dim 32: [sin(w*f), cos(w*f)], f_k = "
           "exp(-k*ln(10000)/15), k=0..15); the image is decoded from the scheduler's `denoised` of the last step.",
}


def write_origin(model_dir, name, io, torch_dir, rewrite=None):
    unet_cfg = json.loads((model_dir / "unet" / "config.json").read_text())
    what = {
        SD: "a tiny StableDiffusionPipeline (text-to-image and img2img) with random weights",
        P2P: "a tiny StableDiffusionInstructPix2PixPipeline (UNet in_channels 8: noisy latents + image latents) "
             "with random weights",
        LCM: "a tiny latent-consistency (LCM) pipeline: UNet with time_cond_proj_dim "
             f"{unet_cfg.get('time_cond_proj_dim')} (input `timestep_cond`), random weights",
    }[name]
    sched = {SD: "runwayml/stable-diffusion-v1-5's (PNDMScheduler)",
             P2P: "timbrooks/instruct-pix2pix's (EulerAncestralDiscreteScheduler)",
             LCM: "SimianLuo/LCM_Dreamshaper_v7's (LCMScheduler)"}[name]
    lines = [
        f"# {name}: origin, licence, interface",
        "",
        f"{what[0].upper() + what[1:]}, in optimum's ONNX Stable Diffusion layout. It exists to test kiln's "
        "diffusion code paths: **the weights are random, the images are meaningless** (but every request "
        "parameter visibly changes them). Nothing was trained or downloaded.",
        "",
        "## How it was made",
        "",
        "`models/tools/make_tiny_diffusion.py` (run from the repository root with the venv named there) builds "
        "every part from a config in code with fixed torch seeds, saves the diffusers pipeline with "
        "`save_pretrained` (outside the repository) and exports it with `optimum.exporters.onnx.main_export("
        "task=\"text-to-image\", library_name=\"diffusers\")` (torch.onnx TorchScript exporter, opset "
        f"{opset_of(model_dir / 'unet' / 'model.onnx')}, optimum's validation on). Weights are inside the `.onnx` files.",
        "",
        f"- versions: {versions_line()}",
        f"- text encoder: CLIPTextModel {json.dumps(TEXT_ENCODER_CONFIG)}",
        f"- VAE: AutoencoderKL {json.dumps(VAE_CONFIG)} (down-sampling factor 8; latents H/8 x W/8)",
        f"- UNet: UNet2DConditionModel {json.dumps({k: unet_cfg[k] for k in ['in_channels', 'out_channels', 'down_block_types', 'up_block_types', 'block_out_channels', 'layers_per_block', 'cross_attention_dim', 'attention_head_dim', 'norm_num_groups', 'sample_size', 'time_cond_proj_dim']})}"
        " (one down-sampling stage: latent sides must be even, image sides multiples of 16; default 64x64 px)",
        f"- torch seeds: {json.dumps(SEEDS)}; after PyTorch's default init these UNet weights are scaled "
        f"(module name suffix: factor) so that every request parameter visibly moves the image: "
        f"{json.dumps(UNET_SCALES)} (cond_proj only exists in the LCM UNet, the image channels of conv_in only in "
        "pix2pix's); the VAE's `quant_conv` (the encoder's last layer) has its mean channels (0-3) scaled by "
        f"{VAE_MEAN_SCALE} and {VAE_LOGVAR_SHIFT} added to its log-variance channels' bias (4-7), so that "
        "latents look like a real SD VAE's (mean std ~5 before the 0.18215 scaling, posterior std ~0.13).",
        "- tokenizer/: written by `models/tools/clip_vocab.py` (OpenAI CLIP's BPE vocabulary as open_clip_torch "
        "3.3.0 ships it); load it with transformers' `CLIPTokenizer` (with ftfy installed).",
        f"- scheduler/scheduler_config.json: overwritten with {sched} hub file, key for key, so that schedulers "
        "built from it take their own defaults for missing keys.",
        "- model_index.json: as optimum writes it (the torch pipeline's: it names `vae`, the folders are "
        "`vae_encoder` and `vae_decoder`).",
    ]
    if name != SD:
        lines.append("- text_encoder/, tokenizer/, vae_encoder/, vae_decoder/: byte copies of "
                     "`models/sd-tiny-random/`'s (same weights).")
    if name == P2P:
        lines.append("- unet/: exported by optimum's own pipeline export (its UNet ONNX config takes `in_channels` "
                     "from the UNet config, so `sample` has 8 channels); no special handling was needed.")
    if name == LCM:
        lines.append("- unet/: exported by optimum's own pipeline export; optimum's UNet ONNX config adds the input "
                     "`timestep_cond` when the UNet config has `time_cond_proj_dim`.")
    if rewrite is not None:
        lines.append(f"- unet/model.onnx: one timestep per batch row, by `python models/tools/per_row_timestep.py "
                     f"models/{name}` (run by the script after the export): {rewrite['what']}; `timestep` is declared "
                     "`[batch_size]` instead of a scalar (step-level batching puts rows at different denoising steps "
                     "in one UNet call). Verified with onnxruntime before writing: 4 rows at different timesteps "
                     "against each row run alone through the export with its scalar timestep, then equal timesteps "
                     f"and batches of 1 and 2: max |diff| {rewrite['max_diff']:g} (at most 1e-5 required).")
    elif name == LCM:
        lines.append("- unet/model.onnx: `timestep` is left a scalar, as optimum exports it, ON PURPOSE: "
                     "`models/tools/per_row_timestep.py` would rewrite it (it passes `--check-only`), but kiln's path "
                     "for exports that are not rewritten (rows batched only at equal timesteps) is tested with this "
                     "model.")
    lines += ["", "## Interface (onnxruntime 1.31.1)", "", "| part | inputs | outputs |", "| --- | --- | --- |"]
    for part, (ins, outs) in io.items():
        fmt = lambda xs: "<br>".join(f"`{n}` {t.replace('tensor(', '').rstrip(')')} {s}" for n, t, s in xs)  # noqa
        lines.append(f"| {part} | {fmt(ins)} | {fmt(outs)} |")
    per_row = rewrite is not None
    lines += ["", ("`timestep` is float32 `[batch_size]`, one value per row (rewritten, see above); " if per_row else
                   "`timestep` is a float32 scalar (rank 0), one value for the whole batch; ") +
              "`vae_encoder`'s `latent_parameters` are the posterior's mean and log-variance (4 + 4 channels). "
              "The VAE's scaling_factor is 0.18215 (vae_decoder/config.json).", "",
              "## Files", "", "| file | bytes | sha256 |", "| --- | --- | --- |"]
    written_here = ("ORIGIN.md", "LICENSE", "manifest.toml")  # LICENSE: a rerun would find the previous run's
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name not in written_here):
        lines.append(f"| `{f.relative_to(model_dir)}` | {f.stat().st_size} | `{sha256(f)}` |")
    lines += ["", "## Licence", "", "Apache-2.0 (see [`LICENSE`](LICENSE)); the vocabulary is OpenAI CLIP's (MIT).", ""]
    (model_dir / "ORIGIN.md").write_text("\n".join(lines))
    (model_dir / "LICENSE").write_text(
        f"{name}: random weights made by the kiln project with models/tools/make_tiny_diffusion.py.\n"
        "Licensed under the Apache License, Version 2.0 (https://www.apache.org/licenses/LICENSE-2.0).\n"
        "\n"
        "tokenizer/vocab.json and tokenizer/merges.txt: OpenAI CLIP's BPE vocabulary,\n"
        "Copyright (c) 2021 OpenAI, MIT License (https://github.com/openai/CLIP/blob/main/LICENSE).\n"
    )


def opset_of(path):
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def versions_line():
    pk = ["torch", "diffusers", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "open_clip_torch",
          "ftfy", "pillow", "numpy"]
    vs = []
    for p in pk:
        try:
            vs.append(f"{p} {md.version(p)}")
        except md.PackageNotFoundError:
            vs.append(f"{p} (absent)")
    return f"Python {sys.version.split()[0]}, " + ", ".join(vs)


def write_readme(cases):
    rows = []
    for c in cases:
        extra = []
        if c["negative_prompt"]:
            extra.append(f"negative \"{c['negative_prompt']}\"")
        if c["strength"] is not None:
            extra.append(f"strength {c['strength']}")
        if c["image_guidance_scale"] is not None:
            extra.append(f"image guidance {c['image_guidance_scale']}")
        if c["image"]:
            extra.append(f"input `{c['image'].split('/')[-1]}`")
        rows.append(f"| `{c['name']}` | {c['model']} | {c['pipeline']} | {c['scheduler']} | {c['steps']} | "
                    f"{c['guidance_scale']} | {c['seed']} | {c['width']}x{c['height']} | {', '.join(extra)} |")
    text = f"""# Diffusion test data

Reference images for kiln's Stable Diffusion pipelines, computed with **diffusers' own PyTorch pipelines**
(float32, CPU, `generator=torch.Generator("cpu").manual_seed(seed)`, `output_type="pil"`, no safety checker) on
the torch weights that were exported to `models/sd-tiny-random`, `models/pix2pix-tiny-random` and
`models/lcm-tiny-random` (random weights). Each scheduler was built with
`<Scheduler>.from_pretrained(models/<model>, subfolder="scheduler")`, i.e. from the scheduler_config.json
on disk: `euler` = EulerDiscreteScheduler, `euler_ancestral` = EulerAncestralDiscreteScheduler, `ddim` =
DDIMScheduler (eta 0), `lcm` = LCMScheduler.

Regenerate (models and this folder together; takes a few minutes on 2 cores):

    /work/fixture-venv/bin/python models/tools/make_tiny_diffusion.py

Versions: {versions_line()}.

## Files

- `cases.json`: one object per case: `name`, `model`, `task` (`text_to_image`, `image_to_image`, `edit`),
  `prompt`, `negative_prompt`, `steps`, `guidance_scale`, `image_guidance_scale`, `strength`, `seed`,
  `width`, `height`, `scheduler`, `image` (input, relative to tests/data), `reference` (relative to
  tests/data), `prompt_ids` (the 77 ids the pipeline's CLIPTokenizer gave, ftfy installed),
  `negative_prompt_ids` (ids of the unconditional row: the negative prompt or ""; only when there are
  guidance rows), `pipeline` (the diffusers class). Recorded from the run, for reimplementers:
  `timesteps` (what the pipeline passed to the UNet, in order), `sigmas` (Euler schedulers),
  `init_noise_sigma`, `unet_calls`, `unet_batch` (rows per call), `unet_in_channels`,
  `rng_draws` (every draw from the seeded generator in order: shape and first 4 values),
  `initial_latents_first4` (what `prepare_latents` returned), `first_unet_input_first4` (row 0 of the
  first UNet call), `first_unet_output_first4`, `final_latents_first4` (what was decoded, times
  0.18215), `timestep_cond_first4` (LCM), `notes`, and for the long prompt `truncated` and
  `untruncated_token_count`; for the non-ASCII prompt `prompt_ids_without_ftfy` and
  `reference_without_ftfy` (the same case rendered from the ids transformers' CLIPTokenizer gives when
  ftfy is not importable: `CLIPTokenizer` then cleans text with a BasicTokenizer instead of
  `ftfy.fix_text`), and `onnx_check`: the mean and max absolute difference (levels of 255) between the
  reference and the same pipeline run with the ONNX files swapped in for the torch modules.
- `<case>.png`: the references. `astronaut-64x64.png`, `chelsea-64x64.png`: inputs, `../astronaut-256.png`
  and `../chelsea-256x256.png` resized with Pillow's LANCZOS to 64x64 (the pipelines then do no resizing).
  `edit-again` edits `edit.png` (an edit chain).

| case | model | pipeline | scheduler | steps | guidance | seed | size (WxH) | other |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
""" + "\n".join(rows) + """

Long prompts are truncated the way the pipeline's tokenizer does it (`truncation=True, max_length=77`): the
start token, the first 75 tokens of the text, the end token. Unconditional rows use the ids of "" padded
with 49407 (`<|endoftext|>`).

The weights are random and made by this project (Apache-2.0); the input photos are described in
`../README.md` (NASA, public domain; chelsea, CC0). Other files in this folder are made by other scripts
(see their own docstrings); this script only writes the files listed above.
"""
    (OUT / "README.md").write_text(text)


# ---------------------------------------------------------------------------------------------------- main


def time_parts(model_dir):
    opts = ort.SessionOptions()
    s = {p: ort.InferenceSession(str(model_dir / p / "model.onnx"), opts, providers=["CPUExecutionProvider"])
         for p in ("text_encoder", "unet", "vae_decoder")}
    rng = np.random.default_rng(0)
    ids = np.full((2, 77), 49407, np.int64)
    ids[:, 0] = 49406
    per_row = any(i.name == "timestep" and len(i.shape) == 1 for i in s["unet"].get_inputs())
    feeds = {
        "text_encoder": {"input_ids": ids},
        "unet": {"sample": rng.standard_normal((2, 4, 32, 32), np.float32),
                 "timestep": np.full(2, 500.0, np.float32) if per_row else np.asarray(500.0, np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 77, 32), np.float32)},
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 32, 32), np.float32)},
    }
    out = {}
    for p in s:
        s[p].run(None, feeds[p])
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            s[p].run(None, feeds[p])
            ts.append(time.perf_counter() - t)
        out[p] = float(np.median(ts))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep-scratch", action="store_true", help="keep the temporary torch/ONNX folders")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="kiln-tiny-diffusion-"))
    log(f"scratch: {scratch}")
    failures = []
    try:
        # 1. parts -> torch pipelines -> ONNX
        torch_dirs, tok_dir = save_torch_pipelines(scratch)
        model_dirs, rewrites = {}, {}
        for name, sched in ((SD, SCHED_SD15), (P2P, SCHED_PIX2PIX), (LCM, SCHED_LCM)):
            exported = export(torch_dirs[name], scratch, name)
            model_dirs[name] = install(exported, name, model_dirs.get(SD), sched, tok_dir, scratch / "torch")
            if name in PER_ROW_TIMESTEP:  # raises per_row_timestep.Refusal (nothing written) if it does not verify
                rewrites[name] = per_row_timestep.apply(model_dirs[name] / "unet" / "model.onnx", log=log)
        t_export = time.time() - t0
        ios = {}
        for name, d in model_dirs.items():
            ios[name] = onnx_io(d)
            log(f"\n{name} ONNX interface:")
            for part, (ins, outs) in ios[name].items():
                log(f"  {part}: in {ins} -> out {outs}")

        # 2. inputs
        OUT.mkdir(parents=True, exist_ok=True)  # shared with other scripts' files: only overwrite ours
        for src, dst in (("astronaut-256.png", ASTRONAUT), ("chelsea-256x256.png", CHELSEA)):
            Image.open(DATA / src).convert("RGB").resize((64, 64), Image.LANCZOS).save(DATA / dst)

        # 3. references with the torch pipelines
        t1 = time.time()
        pipes = {}

        def pipe_for(c):
            key = (c["pipeline"], c["model"])
            if key not in pipes:
                pipes[key] = load_pipeline(c["pipeline"], torch_dirs[c["model"]])
            return pipes[key]

        images, cases_out = {}, []
        for c in CASES:
            pipe = pipe_for(c)
            tok = pipe.tokenizer
            rec = dict(c)
            rec["prompt_ids"] = ids_of(tok, c["prompt"])
            full = tok(c["prompt"]).input_ids
            if len(full) > tok.model_max_length:
                rec["truncated"] = True
                rec["untruncated_token_count"] = len(full)
            images[c["name"]] = render(pipe, c, model_dirs[c["model"]], record=rec)
            if rec["unet_batch"] > 1:
                rec["negative_prompt_ids"] = ids_of(tok, c["negative_prompt"] or "")
            if c["scheduler"] == "ddim":
                rec["eta"] = 0.0
            rec["notes"] = NOTES["lcm" if c["pipeline"] == "LatentConsistencyModelPipeline" else c["task"]]
            images[c["name"]].save(DATA / c["reference"])
            if c["prompt"] == NON_ASCII_PROMPT:
                tok_plain = tokenizer_without_ftfy(model_dirs[c["model"]] / "tokenizer")
                ids_plain = ids_of(tok_plain, c["prompt"])
                rec["prompt_ids_without_ftfy"] = ids_plain
                rec["reference_without_ftfy"] = f"diffusion/{c['name']}-without-ftfy.png"
                with torch.no_grad():
                    emb = pipe.text_encoder(torch.tensor([ids_plain]))[0]
                    emb_ftfy = pipe.text_encoder(torch.tensor([rec["prompt_ids"]]))[0]
                images["without-ftfy"] = render(pipe, c, model_dirs[c["model"]], prompt_embeds=emb)
                images["without-ftfy"].save(DATA / rec["reference_without_ftfy"])
                same = diff(render(pipe, c, model_dirs[c["model"]], prompt_embeds=emb_ftfy), images[c["name"]])
                if same[1] != 0:
                    failures.append(f"prompt_embeds path differs from prompt path: {same}")
                log(f"  non-ascii: ftfy ids {rec['prompt_ids'][:14]}...")
                log(f"             plain ids {ids_plain[:14]}...")
            cases_out.append(rec)
            log(f"  {c['name']}: rendered ({rec['unet_calls']} UNet calls x {rec['unet_batch']} rows), "
                f"timesteps {[round(t, 2) for t in rec['timesteps']]}")
        by_name = {c["name"]: c for c in CASES}
        for vname, base, over in VARIANTS:
            c = {**by_name[base], **over}
            images[vname] = render(pipe_for(c), c, model_dirs[c["model"]])
        t_refs = time.time() - t1

        # 4. the same pipelines with the ONNX files swapped in
        t2 = time.time()
        onnx_pipes = {}
        log("\nONNX drop-in vs torch reference (mean, max |diff| in levels):")
        for rec in cases_out:
            key = (rec["pipeline"], rec["model"])
            if key not in onnx_pipes:
                onnx_pipes[key] = use_onnx(load_pipeline(rec["pipeline"], torch_dirs[rec["model"]]),
                                           model_dirs[rec["model"]])
            img = render(onnx_pipes[key], rec, model_dirs[rec["model"]])
            m, x = diff(img, images[rec["name"]])
            rec["onnx_check"] = {"mean_abs": round(m, 4), "max_abs": x}
            log(f"  {rec['name']}: {m:.3f} {x:.0f}")
            if m > 0.5 or x > 8:
                failures.append(f"ONNX re-render of {rec['name']} differs from the torch reference: {m:.3f}/{x}")
        t_onnx = time.time() - t2

        (OUT / "cases.json").write_text(json.dumps(cases_out, indent=2, ensure_ascii=False) + "\n")
        write_readme(cases_out)

        # 5. sensitivity checks
        log("\nsensitivity checks (levels of 255):")

        def check(label, ok, text):
            log(f"  [{'ok' if ok else 'FAIL'}] {label}: {text}")
            if not ok:
                failures.append(f"{label}: {text}")

        for c in CASES:
            sd = float(to_np(images[c["name"]]).std())
            check(f"std {c['name']}", sd >= 20, f"{sd:.1f} (>= 20)")
        m, x = diff(images["t2i-euler"], images["seed-43"])
        check("seed 42 vs 43", m >= 10, f"mean {m:.1f} (>= 10), max {x:.0f}")
        m, x = diff(images["t2i-euler"], images["other-prompt"])
        check("prompt vs other prompt", m >= 5 and x >= 30, f"mean {m:.1f} (>= 5), max {x:.0f} (>= 30)")
        names = ["t2i-euler", "t2i-ddim", "t2i-euler-ancestral", "t2i-lcm"]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                m, x = diff(images[a], images[b])
                check(f"{a} vs {b}", m >= 5, f"mean {m:.1f} (>= 5), max {x:.0f}")
        m, x = diff(images["t2i-euler"], images["t2i-euler-no-guidance"])
        check("guidance 7.5 vs 1.0", m >= 5, f"mean {m:.1f} (>= 5), max {x:.0f}")
        m, x = diff(images["t2i-euler"], images["t2i-negative"])
        check("negative prompt vs none", m >= 5, f"mean {m:.1f} (>= 5), max {x:.0f}")
        m, x = diff(images["edit"], images["edit-image-guidance-1.0"])
        check("image guidance 1.5 vs 1.0", m >= 5, f"mean {m:.1f} (>= 5), max {x:.0f}")
        m, x = diff(images["t2i-non-ascii"], images["without-ftfy"])
        check("non-ascii with vs without ftfy", m > 2, f"mean {m:.1f} (> 2), max {x:.0f}")
        m, x = diff(images["lcm-distilled"], images["lcm-distilled-guidance-2.0"])
        check("lcm-distilled guidance 8 vs 2 (timestep_cond)", m >= 5, f"mean {m:.1f} (>= 5), max {x:.0f}")
        m, x = diff(images["i2i-euler"], images["i2i-euler-chelsea"])
        check("img2img input astronaut vs chelsea", m >= 5, f"mean {m:.1f} (>= 5), max {x:.0f}")
        m, x = diff(images["edit"], images["edit-astronaut"])
        check("edit input chelsea vs astronaut", m >= 5, f"mean {m:.1f} (>= 5), max {x:.0f}")
        m, x = diff(images["edit"], images["edit-again"])
        check("edit vs edit-again", m >= 5, f"mean {m:.1f} (>= 5), max {x:.0f}")

        # 6. timing at 256x256 (latents 32x32), onnxruntime CPU provider, default session options
        tm = time_parts(model_dirs[SD])
        total = tm["text_encoder"] + 20 * tm["unet"] + tm["vae_decoder"]
        share = 20 * tm["unet"] / total
        log(f"\ntiming at 256x256 px (median of 7, onnxruntime {ort.__version__} CPU):"
            f"\n  text encoder [2,77]: {tm['text_encoder'] * 1e3:.1f} ms"
            f"\n  unet [2,4,32,32]: {tm['unet'] * 1e3:.1f} ms per call"
            f"\n  vae decoder [1,4,32,32]: {tm['vae_decoder'] * 1e3:.1f} ms"
            f"\n  20 UNet calls = {share * 100:.1f} % of text encoder + 20 UNet calls + VAE decode")
        if share < 0.8:
            log("  WARNING: the UNet share is under 80 %")

        # 7. docs and sizes
        for name, d in model_dirs.items():
            write_origin(d, name, ios[name], torch_dirs[name], rewrites.get(name))
        onnx_files = sorted(p for d in model_dirs.values() for p in d.rglob("*.onnx"))
        total_bytes = sum(p.stat().st_size for p in onnx_files)
        unique = {sha256(p): p.stat().st_size for p in onnx_files}
        log("\nfiles:")
        for p in onnx_files:
            log(f"  {p.relative_to(REPO)}: {p.stat().st_size} bytes")
        log(f"  all .onnx files: {total_bytes / 1e6:.1f} MB in the tree, {sum(unique.values()) / 1e6:.1f} MB distinct")
        log(f"\ntime: exports {t_export:.0f} s, torch references {t_refs:.0f} s, ONNX re-renders {t_onnx:.0f} s, "
            f"total {time.time() - t0:.0f} s")
    finally:
        if args.keep_scratch:
            log(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    if failures:
        log("\nFAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    log("\nall checks passed")


if __name__ == "__main__":
    main()
