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
- `sd15_ldm_keys.json`: the same at SD1.5's real shapes (no weights: models built on torch's meta
  device), for the UNet and VAE as diffusers' own conversion script
  `scripts/convert_diffusers_to_original_stable_diffusion.py` names them (it is not in the pip
  package: give its path with --convert-script; it was taken from the diffusers repository at
  commit edc154da0906ddc7ade2dfea739917266908451a). It expects the VAE attention under the names
  the SD1.5 repository's VAE file uses (query/key/value/proj_attn); they are given so and mapped
  back. Certified again by `single_file_utils`' converters. With each name, its diffusers shape;
  the text encoder's names and shapes come from transformers' CLIPTextModel at SD1.5's config
  (with the `text_model.` prefix the SD1.5 files have).

Run from the project root with the reference environment (torch, diffusers, transformers):
    python tools/make_model_file_fixtures.py --convert-script PATH/convert_diffusers_to_original_stable_diffusion.py
"""

import argparse
import importlib.util

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


SD15_UNET = dict(cross_attention_dim=768, sample_size=64)  # the rest: UNet2DConditionModel's defaults
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, latent_channels=4, sample_size=512)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
# The VAE attention names diffusers' conversion script reads (the SD1.5 repository's VAE file).
LEGACY_VAE_ATTENTION = [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                        (".to_out.0.", ".proj_attn.")]


def legacy_vae_name(k):
    if ".attentions." in k:
        for new, old in LEGACY_VAE_ATTENTION:
            k = k.replace(new, old)
    return k


def renamed_by(names, convert, rename=lambda k: k):
    """name -> the key `convert` (a state-dict converter) moves its tensor to: each tensor is a
    [1, 1] marker holding its index (the VAE converter reshapes some to [1, 1, 1, 1])."""
    out = convert({rename(k): torch.full((1, 1), float(i)) for i, k in enumerate(names)})
    assert len(out) == len(names), "the converter dropped or merged tensors"
    return {names[int(t.flatten()[0])]: key for key, t in out.items()}


def sd15_keys(script):
    spec = importlib.util.spec_from_file_location("convert_script", script)
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SD15_UNET)
        vae = diffusers.AutoencoderKL(**SD15_VAE)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT))
    u, v = unet.state_dict(), vae.state_dict()
    # transformers 5 names CLIPTextModel's tensors without `text_model.` in memory (and some
    # tools save them so); the SD1.5 files and single-file checkpoints have it.
    t = {k if k.startswith("text_model.") else "text_model." + k: x for k, x in text.state_dict().items()}
    um = renamed_by(list(u), conv.convert_unet_state_dict)
    vm = renamed_by(list(v), conv.convert_vae_state_dict, legacy_vae_name)
    tm = {k: "cond_stage_model.transformer." + k for k in t}  # the script keeps SD1 text names

    # single_file_utils must read the same file back onto the same names.
    def marker(i, key):
        conv_1x1 = ".attn_1." in key and key.endswith("weight") and ".norm." not in key
        return torch.full((1, 1, 1, 1) if conv_1x1 else (1, 1), float(i))
    for names, mapping, prefix, convert, cfg in [
        (list(u), um, "model.diffusion_model.", sfu.convert_ldm_unet_checkpoint, unet.config),
        (list(v), vm, "first_stage_model.", sfu.convert_ldm_vae_checkpoint, vae.config),
    ]:
        back = convert({prefix + mapping[k]: marker(i, mapping[k]) for i, k in enumerate(names)}, dict(cfg))
        assert sorted(back) == sorted(names), set(back) ^ set(names)
        assert all(names[int(x.flatten()[0])] == k for k, x in back.items())
    return {
        "unet": {k: ["model.diffusion_model." + um[k], list(u[k].shape)] for k in sorted(u)},
        "vae": {k: ["first_stage_model." + vm[k], list(v[k].shape)] for k in sorted(v)},
        "text_encoder": {k: [tm[k], list(t[k].shape)] for k in sorted(t)},
    }


def load(component, file):
    return safetensors.torch.load_file(os.path.join(TINY, component, file))


def config(component):
    with open(os.path.join(TINY, component, "config.json")) as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--convert-script", required=True,
                        help="diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py")
    args = parser.parse_args()
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

    sd15 = sd15_keys(args.convert_script)
    info = dict(info, certified_by="diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py "
                "(edc154da) + diffusers.loaders.single_file_utils converters",
                entries="diffusers name -> [single-file key, diffusers shape]")
    with open(os.path.join(OUT, "sd15_ldm_keys.json"), "w") as f:
        json.dump({"info": info, "keys": sd15}, f, indent=0, sort_keys=True)
        f.write("\n")
    print("wrote sd15_ldm_keys.json", {c: len(k) for c, k in sd15.items()})


if __name__ == "__main__":
    main()
