"""Reference data for kiln's noise schedulers and torch CPU generator (src/diffusion/{noise.rs,scheduler/}).

Versions: torch 2.15.0 (PyPI wheel, CPU capability AVX2), diffusers 0.35.2, numpy 2.4.6, Python 3.
Run from the repository root (deterministic; no network, no GPU):

    /work/fixture-venv/bin/python tests/data/diffusion/make_scheduler_traces.py

Writes, next to this script:

- torch_randn.json: torch.Generator("cpu").manual_seed(seed) then torch.randn(n, generator=g,
  dtype=torch.float32), for several seeds and sizes, and sequences of draws from one generator.
- scheduler_traces.json: EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDIMScheduler and
  LCMScheduler, each built with `<Class>.from_pretrained(folder, subfolder="scheduler")` from a
  scheduler_config.json written as-is (so each class applies its own defaults to missing keys), for
  several real configs: schedules for many step counts, full denoising traces, add_noise, img2img runs,
  the img2img start index of StableDiffusionImg2ImgPipeline.get_timesteps, and the cases diffusers
  refuses.

Float32 values are written as the shortest decimal that round-trips to the same float32 (also through
float64, which the script asserts), so Rust can compare them bit for bit.

torch's CPU float32 `sqrt` (and `x ** 0.5`) calls MKL's `vmsSqrt` in high-accuracy mode, which is not
correctly rounded (on the AMD EPYC that made these files, 17% of float32 inputs are 1 ulp off IEEE
`sqrt`) and depends on the CPU MKL dispatches for. kiln uses IEEE `sqrt`, so values downstream of a
square root agree within about 1 ulp per operation, not bit for bit. To check that this is the only
difference, run with `--ieee-sqrt OUTDIR`: float32 `sqrt` and `** 0.5` are then computed in float64
and rounded (= IEEE float32 sqrt), and the files are written to OUTDIR; kiln matches those bit for bit
(see the `KILN_IEEE_SQRT_TRACES` test in src/diffusion/scheduler/tests.rs).
"""

import json
import logging
import os
import sys
import tempfile
import types

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline

assert torch.__version__.startswith("2.15.0"), torch.__version__
assert diffusers.__version__ == "0.35.2", diffusers.__version__
logging.getLogger("diffusers").setLevel(logging.ERROR)
torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
if len(sys.argv) == 3 and sys.argv[1] == "--ieee-sqrt":
    HERE = sys.argv[2]
    _pow, _sqrt = torch.Tensor.__pow__, torch.Tensor.sqrt

    def _ieee_sqrt(t):
        return _sqrt(t.double()).float() if t.dtype == torch.float32 else _sqrt(t)

    torch.Tensor.__pow__ = lambda t, e: _ieee_sqrt(t) if isinstance(e, float) and e == 0.5 else _pow(t, e)
    torch.Tensor.sqrt = _ieee_sqrt
CLASSES = {
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "lcm": LCMScheduler,
}
CONFIGS = {
    # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (a PNDM file).
    "sd15_pndm": {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False},
    # timbrooks/instruct-pix2pix scheduler/scheduler_config.json.
    "pix2pix_euler_a": {"_class_name": "EulerAncestralDiscreteScheduler", "beta_end": 0.012,
                        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                        "prediction_type": "epsilon", "steps_offset": 1, "trained_betas": None},
    # SimianLuo/LCM_Dreamshaper_v7 scheduler/scheduler_config.json.
    "lcm_dreamshaper": {"_class_name": "LCMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                        "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
                        "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
                        "original_inference_steps": 50, "prediction_type": "epsilon",
                        "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "set_alpha_to_one": True,
                        "steps_offset": 1, "thresholding": False, "timestep_scaling": 10.0,
                        "timestep_spacing": "leading", "trained_betas": None},
    # stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json (v-prediction, no timestep_spacing).
    "sd21_v": {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
               "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
               "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None},
    # A zero-terminal-SNR v-prediction fine-tune (trailing spacing, rescaled betas).
    "v_trailing_zsnr": {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                        "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                        "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                        "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "trailing"},
    # A linear (DDPM-style) beta schedule, v-prediction, linspace spacing, clipping.
    "linear_v_linspace": {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                          "beta_start": 0.0001, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
                          "timestep_spacing": "linspace", "clip_sample": True, "clip_sample_range": 1.5,
                          "steps_offset": 0},
    # Cosine betas, sample prediction, sigma_min final sigma (Euler); Euler ancestral refuses "sample".
    "cosine_sample": {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2",
                      "num_train_timesteps": 1000, "prediction_type": "sample", "clip_sample": True,
                      "final_sigmas_type": "sigma_min", "timestep_spacing": "leading", "steps_offset": 1},
}
TRACE_STEPS = [1, 2, 4, 10, 25, 50]
SCHEDULE_STEPS = list(range(1, 51)) + [61, 75, 100]
SHAPE = (1, 4, 8, 8)
LATENT_SEED, MODEL_SEED, STEP_SEED = 1234, 7, 99


def f32(values):
    """float32 values as shortest round-trip decimals (checked to survive a float64 parse)."""
    out = []
    for v in np.asarray(values, dtype=np.float32).reshape(-1):
        x = float(str(v))
        assert np.float32(x) == v or (np.isnan(v) and np.isnan(x)), (v, x)
        out.append(x)
    return out


def build(kind, config_name):
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(CONFIGS[config_name], f)
        return CLASSES[kind].from_pretrained(tmp, subfolder="scheduler")


def randn(seed, n=256):
    return torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def fake_model(x_in, model_gen):
    """A deterministic stand-in for the UNet: exact float32 arithmetic plus seeded torch noise."""
    eps = torch.randn(SHAPE, generator=model_gen, dtype=torch.float32)
    return x_in * 0.3 + eps * 0.7


def head_sum(t):
    a = t.reshape(-1).numpy()
    return {"head": f32(a[:4]), "sum": float(a.astype(np.float64).sum())}


def denoise(sched, t_start, latents):
    """The pipelines' loop from index t_start; returns per-step records and the final sample."""
    model_gen = torch.Generator("cpu").manual_seed(MODEL_SEED)
    step_gen = torch.Generator("cpu").manual_seed(STEP_SEED)
    steps = []
    for t in sched.timesteps[t_start:]:
        x_in = sched.scale_model_input(latents, t)
        ones = sched.scale_model_input(torch.ones(1), t)
        out = fake_model(x_in, model_gen)
        kwargs = {"eta": 0.0} if isinstance(sched, DDIMScheduler) else {}
        latents = sched.step(out, t, latents, generator=step_gen, return_dict=False, **kwargs)[0]
        steps.append({"scaled_one": f32(ones)[0], "x_in": head_sum(x_in), "sample": head_sum(latents)})
    return steps, f32(latents)


def schedule(kind, config_name, steps):
    sched = build(kind, config_name)
    sched.set_timesteps(steps)
    entry = {"timesteps": f32(sched.timesteps.float())}
    if hasattr(sched, "sigmas"):
        entry["sigmas"] = f32(sched.sigmas)
    return sched, entry


def trial(fn):
    try:
        fn()
        return None
    except Exception as e:  # diffusers raises ValueError / NotImplementedError / IndexError
        return f"{type(e).__name__}: {e}"


def main():
    traces, schedules, add_noise, img2img, refused = [], [], [], [], []
    for kind in CLASSES:
        for config_name in CONFIGS:
            for steps in SCHEDULE_STEPS:
                def run():
                    sched, entry = schedule(kind, config_name, steps)
                    sched.step(torch.zeros(SHAPE), sched.timesteps[0], torch.zeros(SHAPE),
                               generator=torch.Generator().manual_seed(0), return_dict=False)
                    schedules.append({"scheduler": kind, "config": config_name, "steps": steps, **entry})
                error = trial(run)
                if error:
                    refused.append({"scheduler": kind, "config": config_name, "steps": steps, "error": error})
            for steps in TRACE_STEPS:
                if any(r["scheduler"] == kind and r["config"] == config_name and r["steps"] == steps for r in refused):
                    continue
                sched, entry = schedule(kind, config_name, steps)
                latents = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(LATENT_SEED),
                                      dtype=torch.float32)
                init_sigma = sched.init_noise_sigma
                latents = latents * init_sigma
                per_step, final = denoise(sched, 0, latents)
                traces.append({"scheduler": kind, "config": config_name, "steps": steps, **entry,
                               "init_noise_sigma": f32(torch.as_tensor(init_sigma, dtype=torch.float32))[0],
                               "per_step": per_step, "final": final})
                if steps != 10:
                    continue
                for i in [0, 3, 9]:
                    sched, _ = schedule(kind, config_name, steps)
                    if hasattr(sched, "set_begin_index"):
                        sched.set_begin_index(i)
                    noisy = sched.add_noise(randn(11), randn(12), sched.timesteps[i:i + 1])
                    add_noise.append({"scheduler": kind, "config": config_name, "steps": steps, "index": i,
                                      "original_seed": 11, "noise_seed": 12, "noisy": f32(noisy)})
                # An img2img run as StableDiffusionImg2ImgPipeline drives it, strength 0.6.
                sched, _ = schedule(kind, config_name, steps)
                pipe = types.SimpleNamespace(scheduler=sched)
                _, remaining = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, 0.6, "cpu")
                t_start = steps - remaining
                noisy = sched.add_noise(randn(11).reshape(SHAPE), randn(12).reshape(SHAPE),
                                        sched.timesteps[t_start:t_start + 1])
                per_step, final = denoise(sched, t_start, noisy)
                img2img.append({"scheduler": kind, "config": config_name, "steps": steps, "strength": 0.6,
                                "t_start": t_start, "original_seed": 11, "noise_seed": 12,
                                "per_step": per_step, "final": final})
    starts = []
    sched = build("euler", "sd15_pndm")
    for steps, strength in [(10, 0.3), (10, 0.0), (10, 1.0), (10, 0.75), (10, 0.7), (50, 0.8), (100, 0.29),
                            (25, 0.5), (4, 0.33), (1, 0.5), (1, 1.0), (20, 0.05), (30, 0.999), (7, 0.1428571)]:
        sched.set_timesteps(steps)
        _, remaining = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=sched),
                                                                     steps, strength, "cpu")
        starts.append({"steps": steps, "strength": strength, "t_start": steps - remaining})
    doc = {
        "generator": "tests/data/diffusion/make_scheduler_traces.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__},
        "shape": list(SHAPE),
        "seeds": {"latents": LATENT_SEED, "model": MODEL_SEED, "step": STEP_SEED},
        "fake_model": "model_output = x_in * 0.3 + randn(shape, model generator) * 0.7, float32",
        "configs": CONFIGS,
        "schedules": schedules,
        "traces": traces,
        "add_noise": add_noise,
        "img2img": img2img,
        "img2img_start": starts,
        "refused": refused,
    }
    with open(os.path.join(HERE, "scheduler_traces.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))

    draws = []
    for seed in [0, 1, 42, 12345, 4294967295]:
        for sizes in [[1], [7], [15], [16], [17], [256], [1000], [4 * 8 * 8], [4 * 8 * 12]]:
            draws.append({"seed": seed, "sizes": sizes})
        for sizes in [[256, 256], [256, 100, 256], [7, 7, 3], [5, 300, 1]]:
            draws.append({"seed": seed, "sizes": sizes})
    for d in draws:
        g = torch.Generator("cpu").manual_seed(d["seed"])
        d["values"] = [f32(torch.randn(n, generator=g, dtype=torch.float32)) for n in d["sizes"]]
    with open(os.path.join(HERE, "torch_randn.json"), "w") as f:
        json.dump({"generator": "tests/data/diffusion/make_scheduler_traces.py",
                   "versions": {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
                   "draws": draws}, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
