"""The core reference fixtures (issue 21 item 13): the tiny random SD1.5 model, the tokenizer, the
tiny metric models and every reference that no other tools/ script makes, from the reference
implementation (PyTorch + diffusers + transformers) on CPU, float32.

Writes, under OUT (the layout of the shared fixtures folder; the project keeps copies of
`tiny-sd/`, `tiny-clip/`, `tiny-dino/` in models/ and of `reference/` in tests/fixtures/):

- `tokenizer/` and `tiny-sd/tokenizer/`: vocab.json, merges.txt, tokenizer_config.json,
  special_tokens_map.json, built from open_clip's `bpe_simple_vocab_16e6.txt.gz` (taken from the
  open_clip_torch wheel) the way openai/clip-vit-large-patch14's files are.
- `tiny-sd/`: the diffusers folder (text encoder, UNet, VAE, DDIM scheduler). Weights: default
  init with torch.manual_seed(0) (text), 1 (UNet), 2 (VAE), then p += 0.02 * randn for every
  parameter from one torch.Generator seeded 1000 (text -> unet -> vae, named_parameters() order).
- `tiny-clip/`, `tiny-dino/`: random metric models (seeds 20, 21; perturbation generator 2000,
  CLIP then DINO) in the on-disk layout of openai/clip-vit-base-patch32 and facebook/dino-vits16.
- `reference/`: tokens.json, ddim.json, text_encoder, unet, vae, txt2img, attention, infusion,
  train_grad, w2, metrics (.safetensors, each with an `info` metadata JSON) and images/*.png.
- `MANIFEST.txt`: size and sha256 prefix of every file (README.md too when OUT has one).
Random inputs: torch.Generator seeded 10 (unet.sample), 11 (vae: decode.latents, then the
encode image's noise), 12 (txt2img/infusion init_noise), 13 (train z0 then eps), Deltas 0.5 *
randn seeds 1, 2 (infusion) and 0.1 * randn seed 3 (train), one generator per concept, layers in
the UNet's module order; numpy default_rng(14) (w2 sample sets), default_rng(22) (images).
What each file holds is documented in tests/fixtures/README.md (the shared folder's README).
`reference/samplers.safetensors` and `schedules.json` come from tools/make_sampler_fixtures.py.

Attention: the UNet runs diffusers' `AttnProcessor` arithmetic (explicit softmax, the processor
below adds the Infusion hooks); the text encoder, CLIP and DINO run transformers' eager attention;
the VAE keeps diffusers' default processor.

Reference environment (PyPI): python 3.12.1, torch 2.11.0 (+cu130, the PyPI wheel; run on CPU),
diffusers 0.42.1, transformers 5.17.0, safetensors 0.8.0, numpy 2.5.5, pillow 13.0.0, and
open_clip_torch (3.3.0 checked; only its BPE vocabulary file is read, so `--no-deps` is enough):
    python3.12 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.11.0 diffusers==0.42.1 transformers==5.17.0 \
        safetensors==0.8.0 numpy==2.5.5 pillow==13.0.0
    /tmp/refenv/bin/pip install --no-deps open_clip_torch==3.3.0

Run from the project root (one CPU thread, about 10 s):
    /tmp/refenv/bin/python tools/make_reference_fixtures.py --out /tmp/fixtures
    /tmp/refenv/bin/python tools/make_reference_fixtures.py --check --verbose
`--check [DIR]` regenerates into a temporary folder (or --out) and compares every file with the
committed ones (DIR: the project root, the default, mapping to models/ and tests/fixtures/, or a
folder in the shared layout): a table of byte-equality and max |diff| / max(1, |ref|max) per
file (`--verbose`: per tensor), exit 1 over the README's tolerances. Measured (AMD EPYC, AVX512):
weights, configs, tokenizer, tokens.json, ddim.json, PNGs and all random inputs bit-equal;
forward-pass outputs within 1e-6 (single passes) / 6e-6 (trajectories) of the committed files,
which came from another CPU/BLAS; tiny-dino's position embeddings 1-2 ulp off in 31 of 6304
values (torch's erfinv in trunc_normal_ is platform-dependent).
The checks of the README's "Checks run by the shared fixtures' script" are asserted (printed as
they pass); one that fails stops the script before anything is written to OUT.
"""

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
import unicodedata

import numpy as np
import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

import diffusers  # noqa: E402
import PIL  # noqa: E402
import regex  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of a cat sitting by a teapot"
STEPS = 5
GUIDANCE = 7.5
LAYERS = [  # the cross-attention layers, in the UNet's module order (the Delta seeds follow it)
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
    "mid_block.attentions.0.transformer_blocks.0.attn2",
]
TOKEN_PROMPTS = [
    "a photo of a cat",
    "a photo of a cat sitting by a teapot",
    "A PHOTO OF A CAT",
    "UPPER lower MiXeD case",
    "a cat, sitting!",
    "a photo of a cat.",
    "  a   cat   with    extra  spaces   ",
    "tab\tand\nnewline\r\nseparated",
    "a wizard's hat",
    "don't stop, we'll see; it's 'quoted'",
    "3 cats and 42 dogs in 2024, 1.5x zoom",
    "a café in zürich",
    "naïve Ångström façade",
    "a cat \U0001f431 on a mat",
    "teddybear",
    "a duck_toy on a table",
    "hello-world (test) [brackets] {braces} <angle>",
    "#hashtag @mention $100 50% off!!!",
    "an astronaut riding a horse on mars, highly detailed, 4k, trending on artstation",
    "a photo of a catcatcat",
    "北京的猫",
    "a\xa0non-breaking\xa0space",
    "a highly detailed oil painting of an old lighthouse on a rocky cliff above a stormy sea at dusk, "
    "with seagulls circling the lantern room, waves crashing on the black rocks below, warm light "
    "spilling from the keeper's cottage windows, a winding path lined with wild flowers and tall "
    "grass, dramatic clouds, volumetric light, cinematic composition, trending on artstation, by a "
    "famous painter, masterpiece, best quality, ultra detailed, 8k resolution, golden hour glow",
    "",
    " ",
]
METRIC_PROMPTS = [TOKEN_PROMPTS[0], "a teapot on a wooden table", TOKEN_PROMPTS[22]]
CHECKS = []


def check(name, ok, detail=""):
    CHECKS.append(f"- {name}: {'PASS' if ok else 'FAIL'} {detail}")
    print(CHECKS[-1], flush=True)
    if not ok:
        raise SystemExit(f"check failed: {name} {detail}")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def save_st(path, tensors, info=None, metadata=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if metadata is None:
        metadata = {"info": json.dumps(info if info is not None else {}, sort_keys=True)}
    safetensors.torch.save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def write_json(path, obj, indent):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=indent, ensure_ascii=False))


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Tokenizer files (openai/clip-vit-large-patch14's recipe from open_clip's BPE file)

def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def bpe_file():
    for f in importlib.metadata.files("open_clip_torch") or []:
        if str(f).endswith("bpe_simple_vocab_16e6.txt.gz"):
            return str(f.locate())
    raise SystemExit("open_clip_torch's bpe_simple_vocab_16e6.txt.gz not found (pip install --no-deps open_clip_torch)")


def tokenizer_files():
    lines = gzip.open(bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    token = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    bos, eos = dict(token, content="<|startoftext|>"), dict(token, content="<|endoftext|>")
    files = {
        "vocab.json": json.dumps(dict(zip(vocab, range(len(vocab)))), ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges),
        "special_tokens_map.json": json.dumps(
            {"bos_token": bos, "eos_token": eos, "pad_token": "<|endoftext|>", "unk_token": eos}, indent=2),
        "tokenizer_config.json": json.dumps({
            "add_prefix_space": False,
            "bos_token": {"__type": "AddedToken", **bos},
            "do_lower_case": True,
            "eos_token": {"__type": "AddedToken", **eos},
            "errors": "replace",
            "model_max_length": 77,
            "name_or_path": "openai/clip-vit-large-patch14",
            "pad_token": "<|endoftext|>",
            "special_tokens_map_file": "./special_tokens_map.json",
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": {"__type": "AddedToken", **eos},
        }, indent=2),
    }
    return files, merges


def write_tokenizer(folder, files):
    os.makedirs(folder, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)


class SimpleBPE:
    """An independent implementation of the recipe in the README (for the tokens.json check)."""

    PAT = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                        regex.IGNORECASE)

    def __init__(self, merges, vocab):
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.vocab = vocab
        self.b2u = bytes_to_unicode()

    def bpe(self, token):
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def encode(self, text):
        text = unicodedata.normalize("NFC", text)
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for tok in self.PAT.findall(text):
            tok = "".join(self.b2u[b] for b in tok.encode("utf-8"))
            ids += [self.vocab[t] for t in self.bpe(tok)]
        return ids


# ---------------------------------------------------------------------------------------------
# Models

def text_config():
    return CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          projection_dim=32, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=0, eos_token_id=2, pad_token_id=1)


UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    norm_num_groups=8, sample_size=32, scaling_factor=0.18215,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                        timestep_spacing="leading")


def perturb(models, seed):
    g = gen(seed)
    with torch.no_grad():
        for m in models:
            for _, p in m.named_parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))


def sd_models():
    torch.manual_seed(0)
    te = CLIPTextModel(text_config())
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(2)
    vae = AutoencoderKL(**VAE_CONFIG)
    perturb([te, unet, vae], 1000)
    te.set_attn_implementation("eager")
    for m in (te, unet, vae):
        m.eval()
    return te, unet, vae


def rewrite_hf_config(path):
    """transformers' config.json plus "torch_dtype" (as the Hub files have it), keys sorted, no final newline."""
    with open(path) as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = "float32"
    with open(path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True))


def save_tiny_sd(folder, te, unet, vae, tok_files):
    sched = DDIMScheduler(**SCHEDULER_CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(os.path.join(tmp, "tok"), tok_files)
        tok = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tok"))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(folder)
    # The tokenizer as the SD1.5 repository ships it (transformers 5 saves tokenizer.json instead).
    shutil.rmtree(os.path.join(folder, "tokenizer"))
    write_tokenizer(os.path.join(folder, "tokenizer"), tok_files)
    # The text encoder with the `text_model.` prefix of the real SD1.5 file.
    sd = {"text_model." + k: v for k, v in te.state_dict().items()}
    os.remove(os.path.join(folder, "text_encoder", "model.safetensors"))
    save_st(os.path.join(folder, "text_encoder", "model.safetensors"), sd, metadata={"format": "pt"})
    rewrite_hf_config(os.path.join(folder, "text_encoder", "config.json"))
    keys = safetensors.safe_open(os.path.join(folder, "text_encoder", "model.safetensors"), "pt").keys()
    check("disk text encoder keys carry 'text_model.' prefix", all(k.startswith("text_model.") for k in keys))


def metric_models():
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
                max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
                projection_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=32,
                  image_size=224, hidden_act="quick_gelu", projection_dim=16)
    torch.manual_seed(20)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    torch.manual_seed(21)
    dino = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              patch_size=16, image_size=224, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu"),
                    add_pooling_layer=False)
    perturb([clip, dino], 2000)
    for m in (clip, dino):
        m.set_attn_implementation("eager")
        m.eval()
    return clip, dino


CLIP_PREPROCESSOR = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                     "feature_extractor_type": "CLIPFeatureExtractor",
                     "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                     "resample": 3, "size": 224}
DINO_PREPROCESSOR = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
                     "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2, "size": 224}


def save_metric_models(out, clip, dino):
    for name, model, extra, pre in [("tiny-clip", clip, True, CLIP_PREPROCESSOR), ("tiny-dino", dino, False, DINO_PREPROCESSOR)]:
        folder = os.path.join(out, name)
        model.save_pretrained(folder)
        rewrite_hf_config(os.path.join(folder, "config.json"))
        path = os.path.join(folder, "model.safetensors")
        sd = safetensors.torch.load_file(path)
        if extra:  # the int64 position_ids buffers of the 2021 checkpoint
            sd["text_model.embeddings.position_ids"] = torch.arange(77).reshape(1, 77)
            sd["vision_model.embeddings.position_ids"] = torch.arange(50).reshape(1, 50)
        os.remove(path)
        save_st(path, sd, metadata={"format": "pt"})
        write_json(os.path.join(folder, "preprocessor_config.json"), pre, indent=2)
    keys = set(safetensors.safe_open(os.path.join(out, "tiny-clip", "model.safetensors"), "pt").keys())
    check("tiny-clip keys == openai/clip-vit-base-patch32 naming (incl. pre_layrnorm, position_ids)",
          len(keys) == 80 and "vision_model.pre_layrnorm.weight" in keys and "text_model.embeddings.position_ids" in keys
          and "logit_scale" in keys, f"{len(keys)} tensors")
    keys = set(safetensors.safe_open(os.path.join(out, "tiny-dino", "model.safetensors"), "pt").keys())
    check("tiny-dino keys == facebook/dino-vits16 naming (no 'vit.' prefix, no pooler)",
          len(keys) == 38 and "embeddings.cls_token" in keys and not any(k.startswith(("vit.", "pooler")) for k in keys),
          f"{len(keys)} tensors")


# ---------------------------------------------------------------------------------------------
# The attention processor: diffusers' AttnProcessor arithmetic, with the Infusion hooks.

class RefAttnProcessor:
    """diffusers' `AttnProcessor` (explicit softmax(QK^T * scale), then P V) with hooks:
    - `capture` (dict): stores this call's probabilities (batch*heads, queries, keys) under `name`.
    - `replay` (dict name -> P): use these probabilities (same layout) instead of the own softmax.
    - `copy` ((src, dst) batch elements): P[dst] <- P[src] after the own softmax (same call).
    - `deltas` (list of (batch element, token positions, dict name -> Delta)): V'[b, k] = V[b, k] + Delta,
      before the head split."""

    def __init__(self, name, state):
        self.name = name
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        st = self.state
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if self.name is not None and st.get("deltas"):
            add = torch.zeros_like(value)
            for b, positions, deltas in st["deltas"]:
                for k in positions:
                    add[b, k] = add[b, k] + deltas[self.name]
            value = value + add
        heads = attn.heads
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        if self.name is not None:
            if st.get("copy"):
                attention_probs = attention_probs.clone()
                for src, dst in st["copy"]:
                    attention_probs[dst * heads:(dst + 1) * heads] = attention_probs[src * heads:(src + 1) * heads]
            if st.get("replay") is not None:
                attention_probs = st["replay"][self.name]
            if st.get("capture") is not None:
                st["capture"].setdefault(self.name, []).append(attention_probs.detach().clone())
        hidden_states = torch.bmm(attention_probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def install_processors(unet, state):
    procs = {}
    for key in unet.attn_processors:
        name = key[: -len(".processor")]
        procs[key] = RefAttnProcessor(name if name in LAYERS else None, state)
    assert sorted(n for n in (p.name for p in procs.values()) if n) == sorted(LAYERS), "cross-attention layers"
    unet.set_attn_processor(procs)


def deltas(seed, scale, unet):
    g = gen(seed)
    out = {}
    mods = dict(unet.named_modules())
    for name in LAYERS:  # the UNet's module order: down, up, mid
        out[name] = scale * torch.randn(mods[name].to_v.out_features, generator=g)
    order = [n for n, _ in unet.named_modules() if n in LAYERS]
    assert order == LAYERS, order
    return out


# ---------------------------------------------------------------------------------------------
# References

def tok_ids(tok, prompts):
    return tok(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids


def tokens_json(tok, merges, vocab_text):
    rows, mismatches = [], []
    simple = SimpleBPE(merges, json.loads(vocab_text))
    for p in TOKEN_PROMPTS:
        ids = tok(p, padding="max_length", truncation=True, max_length=77).input_ids
        full = tok(p).input_ids
        n = min(len(full), 77)
        rows.append({"prompt": p, "ids": ids, "n_tokens": n, "truncated": len(full) > 77,
                     "untruncated_n_tokens": len(full), "tokens": tok.convert_ids_to_tokens(ids[:n])})
        mine = [49406] + simple.encode(p) + [49407]
        if mine != full:
            mismatches.append(p)
    check("tokenizer 'a photo of a cat'", rows[0]["ids"][:7] == [49406, 320, 1125, 539, 320, 2368, 49407], str(rows[0]["ids"][:7]))
    check("tokenizer special ids", tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 49407)
    check("tokens.json: independent python BPE (SimpleTokenizer recipe + NFC) agrees with HF", not mismatches,
          f"mismatches={mismatches}")
    check("tokens.json has a truncated prompt", any(r["truncated"] for r in rows))
    return rows


def ddim_json(sched):
    s50 = DDIMScheduler.from_config(sched.config)
    s50.set_timesteps(50)
    s5 = DDIMScheduler.from_config(sched.config)
    s5.set_timesteps(5)
    check("ddim timesteps 5", [int(t) for t in s5.timesteps] == [801, 601, 401, 201, 1], str([int(t) for t in s5.timesteps]))
    return {
        "alphas_cumprod": [float(x) for x in sched.alphas_cumprod],
        "betas": [float(x) for x in sched.betas],
        "final_alpha_cumprod": float(sched.final_alpha_cumprod),
        "timesteps_50": [int(t) for t in s50.timesteps],
        "timesteps_5": [int(t) for t in s5.timesteps],
        "config": {k: v for k, v in sched.config.items() if not k.startswith("_")},
    }


def encode_image():
    """vae.safetensors' encode.image: a smooth pattern plus uniform noise, in [-1, 1]."""
    g = gen(11)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    lin = torch.linspace(-1, 1, 32)
    ys, xs = torch.meshgrid(lin, lin, indexing="ij")
    base = 0.7 * torch.stack([torch.sin(3 * xs + ys), torch.cos(xs - 2 * ys), xs * ys])[None]
    image = base + 0.3 * (2 * torch.rand(1, 3, 32, 32, generator=g) - 1)
    return latents, image


def denoise(unet, sched, states, z, on_step=None):
    """txt2img's loop: one UNet call on [z, z] with states [uncond, cond], CFG, DDIM step."""
    sched.set_timesteps(STEPS)
    lat, eps_steps = [], []
    for i, t in enumerate(sched.timesteps):
        if on_step:
            on_step(i, t)
        out = unet(torch.cat([z, z]), t, encoder_hidden_states=states).sample
        u, c = out.chunk(2)
        eps = u + GUIDANCE * (c - u)
        z = sched.step(eps, t, z, eta=0.0).prev_sample
        lat.append(z)
        eps_steps.append(eps)
    return torch.cat(lat), torch.cat(eps_steps)


def infusion_run(unet, sched, states, z0, concepts):
    """Batched Infusion: [uncond_F, cond_F, uncond_C, cond_C]; P[cond_C] <- P[cond_F] in every
    cross-attention layer; cond_C's values get the Deltas at the concepts' positions."""
    state = unet._ref_state
    state.clear()
    state["copy"] = [(1, 3)]
    state["deltas"] = [(3, pos, d) for pos, d in concepts]
    sched.set_timesteps(STEPS)
    zf, zc = z0, z0
    f_steps, c_steps, first = [], [], None
    states4 = torch.cat([states, states])
    for t in sched.timesteps:
        out = unet(torch.cat([zf, zf, zc, zc]), t, encoder_hidden_states=states4).sample
        if first is None:
            first = out
        uf, cf, uc, cc = out.chunk(4)
        zf = sched.step(uf + GUIDANCE * (cf - uf), t, zf, eta=0.0).prev_sample
        zc = sched.step(uc + GUIDANCE * (cc - uc), t, zc, eta=0.0).prev_sample
        f_steps.append(zf)
        c_steps.append(zc)
    state.clear()
    return torch.cat(f_steps), torch.cat(c_steps), first


def infusion_two_pass(unet, sched, states, z0, concepts):
    """The same C trajectory in two passes per step: an F pass [uncond_F, cond_F] capturing P_F,
    then a C pass [uncond_C, cond_C] whose cond element replays P_F[cond]."""
    state = unet._ref_state
    sched.set_timesteps(STEPS)
    zf, zc, c_steps = z0, z0, []
    for t in sched.timesteps:
        state.clear()
        state["capture"] = {}
        out = unet(torch.cat([zf, zf]), t, encoder_hidden_states=states).sample
        captured = {k: v[0] for k, v in state["capture"].items()}
        uf, cf = out.chunk(2)
        state.clear()
        state["deltas"] = [(1, pos, d) for pos, d in concepts]
        out_c = run_with_cond_replay(unet, torch.cat([zc, zc]), t, states, captured)
        uc, cc = out_c.chunk(2)
        state.clear()
        zf = sched.step(uf + GUIDANCE * (cf - uf), t, zf, eta=0.0).prev_sample
        zc = sched.step(uc + GUIDANCE * (cc - uc), t, zc, eta=0.0).prev_sample
        c_steps.append(zc)
    return torch.cat(c_steps)


def run_with_cond_replay(unet, x, t, states, captured):
    """One UNet call where, in every cross-attention layer, batch element 1 uses captured[layer]'s
    element-1 probabilities and element 0 its own (implemented by wrapping get_attention_scores)."""
    mods = dict(unet.named_modules())
    originals = {}
    for name in LAYERS:
        attn = mods[name]
        originals[name] = attn.get_attention_scores

        def scores(q, k, mask=None, _attn=attn, _name=name, _orig=attn.get_attention_scores):
            p = _orig(q, k, mask).clone()
            h = _attn.heads
            p[h:2 * h] = captured[_name][h:2 * h]
            return p

        attn.get_attention_scores = scores
    try:
        return unet(x, t, encoder_hidden_states=states).sample
    finally:
        for name in LAYERS:
            del mods[name].get_attention_scores


def psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    w = np.where(w < w.max() * s.shape[0] * 2.2e-16, 0.0, w)
    return (v * np.sqrt(w)) @ v.T


def w2_terms(a, b):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    d = a.shape[1]
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ra = psd_sqrt(sa)
    m = ra @ sb @ ra
    m = (m + m.T) / 2
    w = np.linalg.eigvalsh(m)
    trace_nocut = float(np.sqrt(np.clip(w, 0, None)).sum())
    w = np.where(w < w.max() * d * 2.2e-16, 0.0, w)
    trace_sqrt = float(np.sqrt(w).sum())
    mean_term = float(((mu_a - mu_b) ** 2).sum())
    d2 = mean_term + float(np.trace(sa) + np.trace(sb)) - 2 * trace_sqrt
    # Cross-check: the nuclear norm of the centred cross product.
    xa = (a - mu_a) / math.sqrt(a.shape[0] - 1)
    xb = (b - mu_b) / math.sqrt(b.shape[0] - 1)
    nuclear = float(np.linalg.svd(xa @ xb.T, compute_uv=False).sum())
    return {"mean_term": mean_term, "trace_sqrt_term": trace_sqrt, "w2_squared": d2, "w2": math.sqrt(d2),
            "trace_sqrt_without_small_eig_cut": trace_nocut, "nuclear": nuclear}


def w2_sets(rng, n_a, n_b, d):
    sa = rng.standard_normal((d, d))
    sb = rng.standard_normal((d, d))
    a = rng.standard_normal((n_a, d)) @ sa.T / np.sqrt(d) + 0.5 * rng.standard_normal(d)
    b = 1.5 * rng.standard_normal((n_b, d)) @ sb.T / np.sqrt(d) + 0.5 * rng.standard_normal(d) + 0.3
    return a.astype(np.float32), b.astype(np.float32)


def make_images():
    """8-bit RGB test images: gradients, rings, blocks; each mixed with uniform noise."""
    rng = np.random.default_rng(22)

    def grid(h, w):
        return np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")

    def to_u8(img):
        return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)

    out = []
    y, x = grid(97, 61)
    base = np.stack([0.55 + 0.45 * x, 0.25 + 0.5 * x * y, 0.15 + 0.15 * np.sin(2 * np.pi * x + np.pi * y)], -1)
    out.append(("image0_61x97.png", to_u8(0.9 * base + 0.1 * rng.random((97, 61, 3)))))
    y, x = grid(245, 321)
    r = np.sqrt((x - 0.3) ** 2 + (y - 0.6) ** 2)
    base = np.stack([0.15 + 0.15 * np.sin(28 * r), 0.4 + 0.3 * np.cos(9 * np.pi * x), 0.6 + 0.4 * np.sin(13 * r + 6 * y)], -1)
    out.append(("image1_321x245.png", to_u8(0.8 * base + 0.2 * rng.random((245, 321, 3)))))
    cells = rng.random((224 // 16 + 1, 224 // 16 + 1, 3))
    idx = np.arange(224) // 16
    base = 0.6 * cells[idx][:, idx]
    out.append(("image2_224x224.png", to_u8(0.85 * base + 0.15 * rng.random((224, 224, 3)))))
    return out


def vertical_first(in_w, in_h, out_w, out_h):
    """Pillow 13's pass order for a two-pass resize (the README's rule)."""
    both = in_w != out_w and in_h != out_h
    return bool(both and out_h < in_h and (in_h - out_h) > 2 * (in_w - out_w))


def pillow_weights(n, m, bicubic):
    """Pillow's 8-bit resampling coefficients (n inputs -> m outputs) as an int64 [m, n] matrix."""
    scale = n / m
    fs = max(scale, 1.0)
    support = fs * (2.0 if bicubic else 1.0)
    w = np.zeros((m, n), dtype=np.int64)
    for i in range(m):
        center = (i + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n)
        x = np.abs((np.arange(xmin, xmax) - center + 0.5) * (1.0 / fs))
        if bicubic:
            a = -0.5
            k = np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                         np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))
        else:
            k = np.maximum(0.0, 1.0 - x)
        total = k.sum()
        if total != 0:
            k = k / total
        w[i, xmin:xmax] = np.where(k < 0, np.trunc(k * (1 << 22) - 0.5), np.trunc(k * (1 << 22) + 0.5)).astype(np.int64)
    return w


def pillow_resize(u8, out_w, out_h, bicubic):
    """An independent numpy Pillow (13) 8-bit resize: two separable fixed-point passes, the first
    rounded to uint8; vertical first only under the README's rule."""
    h, w = u8.shape[:2]

    def horizontal(x):
        k = pillow_weights(x.shape[1], out_w, bicubic)
        return np.clip(((1 << 21) + np.einsum("ij,yjc->yic", k, x.astype(np.int64))) >> 22, 0, 255).astype(np.uint8)

    def vertical(x):
        k = pillow_weights(x.shape[0], out_h, bicubic)
        return np.clip(((1 << 21) + np.einsum("ij,jxc->ixc", k, x.astype(np.int64))) >> 22, 0, 255).astype(np.uint8)

    passes = ([vertical] if h != out_h else []) + ([horizontal] if w != out_w else [])
    if not vertical_first(w, h, out_w, out_h):
        passes.reverse()
    for f in passes:
        u8 = f(u8)
    return u8


def cosines(x):
    return x / x.norm(dim=-1, keepdim=True)


def metrics(out, clip, dino, tok, images):
    ref = os.path.join(out, "reference")
    clip_proc = CLIPImageProcessor.from_pretrained(os.path.join(out, "tiny-clip"))
    dino_proc = ViTImageProcessor.from_pretrained(os.path.join(out, "tiny-dino"))
    cs, cc = clip_proc.size, clip_proc.crop_size
    check("CLIP processor from tiny-clip/preprocessor_config.json: shortest_edge 224, crop 224, bicubic, 1/255",
          cs["shortest_edge"] == 224 and (cc["height"], cc["width"]) == (224, 224) and clip_proc.resample == 3
          and abs(clip_proc.rescale_factor - 1 / 255) < 1e-12,
          f"shortest_edge {cs['shortest_edge']}, crop {cc['height']}x{cc['width']}, resample {clip_proc.resample}")
    ds = dino_proc.size
    check("DINO processor from tiny-dino/preprocessor_config.json: 224x224, bilinear, no crop, 1/255",
          (ds["height"], ds["width"]) == (224, 224) and dino_proc.resample == 2
          and not getattr(dino_proc, "do_center_crop", False) and abs(dino_proc.rescale_factor - 1 / 255) < 1e-12,
          f"size {ds['height']}x{ds['width']}, resample {dino_proc.resample}, center crop {getattr(dino_proc, 'crop_size', None)}")
    t = {}
    info_images, clip_pv, dino_pv = [], [], []
    resample_ok = True
    for k, (fname, arr) in enumerate(images):
        im = Image.open(os.path.join(ref, "images", fname))
        rgb = np.asarray(im.convert("RGB"))
        check(f"{fname}: PNG round trip (RGB, {rgb.shape[1]}x{rgb.shape[0]})", np.array_equal(rgb, arr))
        h, w = rgb.shape[:2]
        short, long_ = (w, h) if w <= h else (h, w)
        new_long = int(224 * long_ / short)
        rw, rh = (224, new_long) if w <= h else (new_long, 224)
        top, left = (rh - 224) // 2, (rw - 224) // 2
        full = np.asarray(im.resize((rw, rh), resample=Image.Resampling.BICUBIC))
        resized = full[top:top + 224, left:left + 224]
        dres = np.asarray(im.resize((224, 224), resample=Image.Resampling.BILINEAR))
        resample_ok &= np.array_equal(pillow_resize(rgb, rw, rh, True), full)
        resample_ok &= np.array_equal(pillow_resize(rgb, 224, 224, False), dres)
        pv = clip_proc(images=im, return_tensors="pt").pixel_values
        dpv = dino_proc(images=im, return_tensors="pt").pixel_values
        for name, u8, proc, pix, what in [
                ("CLIP", resized, clip_proc, pv, f"resize {w}x{h} -> {rw}x{rh}, crop top {top} left {left}"),
                ("DINO", dres, dino_proc, dpv, f"resize {w}x{h} -> 224x224")]:
            mean = np.array(proc.image_mean, np.float32)
            std = np.array(proc.image_std, np.float32)
            mine = ((u8.astype(np.float32) * np.float32(1 / 255) - mean) / std).transpose(2, 0, 1)[None]
            check(f"image {k}: {name} pixel_values == numpy recipe ({what})", np.abs(mine - pix.numpy()).max() <= 1e-6)
        t[f"image{k}.rgb_u8"] = torch.from_numpy(rgb.copy())
        t[f"clip.resized_cropped_u8.{k}"] = torch.from_numpy(resized.copy())
        t[f"clip.pixel_values.{k}"] = pv
        t[f"dino.resized_u8.{k}"] = torch.from_numpy(dres.copy())
        t[f"dino.pixel_values.{k}"] = dpv
        clip_pv.append(pv)
        dino_pv.append(dpv)
        info_images.append({"file": fname, "width": w, "height": h, "clip_resized_wh": [rw, rh],
                            "clip_crop_top_left": [top, left], "clip_vertical_first": vertical_first(w, h, rw, rh),
                            "dino_vertical_first": vertical_first(w, h, 224, 224)})
    rng = np.random.default_rng(23)
    for _ in range(24):
        iw, ih, ow, oh = (int(v) for v in rng.integers(5, 120, 4))
        u8 = rng.integers(0, 256, (ih, iw, 3), dtype=np.uint8)
        for bicubic in (True, False):
            pil = np.asarray(Image.fromarray(u8).resize(
                (ow, oh), resample=Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR))
            resample_ok &= np.array_equal(pillow_resize(u8, ow, oh, bicubic), pil)
    check("independent numpy Pillow-resample (fixed point, uint8 intermediate, Pillow 13 pass order) == PIL, bit-exact",
          bool(resample_ok), "(bicubic for CLIP, bilinear for DINO, every image, plus 24 random cases)")
    ids = tok_ids(tok, METRIC_PROMPTS)
    with torch.no_grad():
        pixels = torch.cat(clip_pv)
        vis = clip.vision_model(pixel_values=pixels)
        image_embeds = clip.visual_projection(vis.pooler_output)
        txt = clip.text_model(input_ids=ids)
        eos = ids.argmax(-1)
        text_pooled = txt.last_hidden_state[torch.arange(len(ids)), eos]
        text_embeds = clip.text_projection(text_pooled)
        check("CLIP text: EOS index = first 49407 = n_tokens - 1 (argmax of ids)",
              eos.tolist() == [int((r == 49407).nonzero()[0]) for r in ids], f"eos {eos.tolist()}")
        check("tiny-clip config keeps the legacy eos_token_id 2 (-> argmax pooling), as the real config",
              clip.config.text_config.eos_token_id == 2)
        check("CLIP pooled text == last_hidden_state[i, argmax(ids[i])]", torch.equal(text_pooled, txt.pooler_output))
        masked = clip.text_projection(clip.text_model(input_ids=ids, attention_mask=(torch.arange(77) <= eos[:, None]).long()).pooler_output)
        check("CLIP text embeds with attention_mask == without (causal mask; pooling at EOS)",
              maxdiff(masked, text_embeds) < 1e-6, f"maxdiff {maxdiff(masked, text_embeds):.2e}")
        one = torch.cat([clip.visual_projection(clip.vision_model(pixel_values=p).pooler_output) for p in clip_pv])
        check("CLIP image embeds batch of all == one image at a time", maxdiff(one, image_embeds) < 1e-5,
              f"maxdiff {maxdiff(one, image_embeds):.2e}")
        fwd = clip(input_ids=ids, pixel_values=pixels)
        in_n, tn = cosines(image_embeds), cosines(text_embeds)
        clip_t = in_n @ tn.T
        clip_i = in_n @ in_n.T
        check("CLIPModel forward: text_embeds/image_embeds normalised, logits_per_image = exp(logit_scale) * CLIP-T",
              maxdiff(fwd.image_embeds, in_n) < 1e-6 and maxdiff(fwd.text_embeds, tn) < 1e-6
              and maxdiff(fwd.logits_per_image, clip.logit_scale.exp() * clip_t) < 1e-5,
              f"logits maxdiff {maxdiff(fwd.logits_per_image, clip.logit_scale.exp() * clip_t):.2e}")
        i64, t64 = cosines(image_embeds.double()), cosines(text_embeds.double())
        d64 = max(maxdiff(i64 @ t64.T, clip_t), maxdiff(i64 @ i64.T, clip_i))
        check("CLIP-T / CLIP-I float32 vs float64 cosine", d64 < 1e-6, f"maxdiff {d64:.1e}")
        off = clip_i[~torch.eye(3, dtype=torch.bool)]
        check("CLIP embeddings finite and images distinct", bool(torch.isfinite(image_embeds).all()) and off.max() < 0.999,
              f"CLIP-I offdiag min {off.min():.4f}")
        dout = dino(pixel_values=torch.cat(dino_pv)).last_hidden_state
        cls = dout[:, 0]
        cn = cosines(cls)
        dino_i = cn @ cn.T
        single = torch.cat([dino(pixel_values=p).last_hidden_state[:, 0] for p in dino_pv])
        check("DINO CLS batch of all == one image at a time", maxdiff(single, cls) < 1e-5, f"maxdiff {maxdiff(single, cls):.2e}")
        c64 = cosines(cls.double())
        check("DINO-I float32 vs float64 cosine", maxdiff(c64 @ c64.T, dino_i) < 1e-6)
        off = dino_i[~torch.eye(3, dtype=torch.bool)]
        check("DINO embeddings finite and images distinct", bool(torch.isfinite(cls).all()) and off.max() < 0.999,
              f"DINO-I offdiag min {off.min():.4f}")
        # The saved folders reload (transformers' default attention, then eager: bitwise).
        re_clip = CLIPModel.from_pretrained(os.path.join(out, "tiny-clip"))
        impl = re_clip.config._attn_implementation
        d = maxdiff(re_clip.visual_projection(re_clip.vision_model(pixel_values=pixels).pooler_output), image_embeds)
        check("tiny-clip reloaded (CLIPModel.from_pretrained, default attention) ~= in-memory eager", d < 1e-5,
              f"attn '{impl}' maxdiff {d:.2e}")
        re_clip.set_attn_implementation("eager")
        same = torch.equal(re_clip(input_ids=ids, pixel_values=pixels).logits_per_image, fwd.logits_per_image)
        check("tiny-clip reloaded (eager) == in-memory CLIPModel forward, bitwise", same)
        re_dino = ViTModel.from_pretrained(os.path.join(out, "tiny-dino"), add_pooling_layer=False)
        impl = re_dino.config._attn_implementation
        d = maxdiff(re_dino(pixel_values=torch.cat(dino_pv)).last_hidden_state, dout)
        check("tiny-dino reloaded (ViTModel.from_pretrained, default attention) ~= in-memory eager", d < 1e-5,
              f"attn '{impl}' maxdiff {d:.2e}")
        re_dino.set_attn_implementation("eager")
        check("tiny-dino reloaded (eager) == in-memory bitwise",
              torch.equal(re_dino(pixel_values=torch.cat(dino_pv)).last_hidden_state, dout))
    t.update({
        "clip.vision_last_hidden_state": vis.last_hidden_state, "clip.image_pooled": vis.pooler_output,
        "clip.image_embeds": image_embeds, "clip.image_embeds_normalized": in_n,
        "clip.text_ids": ids, "clip.text_eos_index": eos, "clip.text_last_hidden_state": txt.last_hidden_state,
        "clip.text_pooled": text_pooled, "clip.text_embeds": text_embeds, "clip.text_embeds_normalized": tn,
        "clip.logit_scale": clip.logit_scale.detach().reshape(()), "clip.logits_per_image": fwd.logits_per_image,
        "clip_t": clip_t, "clip_i": clip_i, "dino.last_hidden_state": dout, "dino.cls": cls,
        "dino.cls_normalized": cn, "dino_i": dino_i,
    })
    info = {"clip_i": "cos(image_embeds[i], image_embeds[j])", "clip_preprocessor": CLIP_PREPROCESSOR,
            "clip_t": "cos(image_embeds[i], text_embeds[j])", "dino_i": "cos(cls[i], cls[j])",
            "dino_preprocessor": DINO_PREPROCESSOR, "images": info_images, "prompts": METRIC_PROMPTS,
            "seeds": {"clip_init": 20, "dino_init": 21, "images": 22, "perturbation": 2000}}
    return t, info


def generate(out):
    os.makedirs(out, exist_ok=True)
    ref = os.path.join(out, "reference")
    tok_files, merges = tokenizer_files()
    write_tokenizer(os.path.join(out, "tokenizer"), tok_files)
    tok = CLIPTokenizer.from_pretrained(os.path.join(out, "tokenizer"))

    # tokens.json
    write_json(os.path.join(ref, "tokens.json"), tokens_json(tok, merges, tok_files["vocab.json"]), indent=1)

    te, unet, vae = sd_models()
    sched = DDIMScheduler(**SCHEDULER_CONFIG)
    save_tiny_sd(os.path.join(out, "tiny-sd"), te, unet, vae, tok_files)
    state = {}
    unet._ref_state = state
    install_processors(unet, state)

    with torch.no_grad():
        ids = tok_ids(tok, ["", PROMPT])
        states = te(input_ids=ids).last_hidden_state
        check("text encoder output finite", bool(torch.isfinite(states).all()),
              f"mean {states.mean():.4f} std {states.std():.4f} absmax {states.abs().max():.4f}")
        save_st(os.path.join(ref, "text_encoder.safetensors"), {"ids": ids, "last_hidden_state": states},
                {"prompts": ["", PROMPT]})

        sample = torch.randn(2, 4, 16, 16, generator=gen(10))
        timesteps = torch.tensor([981, 1], dtype=torch.int64)
        eps = unet(sample, timesteps, encoder_hidden_states=states).sample
        check("unet output finite/sane", bool(torch.isfinite(eps).all()),
              f"mean {eps.mean():.4f} std {eps.std():.4f} absmax {eps.abs().max():.4f}")
        sep = torch.cat([unet(sample[i:i + 1], timesteps[i], encoder_hidden_states=states[i:i + 1]).sample for i in range(2)])
        check("per-element timesteps == separate calls (scalar t)", maxdiff(sep, eps) < 1e-5, f"maxdiff {maxdiff(sep, eps):.2e}")
        plain = UNet2DConditionModel(**UNET_CONFIG)
        plain.load_state_dict(unet.state_dict())
        plain.set_attn_processor(AttnProcessor())
        check("RefAttnProcessor (no hooks) == diffusers AttnProcessor bitwise",
              torch.equal(plain(sample, timesteps, encoder_hidden_states=states).sample, eps))
        plain.set_attn_processor(AttnProcessor2_0())
        d = maxdiff(plain(sample, timesteps, encoder_hidden_states=states).sample, eps)
        check("AttnProcessor vs AttnProcessor2_0 (SDPA) close", d < 1e-5, f"maxdiff {d:.2e}")
        del plain
        save_st(os.path.join(ref, "unet.safetensors"),
                {"sample": sample, "timesteps": timesteps, "encoder_hidden_states": states, "eps": eps}, {})

        latents, image = encode_image()
        dec = vae.decode(latents / vae.config.scaling_factor).sample
        check("vae decode shape/finite", dec.shape == (1, 3, 32, 32) and bool(torch.isfinite(dec).all()),
              f"mean {dec.mean():.4f} std {dec.std():.4f} absmax {dec.abs().max():.4f}")
        dist = vae.encode(image).latent_dist
        lv = dist.logvar
        check("vae logvar inside clamp range [-30, 20] (clamp not exercised)", bool((lv > -30).all() and (lv < 20).all()),
              f"logvar range [{lv.min():.3f}, {lv.max():.3f}]")
        save_st(os.path.join(ref, "vae.safetensors"),
                {"decode.latents": latents, "decode.image": dec, "encode.image": image,
                 "encode.mean": dist.mean, "encode.std": dist.std},
                {"decode": "image = vae.decode(latents / scaling_factor).sample", "scaling_factor": 0.18215})

        write_json(os.path.join(ref, "ddim.json"), ddim_json(sched), indent=1)

        # txt2img + the attention maps of its first step
        init = torch.randn(1, 4, 16, 16, generator=gen(12))
        maps = {}

        def on_step(i, t):
            state.clear()
            if i == 0:
                state["capture"] = maps

        lat, geps = denoise(unet, sched, states, init, on_step)
        state.clear()
        final = lat[-1:]
        img = vae.decode(final / vae.config.scaling_factor).sample
        img01 = (img / 2 + 0.5).clamp(0, 1)
        check("txt2img latents finite/sane", bool(torch.isfinite(final).all()),
              f"mean {final.mean():.4f} std {final.std():.4f} absmax {final.abs().max():.4f}")
        save_st(os.path.join(ref, "txt2img.safetensors"),
                {"ids": ids, "encoder_hidden_states": states, "init_noise": init,
                 "timesteps": sched.timesteps.to(torch.int64).clone(), "latents_steps": lat,
                 "guided_eps_steps": geps, "final_latents": final, "image": img, "image_01": img01},
                {"eta": 0.0, "guidance": GUIDANCE, "negative_prompt": "", "prompt": PROMPT, "steps": STEPS})
        att = {}
        for name in LAYERS:
            p = maps[name][0]
            h = dict(unet.named_modules())[name].heads
            att[name] = p[h:2 * h]
        rows_ok = all(torch.allclose(v.sum(-1), torch.ones(()), atol=1e-5) for v in att.values())
        check("attention maps: one per cross-attn layer, rows sum to 1", len(att) == len(LAYERS) and rows_ok)
        save_st(os.path.join(ref, "attention.safetensors"), att,
                {"batch_element": "cond (index 1 of [uncond, cond])", "layout": "(heads, queries=h*w row-major, 77 keys)",
                 "step": 0, "timestep": 801})

        # The pipeline from disk reproduces txt2img.
        pipe = StableDiffusionPipeline.from_pretrained(os.path.join(out, "tiny-sd"), safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.unet.set_attn_processor(AttnProcessor())
        impl = pipe.text_encoder.config._attn_implementation
        pipe.text_encoder.set_attn_implementation("eager")
        check("reloaded pipeline: text encoder == in-memory",
              torch.equal(pipe.text_encoder(input_ids=ids).last_hidden_state, states),
              f"(loaded attn impl was '{impl}', set to 'eager')")
        pl = pipe(PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
                  latents=init.clone(), output_type="latent").images
        check("StableDiffusionPipeline(from disk) latents == manual DDIM loop", maxdiff(pl, final) < 1e-5,
              f"maxdiff {maxdiff(pl, final):.2e}")
        pimg = pipe(PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0,
                    latents=init.clone(), output_type="pt").images
        check("StableDiffusionPipeline(from disk) image == manual image_01", maxdiff(pimg, img01) < 1e-5,
              f"maxdiff {maxdiff(pimg, img01):.2e}")
        del pipe

        # Infusion
        d1, d2 = deltas(1, 0.5, unet), deltas(2, 0.5, unet)
        pos1 = [i for i, x in enumerate(ids[1].tolist()) if x == tok.convert_tokens_to_ids("cat</w>")]
        pos2 = [i for i, x in enumerate(ids[1].tolist()) if x == tok.convert_tokens_to_ids("teapot</w>")]
        assert pos1 == [5] and pos2 == [9], (pos1, pos2)
        zero = {k: torch.zeros_like(v) for k, v in d1.items()}
        f0, c0, _ = infusion_run(unet, sched, states, init, [(pos1, zero)])
        check("infusion: all deltas = 0 -> C trajectory == F exactly (every step)", torch.equal(f0, c0),
              f"maxdiff {maxdiff(f0, c0)}")
        f_lat, c_lat, step0 = infusion_run(unet, sched, states, init, [(pos1, d1)])
        check("infusion: deltas != 0 -> C differs from F", maxdiff(c_lat[-1:], f_lat[-1:]) > 1e-3,
              f"final maxdiff {maxdiff(c_lat[-1:], f_lat[-1:]):.4f} (F absmax {f_lat[-1].abs().max():.3f})")
        check("infusion: F trajectory (batch 4) == txt2img (batch 2)", maxdiff(f_lat, lat) < 1e-4,
              f"maxdiff {maxdiff(f_lat, lat):.2e}")
        two = infusion_two_pass(unet, sched, states, init, [(pos1, d1)])
        check("infusion: batched processor == two-pass (capture/replay) formulation", maxdiff(two, c_lat) < 1e-4,
              f"maxdiff {maxdiff(two, c_lat):.2e}")
        check("infusion step0: uncond_C == uncond_F, cond_C != cond_F",
              torch.equal(step0[0], step0[2]) and not torch.equal(step0[1], step0[3]))
        _, m_lat, _ = infusion_run(unet, sched, states, init, [(pos1, d1), (pos2, d2)])
        check("infusion multi-concept differs from single", maxdiff(m_lat[-1:], c_lat[-1:]) > 1e-3,
              f"maxdiff {maxdiff(m_lat[-1:], c_lat[-1:]):.4f}")
        inf = {"C_latents_steps": c_lat, "F_latents_steps": f_lat, "final_C_latents": c_lat[-1:],
               "final_F_latents": f_lat[-1:], "multi_C_latents_steps": m_lat, "multi_final_C_latents": m_lat[-1:],
               "step0_unet_out": step0, "ids": ids, "init_noise": init,
               "concept1_token_indices": torch.tensor(pos1, dtype=torch.int64),
               "concept2_token_indices": torch.tensor(pos2, dtype=torch.int64)}
        inf.update(d1)
        inf.update({"concept2." + k: v for k, v in d2.items()})
        save_st(os.path.join(ref, "infusion.safetensors"), inf,
                {"concept1": "cat", "concept1_token_indices": pos1, "concept2": "teapot", "concept2_token_indices": pos2,
                 "delta_scale": 0.5, "delta_seeds": [1, 2], "guidance": GUIDANCE, "negative_prompt": "",
                 "prompt": PROMPT, "steps": STEPS})

    # One Infusion training step's gradients.
    train = train_grad(unet, te, tok, sched)
    save_st(os.path.join(ref, "train_grad.safetensors"), train,
            {"concept": "cat", "concept_token_indices": [5], "delta_scale": 0.1, "delta_seed": 3,
             "loss": "mean((eps - eps_C)^2)", "prompt": "a photo of a cat"})

    # W2
    rng = np.random.default_rng(14)
    w2 = {}
    info = {"covariance": "unbiased 1/(n-1)"}
    for tag, (na, nb, d) in [("low", (40, 50, 16)), ("high", (30, 20, 300))]:
        a, b = w2_sets(rng, na, nb, d)
        r = w2_terms(a, b)
        check(f"w2 {tag}: eigh trace-sqrt == nuclear-norm formulation",
              abs(r["trace_sqrt_term"] - r["nuclear"]) <= 1e-9 * r["nuclear"],
              f"{r['trace_sqrt_term']:.12f} vs {r['nuclear']:.12f} (no small-eigenvalue cut: "
              f"{r['trace_sqrt_without_small_eig_cut']:.12f}); d2={r['w2_squared']:.9f}")
        w2.update({f"{tag}.A": torch.from_numpy(a), f"{tag}.B": torch.from_numpy(b)})
        for k in ["mean_term", "trace_sqrt_term", "w2", "w2_squared"]:
            w2[f"{tag}.{k}"] = torch.tensor(r[k], dtype=torch.float64)
        info[tag] = {"d": d, "nA": na, "nB": nb, "trace_sqrt_without_small_eig_cut": r["trace_sqrt_without_small_eig_cut"],
                     "w2": r["w2"], "w2_squared": r["w2_squared"]}
    save_st(os.path.join(ref, "w2.safetensors"), w2, info)

    # Metric models, images, metrics
    clip, dino = metric_models()
    save_metric_models(out, clip, dino)
    images = make_images()
    os.makedirs(os.path.join(ref, "images"), exist_ok=True)
    for fname, arr in images:
        Image.fromarray(arr).save(os.path.join(ref, "images", fname))
    mt, minfo = metrics(out, clip, dino, tok, images)
    save_st(os.path.join(ref, "metrics.safetensors"), mt, minfo)

    write_manifest(out)


def train_grad(unet, te, tok, sched):
    state = unet._ref_state
    ids = tok_ids(tok, ["a photo of a cat"] * 2)
    pos = [5]
    assert ids[0, 5].item() == tok.convert_tokens_to_ids("cat</w>")
    with torch.no_grad():
        states = te(input_ids=ids).last_hidden_state
    g = gen(13)
    z0 = torch.randn(2, 4, 16, 16, generator=g)
    eps = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([500, 20], dtype=torch.int64)
    z_t = sched.add_noise(z0, eps, t)
    abar = sched.alphas_cumprod[t].reshape(2, 1, 1, 1)
    check("z_t formula == scheduler.add_noise", torch.allclose(abar.sqrt() * z0 + (1 - abar).sqrt() * eps, z_t, atol=1e-6))
    d = deltas(3, 0.1, unet)
    unet.requires_grad_(False)
    with torch.no_grad():
        state.clear()
        state["capture"] = {}
        eps_f = unet(z_t, t, encoder_hidden_states=states).sample
        p_f = {k: v[0] for k, v in state["capture"].items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in d.items()}

    def loss_of(delta, dtype=torch.float32):
        state.clear()
        state["replay"] = {k: v.to(dtype) for k, v in p_f.items()}
        state["deltas"] = [(0, pos, delta), (1, pos, delta)]
        out = unet(z_t.to(dtype), t, encoder_hidden_states=states.to(dtype)).sample
        state.clear()
        return ((eps.to(dtype) - out) ** 2).mean(), out

    loss, eps_c = loss_of(leaves)
    loss.backward()
    grads = {k: v.grad.clone() for k, v in leaves.items()}
    check("train grads finite and nonzero for every layer",
          all(bool(torch.isfinite(v).all()) and v.abs().max() > 0 for v in grads.values()))
    # float64 central difference along a random direction
    unet.double()
    g = gen(99)
    direction = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in d.items()}
    h = 1e-4
    with torch.no_grad():
        lp, _ = loss_of({k: d[k].double() + h * direction[k] for k in d}, torch.float64)
        lm, _ = loss_of({k: d[k].double() - h * direction[k] for k in d}, torch.float64)
        l64, _ = loss_of({k: d[k].double() for k in d}, torch.float64)
    unet.float()
    fd = ((lp - lm) / (2 * h)).item()
    ad = sum((grads[k].double() * direction[k]).sum() for k in d).item()
    check("train grad: float32 autograd vs float64 central difference", abs(fd - ad) <= 1e-3 * abs(fd) + 1e-9,
          f"fd {fd:.6e} autograd {ad:.6e}")
    check("train loss float32 vs float64", abs(l64.item() - loss.item()) <= 1e-5 * abs(l64.item()),
          f"{loss.item():.7f} vs {l64.item():.7f}")
    out = {"ids": ids, "encoder_hidden_states": states, "z0": z0, "eps": eps, "t": t, "z_t": z_t,
           "concept_token_indices": torch.tensor(pos, dtype=torch.int64), "eps_F": eps_f, "eps_C": eps_c.detach(),
           "loss": loss.detach().reshape(())}
    out.update(d)
    out.update({"grad." + k: v for k, v in grads.items()})
    return out


# ---------------------------------------------------------------------------------------------
# MANIFEST and the comparison with committed files

def sha16(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def listing(folder):
    out = []
    for root, _, files in os.walk(folder):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), folder)
            if rel != "MANIFEST.txt":
                out.append(rel)
    return sorted(out)


def write_manifest(out):
    lines = [f"{os.path.getsize(os.path.join(out, p)):10d}  {sha16(os.path.join(out, p))}  {p}" for p in listing(out)]
    with open(os.path.join(out, "MANIFEST.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def committed_path(base, rel):
    """rel in the shared layout -> the file under `base` (a shared-layout folder or the project root)."""
    if os.path.exists(os.path.join(base, rel)):
        return os.path.join(base, rel)
    top = rel.split("/")[0]
    if top in ("tiny-sd", "tiny-clip", "tiny-dino"):
        return os.path.join(base, "models", rel)
    if top == "tokenizer":
        return os.path.join(base, "models", "tiny-sd", rel)
    if top in ("reference", "MANIFEST.txt"):
        return os.path.join(base, "tests", "fixtures", rel)
    return os.path.join(base, rel)


TRAJECTORY = ("txt2img.safetensors", "infusion.safetensors")


def tolerance(rel):
    name = os.path.basename(rel)
    if name in TRAJECTORY:
        return 1e-3
    if name in ("w2.safetensors", "ddim.json") or rel.startswith(("tiny-", "tokenizer")):
        return 1e-6
    return 1e-4


def scaled_diff(a, b):
    a = a.double()
    b = b.double()
    if a.numel() == 0:
        return 0.0
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def compare_json(a, b, path=""):
    """-> max scaled numeric difference; raises on a structural/text difference."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), f"{path}: keys differ"
        return max([compare_json(a[k], b[k], f"{path}.{k}") for k in b] + [0.0])
    if isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), f"{path}: lengths differ"
        return max([compare_json(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))] + [0.0])
    if isinstance(b, float) and isinstance(a, (int, float)) and not isinstance(a, bool):
        return abs(a - b) / max(1.0, abs(b))
    assert a == b, f"{path}: {a!r} != {b!r}"
    return 0.0


def compare(generated, base, verbose=False):
    rows, bad, details = [], [], []
    for rel in listing(generated) + ["MANIFEST.txt"]:
        mine, theirs = os.path.join(generated, rel), committed_path(base, rel)
        if not os.path.exists(theirs):
            rows.append((rel, "-", "not committed", "", ""))
            continue
        with open(mine, "rb") as f:
            a = f.read()
        with open(theirs, "rb") as f:
            b = f.read()
        same = a == b
        tol = tolerance(rel)
        if rel.endswith(".safetensors"):
            ta, tb = safetensors.torch.load_file(mine), safetensors.torch.load_file(theirs)
            ma = safetensors.safe_open(mine, "pt").metadata() or {}
            mb = safetensors.safe_open(theirs, "pt").metadata() or {}
            notes = []
            if set(ta) != set(tb):
                notes.append(f"keys differ: only here {sorted(set(ta) - set(tb))}, only committed {sorted(set(tb) - set(ta))}")
            worst, worst_key, exact = 0.0, "", 0
            for k in sorted(set(ta) & set(tb)):
                if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape:
                    notes.append(f"{k}: {ta[k].dtype}{list(ta[k].shape)} vs {tb[k].dtype}{list(tb[k].shape)}")
                    continue
                if torch.equal(ta[k], tb[k]):
                    exact += 1
                    continue
                if not ta[k].is_floating_point():
                    notes.append(f"{k}: integers differ")
                    continue
                dd = scaled_diff(ta[k], tb[k])
                absd = (ta[k].double() - tb[k].double()).abs().max().item()
                details.append(f"{rel}  {k}  {list(tb[k].shape)}  max|diff| {absd:.2e}  "
                               f"/max|ref| {absd / max(tb[k].double().abs().max().item(), 1e-30):.2e}  scaled {dd:.2e}")
                if dd > worst:
                    worst, worst_key = dd, k
            if ma.keys() != mb.keys():
                notes.append("metadata keys differ")
            elif "info" in mb:
                try:
                    md = compare_json(json.loads(ma["info"]), json.loads(mb["info"]), "info")
                    if md > 1e-9:
                        notes.append(f"info numbers differ by {md:.1e}")
                except AssertionError as e:
                    notes.append(str(e))
            elif ma != mb:
                notes.append("metadata differs")
            keys = f"{exact}/{len(tb)} bit-equal"
            if worst_key:
                keys += f"; worst {worst_key}"
            rows.append((rel, "yes" if same else "no", keys, f"{worst:.1e}", "; ".join(notes)))
            if notes or worst > tol:
                bad.append(rel)
        elif rel.endswith(".json") and not same:
            try:
                dd = compare_json(json.loads(a), json.loads(b))
                note = "" if dd <= tol else "over tolerance"
            except (AssertionError, ValueError) as e:
                dd, note = float("nan"), str(e)
            rows.append((rel, "no", "json", f"{dd:.1e}", note))
            if note:
                bad.append(rel)
        elif rel == "MANIFEST.txt" and not same:
            ours = {l.split()[-1]: l for l in a.decode().splitlines()}
            theirs_lines = {l.split()[-1]: l for l in b.decode().splitlines()}
            differ = sorted(p for p in ours if p in theirs_lines and ours[p] != theirs_lines[p])
            rows.append((rel, "no", "lines", "", f"entries differing: {len(differ)} (follows the files above)"))
        else:
            if rel.endswith(".png") and not same:
                ia, ib = np.asarray(Image.open(mine)), np.asarray(Image.open(theirs))
                note = "pixels equal" if np.array_equal(ia, ib) else "PIXELS DIFFER"
            else:
                note = "" if same else "DIFFERS"
            rows.append((rel, "yes" if same else "no", "bytes", "0" if same else "", note))
            if not same and note != "pixels equal":
                bad.append(rel)
    w = max(len(r[0]) for r in rows)
    print(f"\n{'file'.ljust(w)}  byte-equal  max |diff| / max(1, |ref|max)  keys / notes")
    for rel, same, keys, diff, note in rows:
        print(f"{rel.ljust(w)}  {same:10}  {diff:>8}  {keys}{'  ' + note if note else ''}")
    if verbose:
        print("\ntensors that are not bit-equal:")
        print("\n".join(details))
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder to write (the shared fixtures layout)")
    ap.add_argument("--check", nargs="?", const=ROOT, metavar="DIR",
                    help="regenerate (into --out or a temp folder) and compare with DIR: a folder in the shared "
                         "layout or the project root (models/, tests/fixtures/; the default)")
    ap.add_argument("--verbose", action="store_true", help="with --check: list every tensor that is not bit-equal")
    args = ap.parse_args()
    if not args.out and not args.check:
        ap.error("give --out DIR and/or --check [DIR]")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"transformers {transformers.__version__}, safetensors {safetensors.__version__}, numpy {np.__version__}, "
          f"pillow {PIL.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, "fixtures")
        generate(work)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            shutil.copytree(work, args.out, dirs_exist_ok=True)
            if os.path.exists(os.path.join(args.out, "README.md")):
                write_manifest(args.out)
            print(f"wrote {args.out}")
        if args.check:
            bad = compare(work, args.check, args.verbose)
            if bad:
                print(f"\nover tolerance or not equal: {bad}")
                raise SystemExit(1)
            print("\nevery file reproduces (bit-equal, or within the README's tolerances)")


if __name__ == "__main__":
    main()
