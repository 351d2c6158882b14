"""Reference fixtures for the samplers (issue #12), from diffusers on the bundled tiny model.

Writes tests/fixtures/reference/:

- `samplers.safetensors`: for each sampler, a 5-step text-to-image run of the bundled tiny model
  (prompt "a photo of a cat sitting by a teapot", negative "", guidance 7.5, the initial noise
  `init_noise` of reference/txt2img.safetensors), the scheduler made as users make it:
  `Scheduler.from_config(pipe.scheduler.config, **extra)`. Per sampler NAME:
  `NAME.timesteps` (F32, the UNet's timestep of each call), `NAME.latents_steps` (F32
  [calls, 4, 16, 16], the latents after each call, from `callback_on_step_end`) and
  `NAME.final_latents`. The per-step noise of the samplers that draw it (euler_a, dpmpp_2m_sde)
  is recorded as `NAME.step_noise` [calls, 4, 16, 16] (diffusers draws it with `randn_tensor`;
  it is wrapped here to keep what it drew).
- `schedules.json`: timesteps and sigmas of each sampler's `set_timesteps` for every
  timestep_spacing, with and without Karras sigmas where diffusers offers them, at 5, 20 and 50
  steps (no model involved; the tiny model's noise schedule, SD1.5's).

Samplers (our name: diffusers scheduler and options):
    ddim: DDIMScheduler (eta 0)           euler: EulerDiscreteScheduler
    dpmpp_2m: DPMSolverMultistepScheduler euler_a: EulerAncestralDiscreteScheduler
    dpmpp_2m_sde: DPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++"
    dpmpp_2m_karras, dpmpp_2m_sde_karras, euler_karras: the same with use_karras_sigmas=True
    pndm: PNDMScheduler as the tiny config gives it (skip_prk_steps False: Runge-Kutta warm-up)
    pndm_plms: PNDMScheduler with skip_prk_steps=True (SD1.5's own scheduler config)

Run from the project root with the reference environment (torch, diffusers, transformers):
    python tools/make_sampler_fixtures.py
"""

import json
import os
import sys

import diffusers
import numpy as np
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "models", "tiny-sd")
REF = os.path.join(ROOT, "tests", "fixtures", "reference")
PROMPT = "a photo of a cat sitting by a teapot"
STEPS = 5
GUIDANCE = 7.5

SAMPLERS = {
    "ddim": (diffusers.DDIMScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": (
        diffusers.DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_karras": (diffusers.EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "pndm": (diffusers.PNDMScheduler, {}),
    "pndm_plms": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
}


def run(pipe, name, init_noise):
    cls, extra = SAMPLERS[name]
    base = pipe.scheduler.config
    pipe.scheduler = cls.from_config(base, **extra)
    drawn = []
    module = sys.modules[cls.__module__]
    original = getattr(module, "randn_tensor", None)
    if original is not None:
        def recording(*args, **kwargs):
            t = original(*args, **kwargs)
            drawn.append(t.clone())
            return t
        module.randn_tensor = recording
    steps = []

    def on_step(p, i, t, kw):
        steps.append((float(t), kw["latents"].clone()))
        return kw

    try:
        out = pipe(
            PROMPT,
            negative_prompt="",
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=init_noise.clone(),
            output_type="latent",
            callback_on_step_end=on_step,
            generator=torch.Generator().manual_seed(1234),
        ).images
    finally:
        if original is not None:
            module.randn_tensor = original
        pipe.scheduler = diffusers.DDIMScheduler.from_config(base)
    t = {
        f"{name}.timesteps": torch.tensor([s[0] for s in steps], dtype=torch.float32),
        f"{name}.latents_steps": torch.cat([s[1] for s in steps]).float(),
        f"{name}.final_latents": out.float(),
    }
    if drawn:
        t[f"{name}.step_noise"] = torch.cat(drawn).float()
    return t


def schedules(config):
    table = {}
    for name, (cls, extra) in SAMPLERS.items():
        for spacing in ["leading", "linspace", "trailing"]:
            for n in [5, 20, 50]:
                s = cls.from_config(config, timestep_spacing=spacing, **extra)
                s.set_timesteps(n)
                row = {"timesteps": [float(x) for x in s.timesteps]}
                if hasattr(s, "sigmas") and s.sigmas is not None:
                    row["sigmas"] = [float(x) for x in s.sigmas]
                if hasattr(s, "init_noise_sigma"):
                    row["init_noise_sigma"] = float(s.init_noise_sigma)
                table[f"{name}/{spacing}/{n}"] = row
    return table


def main():
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(TINY, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    txt = safetensors.torch.load_file(os.path.join(REF, "txt2img.safetensors"))
    init_noise = txt["init_noise"]
    tensors = {"init_noise": init_noise.clone()}
    for name in SAMPLERS:
        tensors.update(run(pipe, name, init_noise))
    # The script's check: its DDIM run is the committed txt2img reference (to 1e-4 of the
    # latents' scale: that file was made with another torch build).
    ref = txt["final_latents"]
    d = ((tensors["ddim.final_latents"] - ref).abs().max() / ref.abs().max()).item()
    assert d < 1e-4, f"ddim does not reproduce txt2img.safetensors (max diff {d:e} relative)"
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    safetensors.torch.save_file(
        tensors,
        os.path.join(REF, "samplers.safetensors"),
        metadata={"diffusers": diffusers.__version__, "torch": torch.__version__, "script": "tools/make_sampler_fixtures.py"},
    )
    with open(os.path.join(REF, "schedules.json"), "w") as f:
        json.dump(
            {"diffusers": diffusers.__version__, "config": dict(pipe.scheduler.config), "schedules": schedules(pipe.scheduler.config)},
            f,
            indent=None,
            default=lambda o: o if not isinstance(o, (np.ndarray, tuple)) else list(o),
        )
    for k, v in sorted(tensors.items()):
        print(k, list(v.shape))


if __name__ == "__main__":
    main()
