"""Reference fixtures for the model layouts users have (issue #12), from the bundled tiny model.

Writes tests/fixtures/model_files/:

- `tokenizer-json/`: the tiny model's CLIP tokenizer as transformers 5 saves it (`tokenizer.json`
  + `tokenizer_config.json`, no vocab.json/merges.txt: what diffusers 0.42 `save_pretrained`
  writes). The Rust tests tokenize `reference/tokens.json`'s prompts with it.
- `ldm_keys.json`: for each component, diffusers tensor name -> key in a single-file checkpoint
  of the original (LDM) layout, and the names whose tensors take a `[.., 1, 1]` shape there (the
  VAE's attention projections are 1x1 convolutions). The LDM names are built here from the
  component configs, then CERTIFIED by diffusers itself: its `single_file_utils` converters
  (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`)
  must map the LDM dict back onto every original tensor, bit for bit, with nothing left over, and
  `StableDiffusionPipeline.from_single_file(file, config=tiny_dir)` must reproduce the folder
  pipeline's latents exactly. The Rust tests build the single file from the folder with this map.

Run from the project root with the reference environment (torch, diffusers, transformers):
    python tools/make_model_file_fixtures.py
"""

import json
import os
import sys
import tempfile

import diffusers
import safetensors.torch
import torch
import transformers
from diffusers import StableDiffusionPipeline
from diffusers.loaders import single_file_utils as sfu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "models", "tiny-sd")
OUT = os.path.join(ROOT, "tests", "fixtures", "model_files")


def unet_ldm_names(cfg):
    """diffusers -> LDM prefixes of a UNet (the original `openaimodel.UNetModel` numbering:
    input_blocks/middle_block/output_blocks, a resnet at .0 and its attention at .1)."""
    n = len(cfg["block_out_channels"])
    layers = cfg["layers_per_block"]
    table = []
    inp = 1
    for i in range(n):
        for j in range(layers):
            table.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{inp}.0."))
            table.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{inp}.1."))
            inp += 1
        if i + 1 < n:
            table.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{inp}.0.op."))
            inp += 1
    table.append(("mid_block.attentions.0.", "middle_block.1."))
    for j in range(2):
        table.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}."))
    out = 0
    for i in range(n):
        attn = cfg["up_block_types"][i] == "CrossAttnUpBlock2D"
        for j in range(layers + 1):
            table.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{out}.0."))
            table.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{out}.1."))
            if j == layers and i + 1 < n:
                table.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{out}.{2 if attn else 1}."))
            out += 1
    fixed = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
              ("conv_shortcut", "skip_connection")]

    def name(k):
        for hf, ldm in fixed.items():
            if k.startswith(hf):
                return ldm + k[len(hf):]
        if "resnets." in k:
            for hf, ldm in resnet:
                k = k.replace(f".{hf}.", f".{ldm}.")
        for hf, ldm in table:
            if k.startswith(hf):
                return ldm + k[len(hf):]
        raise KeyError(k)

    return name


def vae_ldm_names(cfg):
    """diffusers -> LDM names of a VAE (`ldm.modules.diffusionmodules.model` Encoder/Decoder)."""
    n = len(cfg["block_out_channels"])
    layers = cfg["layers_per_block"]
    table = []
    for part in ["encoder", "decoder"]:
        table.append((f"{part}.conv_norm_out.", f"{part}.norm_out."))
        table.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
        for j in range(2):
            table.append((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}."))
    for i in range(n):
        for j in range(layers):
            table.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        for j in range(layers + 1):
            table.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}."))
        table.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        table.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    attention = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out.")]

    def name(k):
        for hf, ldm in table:
            if k.startswith(hf):
                k = ldm + k[len(hf):]
                break
        k = k.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".attn_1." in k:
            head, tail = k.split(".attn_1.")
            for hf, ldm in attention:
                if tail.startswith(hf):
                    return f"{head}.attn_1.{ldm}{tail[len(hf):]}"
        return k

    return name


def load(component, file):
    return safetensors.torch.load_file(os.path.join(TINY, component, file))


def config(component):
    with open(os.path.join(TINY, component, "config.json")) as f:
        return json.load(f)


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    os.makedirs(os.path.join(OUT, "tokenizer-json"), exist_ok=True)

    # tokenizer.json, as transformers 5 writes it.
    tok = transformers.CLIPTokenizer.from_pretrained(os.path.join(TINY, "tokenizer"))
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        written = sorted(os.listdir(d))
        assert written == ["tokenizer.json", "tokenizer_config.json"], written
        for f in written:
            with open(os.path.join(d, f), "rb") as src, open(os.path.join(OUT, "tokenizer-json", f), "wb") as dst:
                dst.write(src.read())
    again = transformers.CLIPTokenizer.from_pretrained(os.path.join(OUT, "tokenizer-json"))
    with open(os.path.join(ROOT, "tests", "fixtures", "reference", "tokens.json")) as f:
        for case in json.load(f):
            ids = again(case["prompt"], padding="max_length", max_length=77, truncation=True).input_ids
            assert ids == case["ids"], case["prompt"]

    # The single file, named here and certified by diffusers' own converters.
    unet, vae, text = (load("unet", "diffusion_pytorch_model.safetensors"),
                       load("vae", "diffusion_pytorch_model.safetensors"),
                       load("text_encoder", "model.safetensors"))
    unet_name, vae_name = unet_ldm_names(config("unet")), vae_ldm_names(config("vae"))
    keys = {
        "unet": {k: "model.diffusion_model." + unet_name(k) for k in sorted(unet)},
        "vae": {k: "first_stage_model." + vae_name(k) for k in sorted(vae)},
        "text_encoder": {k: "cond_stage_model.transformer." + k for k in sorted(text)},
    }
    conv_1x1 = sorted(k for k in vae if ".attentions." in k and k.endswith(".weight") and vae[k].dim() == 2
                      and "group_norm" not in k)
    single = {}
    for comp, sd in [("unet", unet), ("vae", vae), ("text_encoder", text)]:
        for k, v in sd.items():
            single[keys[comp][k]] = v[:, :, None, None].clone() if comp == "vae" and k in conv_1x1 else v.clone()
    assert len(single) == len(unet) + len(vae) + len(text), "two tensors got one LDM name"

    back = sfu.convert_ldm_unet_checkpoint(single, config("unet"))
    assert sorted(back) == sorted(unet), set(back) ^ set(unet)
    assert all(torch.equal(back[k], unet[k]) for k in unet)
    back = sfu.convert_ldm_vae_checkpoint(single, config("vae"))
    assert sorted(back) == sorted(vae), set(back) ^ set(vae)
    assert all(torch.equal(back[k].reshape(vae[k].shape), vae[k]) for k in vae)
    back = sfu.convert_ldm_clip_checkpoint(single)
    assert sorted(back) == sorted(text) and all(torch.equal(back[k], text[k]) for k in text)

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tiny-sd.safetensors")
        safetensors.torch.save_file(single, path)
        folder = StableDiffusionPipeline.from_pretrained(TINY, safety_checker=None)
        file = StableDiffusionPipeline.from_single_file(path, config=TINY, safety_checker=None,
                                                        local_files_only=True)
        run = dict(prompt="a photo of a cat", num_inference_steps=3, guidance_scale=7.5,
                   height=32, width=32, output_type="latent")
        a = folder(**run, generator=torch.Generator().manual_seed(0)).images
        b = file(**run, generator=torch.Generator().manual_seed(0)).images
        assert torch.equal(a, b), (a - b).abs().max()

    info = {
        "generator": "tools/make_model_file_fixtures.py",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "certified_by": "diffusers.loaders.single_file_utils converters + from_single_file latents",
    }
    with open(os.path.join(OUT, "ldm_keys.json"), "w") as f:
        json.dump({"info": info, "keys": keys, "conv_1x1": {"vae": conv_1x1}}, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", OUT, {c: len(k) for c, k in keys.items()}, "1x1:", conv_1x1)


if __name__ == "__main__":
    main()
