"""Do diffusers read the concept files infusion-repl writes, and generate what we generate?

Reads tests/fixtures/baselines/ours/ (written by `infusion-repl train ... --method lora|
textual_inversion` on the bundled tiny model; the commands are in tests/fixtures/README.md),
loads each with diffusers' own loaders and writes
tests/fixtures/baselines/ours/diffusers_latents.safetensors: 3 DDIM steps, guidance 7.5, the
txt2img reference's `init_noise`:
- `lora.latents`: "a photo of sks teapot on a table" after `pipe.load_lora_weights(pot_lora)`;
- `ti.latents`: "a photo of <potword> on a table" after `pipe.load_textual_inversion(potword)`;
- `cd.latents`: "a photo of <new1> teapot on a table" with our Custom Diffusion folder `pot-cd/`
  loaded as the README says (the token by `load_textual_inversion`, the projections' processors
  set explicitly).
With `--dreambooth DIR` it also checks that `UNet2DConditionModel.from_pretrained(DIR)` reads a
unet/ folder written by `train --method dreambooth` with the tiny UNet's configuration, every
field (asserted, nothing written).

The Rust test (tests/integration/baselines.rs) loads the same files with `load_concept` and
compares its C with these latents.

Run from the project root with the reference environment:
    python tools/check_our_files_in_diffusers.py [--dreambooth /tmp/potdb-unet]
"""

import argparse
import os

import diffusers
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "models", "tiny-sd")
OURS = os.path.join(ROOT, "tests", "fixtures", "baselines", "ours")
REF = os.path.join(ROOT, "tests", "fixtures", "reference")


def pipeline():
    pipe = StableDiffusionPipeline.from_pretrained(TINY, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt, init):
    return pipe(prompt, negative_prompt="", num_inference_steps=3, guidance_scale=7.5,
                latents=init.clone(), output_type="latent").images


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dreambooth")
    args = ap.parse_args()
    torch.set_num_threads(1)
    init = safetensors.torch.load_file(os.path.join(REF, "txt2img.safetensors"))["init_noise"]
    out = {}
    pipe = pipeline()
    pipe.load_lora_weights(OURS, weight_name="pot_lora.safetensors")
    out["lora.latents"] = generate(pipe, "a photo of sks teapot on a table", init)
    plain = generate(pipeline(), "a photo of sks teapot on a table", init)
    assert (plain - out["lora.latents"]).abs().max() > 1e-4, "our LoRA changes nothing in diffusers"
    pipe = pipeline()
    pipe.load_textual_inversion(os.path.join(OURS, "potword.safetensors"))
    out["ti.latents"] = generate(pipe, "a photo of <potword> on a table", init)
    # Custom Diffusion: the modifier token through load_textual_inversion, the projections as
    # the README tells diffusers users to set them (load_attn_procs changes nothing in 0.42.1).
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
    cd_dir = os.path.join(OURS, "pot-cd")
    pipe = pipeline()
    pipe.load_textual_inversion(cd_dir, weight_name="<new1>.safetensors")
    sd = safetensors.torch.load_file(os.path.join(cd_dir, "pytorch_custom_diffusion_weights.safetensors"))
    procs = dict(pipe.unet.attn_processors)
    set_ = 0
    for name in procs:
        w = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        if w:
            k = w["to_k_custom_diffusion.weight"]
            procs[name] = CustomDiffusionAttnProcessor(
                train_kv=True, train_q_out="to_q_custom_diffusion.weight" in w,
                hidden_size=k.shape[0], cross_attention_dim=k.shape[1])
            procs[name].load_state_dict(w)
            set_ += 1
    assert set_ == 6, set_
    pipe.unet.set_attn_processor(procs)
    out["cd.latents"] = generate(pipe, "a photo of <new1> teapot on a table", init)
    token_only = pipeline()
    token_only.load_textual_inversion(cd_dir, weight_name="<new1>.safetensors")
    alone = generate(token_only, "a photo of <new1> teapot on a table", init)
    assert (alone - out["cd.latents"]).abs().max() > 1e-4, "our projections change nothing"
    if args.dreambooth:
        unet = UNet2DConditionModel.from_pretrained(args.dreambooth)
        base = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet")
        moved = sum(float((a - b).abs().sum()) for a, b in zip(unet.parameters(), base.parameters()))
        assert moved > 0, "the DreamBooth UNet equals the base one"
        # Our config.json is written from the model's configuration (not copied from a folder):
        # diffusers must read it as the same UNet, every field.
        differ = {k: (unet.config[k], v) for k, v in base.config.items()
                  if not k.startswith("_") and unet.config[k] != v}
        assert not differ, f"config fields read differently: {differ}"
        print("dreambooth unet/ folder read by diffusers: OK")
    safetensors.torch.save_file({k: v.contiguous() for k, v in out.items()},
                                os.path.join(OURS, "diffusers_latents.safetensors"),
                                metadata={"diffusers": diffusers.__version__, "torch": torch.__version__,
                                          "script": "tools/check_our_files_in_diffusers.py"})
    os.chmod(os.path.join(OURS, "diffusers_latents.safetensors"), 0o644)
    print({k: list(v.shape) for k, v in out.items()})


if __name__ == "__main__":
    main()
