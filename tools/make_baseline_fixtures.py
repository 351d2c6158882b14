"""Reference fixtures for the paper's baseline methods (issue #13), from diffusers and peft on the
bundled tiny model, following diffusers' training scripts (examples/textual_inversion/
textual_inversion.py, examples/dreambooth/train_dreambooth_lora.py, train_dreambooth.py).

Writes tests/fixtures/baselines/:

- `steps.safetensors`: one training step per method from a fixed batch (no VAE, no data
  pipeline: `batch.latents` [2, 4, 16, 16] stand for the encoded images, `batch.noise`,
  `batch.timesteps` [100, 700]), the DDPM loss `mse(unet(add_noise(latents, noise, t), t,
  text(prompt)), noise)`:
  * `ti.*`: Textual Inversion. The token `<thing>` is added to the tokenizer (id 49408) with the
    embedding of `cat`; prompt "a photo of a <thing>". `ti.loss`, `ti.grad` [1, 32] (the
    gradient of the new row), `ti.init` [1, 32], `ti.after` [1, 32] (after one AdamW step,
    lr 5e-4, betas 0.9/0.999, weight decay 1e-2, eps 1e-8, as the script; the other rows are
    restored as the script does).
  * `lora.*`: DreamBooth-LoRA. peft `LoraConfig(r=4, lora_alpha=4, target_modules=[to_q, to_k,
    to_v, to_out.0])` on the UNet; the LoRA weights are then set to fixed values
    (`lora.state.NAME`, seeded N(0, 0.1^2), so B is not zero and both factors get gradients);
    prompt "a photo of sks cat". `lora.loss`, `lora.grad.NAME` for every LoRA weight, NAME in
    diffusers' saved layout (`unet.down_blocks.0...to_q.lora_A.weight`).
  * `dreambooth.*`: the whole UNet trained; prompt "a photo of sks cat". `dreambooth.loss`;
    per UNet parameter NAME, `dreambooth.grad_norm.NAME` (F64 scalar) and
    `dreambooth.grad_head.NAME` (its first 256 gradient values, flattened).
- `generation.safetensors`: 3 DDIM steps, guidance 7.5, `init_noise` [1, 4, 16, 16], with a
  fixed trained state loaded by diffusers' own loaders: `ti.latents` (prompt "a photo of a
  <thing> sitting by a teapot", `pipe.load_textual_inversion`), `lora.latents` (prompt "a photo
  of sks cat by a teapot", `pipe.load_lora_weights`, scale 1.0), `lora_half.latents` (the same
  with `cross_attention_kwargs={"scale": 0.5}`), `plain.latents` (the first prompt without any).
- Files in the layouts users have, each loaded by diffusers for `generation.safetensors`:
  `learned_embeds.safetensors` (diffusers TI: {"<thing>": [1, 32]}),
  `a1111_embedding.safetensors` (A1111 TI: {"emb_params": [1, 32]}, the same vector; checked to
  give diffusers the same latents), `pytorch_lora_weights.safetensors` (diffusers
  `save_lora_weights`), `kohya_lora.safetensors` (kohya/A1111 names `lora_unet_..._to_q.lora_down
  .weight`, `.lora_up.weight`, `.alpha`; checked to give diffusers the same latents).

Run from the project root with the reference environment (torch, diffusers, transformers, peft):
    python tools/make_baseline_fixtures.py
"""

import os
import tempfile

import diffusers
import peft
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "models", "tiny-sd")
OUT = os.path.join(ROOT, "tests", "fixtures", "baselines")
REF = os.path.join(ROOT, "tests", "fixtures", "reference")
TOKEN = "<thing>"


def seeded(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def batch():
    return {
        "batch.latents": seeded(11, 2, 4, 16, 16),
        "batch.noise": seeded(12, 2, 4, 16, 16),
        "batch.timesteps": torch.tensor([100, 700], dtype=torch.int64),
    }


def ids(tok, prompt, n=2):
    return tok([prompt] * n, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def ddpm_loss(unet, states, b):
    sched = DDPMScheduler.from_pretrained(TINY, subfolder="scheduler")
    noisy = sched.add_noise(b["batch.latents"], b["batch.noise"], b["batch.timesteps"])
    pred = unet(noisy, b["batch.timesteps"], states).sample
    return F.mse_loss(pred.float(), b["batch.noise"].float(), reduction="mean")


def ti_step(b):
    tok = CLIPTokenizer.from_pretrained(TINY, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(TINY, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet")
    assert tok.add_tokens([TOKEN]) == 1
    new_id = tok.convert_tokens_to_ids(TOKEN)
    init_id = tok.encode("cat", add_special_tokens=False)[0]
    te.resize_token_embeddings(len(tok))
    emb = te.get_input_embeddings().weight
    with torch.no_grad():
        emb[new_id] = emb[init_id].clone()
    orig = emb.data.clone()
    unet.requires_grad_(False)
    tm = getattr(te, "text_model", te)  # transformers 5 has no `text_model` level
    tm.encoder.requires_grad_(False)
    tm.final_layer_norm.requires_grad_(False)
    tm.embeddings.position_embedding.requires_grad_(False)
    opt = torch.optim.AdamW(te.get_input_embeddings().parameters(), lr=5e-4, betas=(0.9, 0.999),
                            weight_decay=1e-2, eps=1e-8)
    states = te(ids(tok, "a photo of a " + TOKEN))[0]
    loss = ddpm_loss(unet, states, b)
    loss.backward()
    grad = emb.grad[new_id].clone()
    opt.step()
    keep = torch.ones(len(tok), dtype=torch.bool)
    keep[new_id] = False
    with torch.no_grad():
        emb[keep] = orig[keep]
    assert torch.equal(emb[:new_id], orig[:new_id])
    return {
        "ti.token_id": torch.tensor([new_id], dtype=torch.int64),
        "ti.loss": loss.detach().reshape(1),
        "ti.grad": grad.reshape(1, -1),
        "ti.init": orig[new_id].reshape(1, -1),
        "ti.after": emb[new_id].detach().reshape(1, -1).clone(),
    }


def lora_unet():
    unet = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted((n, p) for n, p in unet.named_parameters() if "lora_" in n)):
            p.copy_(seeded(1000 + i, *p.shape) * 0.1)
    return unet


def diffusers_names(unet, tensors):
    """peft's module names -> the names diffusers' save_lora_weights writes."""
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {f"unet.{k}": v for k, v in sd.items()}, sd


def lora_step(b):
    tok = CLIPTokenizer.from_pretrained(TINY, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(TINY, subfolder="text_encoder")
    unet = lora_unet()
    states = te(ids(tok, "a photo of sks cat"))[0].detach()
    loss = ddpm_loss(unet, states, b)
    loss.backward()
    # The names save_lora_weights writes, found by renaming peft's names the way the script does.
    peft_names = {n.replace(".default", ""): n for n, _ in unet.named_parameters() if "lora_" in n}
    probe = {k: torch.tensor([float(i)]) for i, k in enumerate(sorted(peft_names))}
    renamed = convert_state_dict_to_diffusers(dict(probe))
    by_index = {int(v.item()): k for k, v in renamed.items()}
    params = dict(unet.named_parameters())
    grads, state = {}, {}
    for i, k in enumerate(sorted(peft_names)):
        key = "unet." + by_index[i]
        p = params[peft_names[k]]
        grads["lora.grad." + key] = p.grad.clone()
        state["lora.state." + key] = p.detach().clone()
    saved, _ = diffusers_names(unet, None)
    assert set(k[len("lora.state."):] for k in state) == set(saved), "peft names != saved names"
    return {"lora.loss": loss.detach().reshape(1), **grads, **state}, unet


def dreambooth_step(b):
    tok = CLIPTokenizer.from_pretrained(TINY, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(TINY, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet")
    states = te(ids(tok, "a photo of sks cat"))[0].detach()
    loss = ddpm_loss(unet, states, b)
    loss.backward()
    out = {"dreambooth.loss": loss.detach().reshape(1)}
    for name, p in unet.named_parameters():
        g = p.grad.flatten()
        out["dreambooth.grad_norm." + name] = g.double().norm().reshape(1)
        out["dreambooth.grad_head." + name] = g[:256].clone()
    return out


def kohya(saved, alpha):
    """diffusers' LoRA names (`MODULE.lora.down.weight`, `.lora.up.`) -> kohya's:
    lora_unet_<module path with _>.lora_down.weight / .lora_up.weight / .alpha."""
    out = {}
    for k, v in saved.items():
        module, kind = k.rsplit(".lora.", 1)
        base = "lora_unet_" + module.replace(".", "_")
        out[base + (".lora_down.weight" if kind.startswith("down") else ".lora_up.weight")] = v
        out[base + ".alpha"] = torch.tensor(float(alpha))
    return out


def generate(pipe, prompt, init, **kw):
    return pipe(prompt, negative_prompt="", num_inference_steps=3, guidance_scale=7.5,
                latents=init.clone(), output_type="latent", **kw).images


def pipeline():
    pipe = StableDiffusionPipeline.from_pretrained(TINY, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    b = batch()
    steps = dict(b)
    steps.update(ti_step(b))
    lora, unet = lora_step(b)
    steps.update(lora)
    steps.update(dreambooth_step(b))

    init = safetensors.torch.load_file(os.path.join(REF, "txt2img.safetensors"))["init_noise"]
    gen = {"init_noise": init}
    ti_prompt = f"a photo of a {TOKEN} sitting by a teapot"
    pipe = pipeline()
    gen["plain.latents"] = generate(pipe, "a photo of a cat sitting by a teapot", init)
    # A fixed learned vector: cat's embedding moved by seeded noise.
    cat = pipe.tokenizer.encode("cat", add_special_tokens=False)[0]
    vec = (pipe.text_encoder.get_input_embeddings().weight[cat].detach() + 0.5 * seeded(21, 32)).reshape(1, 32)
    ti_file = os.path.join(OUT, "learned_embeds.safetensors")
    safetensors.torch.save_file({TOKEN: vec.contiguous()}, ti_file, metadata={"format": "pt"})
    a1111_file = os.path.join(OUT, "a1111_embedding.safetensors")
    safetensors.torch.save_file({"emb_params": vec.contiguous()}, a1111_file)
    pipe.load_textual_inversion(ti_file)
    gen["ti.latents"] = generate(pipe, ti_prompt, init)
    gen["ti.vector"] = vec
    pipe = pipeline()
    pipe.load_textual_inversion(a1111_file, token=TOKEN)
    d = (generate(pipe, ti_prompt, init) - gen["ti.latents"]).abs().max().item()
    assert d == 0.0, f"the A1111 file gives other latents ({d})"

    saved_prefixed, saved = diffusers_names(unet, None)
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=saved, safe_serialization=True)
        lora_file = os.path.join(OUT, "pytorch_lora_weights.safetensors")
        written = safetensors.torch.load_file(os.path.join(tmp, "pytorch_lora_weights.safetensors"))
        safetensors.torch.save_file(written, lora_file)
    assert set(written) == set(saved_prefixed), "save_lora_weights wrote other names"
    pipe = pipeline()
    pipe.load_lora_weights(OUT, weight_name="pytorch_lora_weights.safetensors")
    lora_prompt = "a photo of sks cat by a teapot"
    gen["lora.latents"] = generate(pipe, lora_prompt, init)
    gen["lora_half.latents"] = generate(pipe, lora_prompt, init, cross_attention_kwargs={"scale": 0.5})
    kohya_file = os.path.join(OUT, "kohya_lora.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in kohya(saved, 4).items()}, kohya_file)
    pipe = pipeline()
    pipe.load_lora_weights(OUT, weight_name="kohya_lora.safetensors")
    d = (generate(pipe, lora_prompt, init) - gen["lora.latents"]).abs().max().item()
    assert d < 1e-5, f"the kohya file gives other latents ({d})"
    plain = pipeline()
    d = (generate(plain, lora_prompt, init) - gen["lora.latents"]).abs().max().item()
    assert d > 1e-3, f"the LoRA changes nothing ({d})"

    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "script": "tools/make_baseline_fixtures.py"}
    safetensors.torch.save_file({k: v.contiguous() for k, v in steps.items()},
                                os.path.join(OUT, "steps.safetensors"), metadata=meta)
    safetensors.torch.save_file({k: v.contiguous() for k, v in gen.items()},
                                os.path.join(OUT, "generation.safetensors"), metadata=meta)
    for f in os.listdir(OUT):
        os.chmod(os.path.join(OUT, f), 0o644)
    print({k: list(v.shape) for k, v in gen.items()})
    print("ti.loss", steps["ti.loss"].item(), "lora.loss", steps["lora.loss"].item(),
          "dreambooth.loss", steps["dreambooth.loss"].item(), "lora grads", sum(k.startswith("lora.grad") for k in steps))


if __name__ == "__main__":
    main()
