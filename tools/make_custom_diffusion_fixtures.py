"""Reference fixtures for Custom Diffusion (Kumari et al. 2023) as diffusers trains and loads it,
on the bundled tiny model: examples/custom_diffusion/train_custom_diffusion.py with its default
`--freeze_model crossattn_kv` and one modifier token, `--modifier_token "<new1>"`. The examples are
not in diffusers' wheel nor its sdist; the script was read from the diffusers repository (newest
stored snapshot, commit 58eb52c0, `check_min_version("0.40.0.dev0")`; unchanged in substance since
commit edc154da, the one the other baselines cite: only the licence header, the check_min_version
string, a login hint and a `text_model` fallback for transformers 5 differ). Its README recipe:
`--train_batch_size=2 --learning_rate=1e-5 --scale_lr --hflip --modifier_token "<new1>"
--with_prior_preservation --real_prior --prior_loss_weight=1.0`.

What the script does, and so what this file does:
- Tokenizer (`AutoTokenizer(..., use_fast=False)`): `<new1>` is added (id 49408, `cd.token_id`).
  Its row of the token embedding is set to the initializer's row. The initializer is the script's
  default `--initializer_token` "ktn+pll+ucd" split at "+", so "ktn" for the first modifier token,
  and its id is `tokenizer.encode(["ktn"], add_special_tokens=False)[0]` (a LIST of one string).
  With transformers 4's Python (slow) tokenizers, the versions the script was written for, a list
  of strings is a list of already-split TOKENS: `encode(["ktn"])` is
  `convert_tokens_to_ids(["ktn"])` = [42170], the vocabulary entry "ktn" (the word-initial piece,
  without "</w>"); so one token, id 42170 (`cd.init_token_id`). In this tokenizer the TEXT "ktn"
  is 2 tokens, "k" (74) and "tn</w>" (7248); "ktn</w>" is not in the vocabulary (the same holds
  for the real SD1.x tokenizer: the tiny model's tokenizer is built from CLIP's BPE file). With
  transformers 5.17 the script itself does not run: `encode` of a list is a batch, [[74, 7248]],
  its `len` is 1 so the "single token" check passes, and `token_embeds[x] = token_embeds[[74,
  7248]]` raises a shape error. This file therefore uses the transformers 4 meaning: the row of
  vocabulary id 42170 (for the record, "pll" and "ucd" would be 47629 and 44746).
- Text encoder: everything frozen but the token embedding (`encoder`, `final_layer_norm`,
  `position_embedding` frozen). After backward the gradient rows of every token but `<new1>` are
  zeroed (`grad.data[index, :] = 0`), before clipping.
- UNet frozen; every attention layer gets a CustomDiffusionAttnProcessor: the cross-attention ones
  (`attn2`) with train_kv=True, train_q_out=False, hidden_size (block_out_channels of the block),
  cross_attention_dim 32, `to_k_custom_diffusion.weight` / `to_v_custom_diffusion.weight` loaded
  from the layer's own `to_k.weight` / `to_v.weight` (bias-free Linears); the self-attention ones
  (`attn1`) with train_kv=False (no parameters; they use the layer's to_q/to_k/to_v as usual).
  The processor computes key and value with the new Linears, then for cross-attention
  `detach = ones_like(key); detach[:, :1, :] = 0; key = detach * key + (1 - detach) * key.detach()`
  (the same for value): the BOS token's key and value carry no gradient, so the weights' gradients
  have no BOS term and the text encoder output at position 0 gets no gradient (asserted; the BOS
  embedding row still does, through the later positions attending to it). Forward values are
  unchanged.
  The script instantiates CustomDiffusionAttnProcessor2_0 (SDPA) whenever
  `F.scaled_dot_product_attention` exists, i.e. always; the numbers here come from
  CustomDiffusionAttnProcessor (explicit softmax(QK^T * scale) V, the class diffusers' loader
  builds); the 2_0 class gives the same loss and gradients to 1e-5 relative (asserted). No
  attention mask reaches the processors (the script and the pipeline pass none). Dtypes: the
  processors are made in float32 after the UNet is cast to the training dtype and cast the text
  states to their weights' dtype, so with --mixed_precision the K/V weights stay float32; here
  everything is float32.
- Loss: the script's masked one, `loss = F.mse_loss(pred.float(), target.float(),
  reduction="none"); loss = ((loss * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()`, mask
  [B, 1, h, w]: the numerator sums over the 4 latent channels, the denominator counts mask pixels
  once, so with an all-ones mask this is 4 x the plain MSE.
- Optimizer: AdamW over `itertools.chain(text_encoder.get_input_embeddings().parameters(),
  custom_diffusion_layers.parameters())` (the WHOLE embedding matrix, and AttnProcsLayers of all
  processors = the attn2 K/V weights), lr = learning_rate x gradient_accumulation_steps x
  train_batch_size x num_processes when `--scale_lr` is given. `--scale_lr` is OFF by default
  (store_true) but the README recipe passes it; here lr = 1e-5 x 1 x 2 x 1 = 2e-5 (the README
  recipe also has `--with_prior_preservation`, which doubles it again to 4e-5; not used here).
  betas 0.9/0.999, weight decay 1e-2, eps 1e-8, constant schedule (the default; warmup ignored).
  Clipping: `clip_grad_norm_(chain(text_encoder.parameters(), custom_diffusion_layers.parameters()),
  1.0)` (frozen parameters have no gradient and do not count). Unlike textual_inversion.py, the
  other embedding rows are NOT restored after the step: AdamW's decoupled weight decay scales
  every row by (1 - lr x 1e-2) each step (their Adam update is 0/(0 + eps) = 0). Asserted.

Writes tests/fixtures/baselines/custom_diffusion/:

- `steps.safetensors`: one training step from the fixed batch of make_baseline_fixtures.py
  (`batch.latents` = seeded(11) [2, 4, 16, 16] standing for the encoded images, `batch.noise` =
  seeded(12), `batch.timesteps` [100, 700]) plus `batch.mask` F32 [2, 1, 16, 16] (row 0 all ones,
  row 1 ones on [4:12, 4:12] only, as the script's scale augmentation makes them), prompt "photo of
  a <new1> cat" for both rows (`cd.ids` I64 [2, 77]); pred = unet(DDPMScheduler.add_noise(latents,
  noise, t), t, text_encoder(ids)), target = noise (epsilon prediction). Keys:
  `cd.token_id` I64 [1] (49408), `cd.init_token_id` I64 [1] (42170), `cd.loss` F32 [1],
  `cd.init.token` [1, 32] (the row before the step = row 42170), `cd.grad.token` [1, 32] (the
  `<new1>` row's gradient after the zeroing, before clipping), `cd.grad.LAYER.to_k_custom_diffusion
  .weight` and `cd.grad.LAYER.to_v_custom_diffusion.weight` ([32, 32], mid block [64, 32]) for the
  6 LAYERs (`down_blocks.0.attentions.0.transformer_blocks.0.attn2`, `down_blocks.0.attentions.1...`,
  `up_blocks.1.attentions.{0,1,2}...`, `mid_block.attentions.0.transformer_blocks.0.attn2`),
  `cd.grad_norm` F64 [1] (the total 2-norm of all those gradients before clipping, in float64;
  torch's float32 value agrees to 1e-6), then after clip_grad_norm_ and ONE AdamW step:
  `cd.after.token` [1, 32] and `cd.after.LAYER.to_k_custom_diffusion.weight` / `...to_v...`.
  If the norm is over 1.0, the clipped gradients are recorded too, as `cd.clipped.token` and
  `cd.clipped.LAYER.to_{k,v}_custom_diffusion.weight` (= grad x 1.0 / (norm + 1e-6)). With this
  batch the norm is 0.585, so clipping multiplies by 1 and changes nothing (asserted, bitwise) and
  there are no `cd.clipped.*` keys. (Adam's first step is lr x g / (|g| + eps), so `cd.after` is
  nearly init - lr x sign(g) - lr x 1e-2 x init; some gradient entries are ~5e-9 < eps, whose
  step is a fraction of lr and sensitive to the gradient: compare `cd.after` to about lr, 2e-5.)
- The files, written by the script's own save code from a FIXED state (not the step above), so
  that they visibly differ from the plain model: every attn2 layer's `to_k`/`to_v` weight + 0.05 x
  N(0, 1) noise (one torch.Generator seeded 21, layers in `unet.attn_processors` order = down, up,
  mid, to_k then to_v), and the `<new1>` vector = row 42170 + 0.1 x seeded(22, 32):
  * `pytorch_custom_diffusion_weights.safetensors` (`unet.save_attn_procs(dir,
    safe_serialization=True)`; the script passes no weight_name, this is the default name),
    metadata {"format": "pt"}, 12 F32 tensors `LAYER.processor.to_k_custom_diffusion.weight` and
    `LAYER.processor.to_v_custom_diffusion.weight` (note the `.processor` in the path). The attn1
    processors' empty entries are dropped (safetensors cannot hold them; diffusers logs a warning).
  * `<new1>.safetensors` (the script's `save_new_embed`), metadata {"format": "pt"}, one F32 tensor
    `<new1>` of shape [32] (1-D: the row itself; textual_inversion.py writes [1, 32]).
- `generation.safetensors`: 3 DDIM steps, guidance 7.5, negative "", `init_noise` = txt2img's,
  output_type "latent": `plain.latents` ("a photo of a cat sitting by a teapot", plain pipeline),
  `cd.latents` ("a photo of a <new1> cat sitting by a teapot" with both files loaded),
  `cd_token_only.latents` (the same prompt with only `<new1>.safetensors` loaded, plain attention
  processors), `cd.vector` [1, 32] (the file's vector).
- `steps.safetensors` and `generation.safetensors` carry one metadata key, `info` (JSON: versions,
  script), so that two runs write identical bytes (safetensors orders several keys at random).

Loading, as a diffusers 0.42.1 user (what the script's final inference and the README do):
- `pipe.load_textual_inversion(dir, weight_name="<new1>.safetensors")` works (the token is the
  file's key); `pipe.load_textual_inversion(dir + "/<new1>.safetensors", token="<new1>")` gives
  bit-identical latents.
- `pipe.unet.load_attn_procs(dir, weight_name="pytorch_custom_diffusion_weights.safetensors")`, the
  README's call, does NOTHING: it reads the file and builds the processors, but calls
  `set_attn_processor` only when the private `_pipeline=` argument is given, so the UNet keeps its
  AttnProcessor2_0 everywhere, silently. With `_pipeline=pipe` it raises ValueError for a
  safetensors file ("number of processors 6 does not match ... 12": the attn1 entries are not in
  the file); only a pickle `.bin` written with `safe_serialization=False` (which keeps the attn1
  empty dicts) loads that way. What works with the public API (used for `cd.latents`):
      sd = safetensors.torch.load_file(f"{dir}/pytorch_custom_diffusion_weights.safetensors")
      procs = dict(pipe.unet.attn_processors)
      for name in procs:
          w = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
          if w:
              p = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False,
                      hidden_size=w["to_k_custom_diffusion.weight"].shape[0],
                      cross_attention_dim=w["to_k_custom_diffusion.weight"].shape[1])
              p.load_state_dict(w)
              procs[name] = p
      pipe.unet.set_attn_processor(procs)
  (`from diffusers.models.attention_processor import CustomDiffusionAttnProcessor`). Equivalent,
  through the loader's private helper: `procs.update(pipe.unet._process_custom_diffusion(sd))`
  then `set_attn_processor(procs)`; asserted to give bit-identical latents.

Also asserted: with the original to_k/to_v weights the Custom Diffusion processors reproduce the
UNet with diffusers' AttnProcessor exactly (bitwise, prompt without `<new1>`); before the zeroing
other rows ("cat") have gradients, after it only `<new1>`'s row is nonzero;
the loaded UNet's attn2 processors are CustomDiffusionAttnProcessor holding the file's weights;
`cd.latents` differs from `cd_token_only.latents` and from `plain.latents` (> 1e-3).

Run from the project root with the reference environment (torch, diffusers, transformers):
    python tools/make_custom_diffusion_fixtures.py
"""

import itertools
import json
import os

import diffusers
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import AttnProcsLayers
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    CustomDiffusionAttnProcessor,
    CustomDiffusionAttnProcessor2_0,
)
from transformers import AutoTokenizer, CLIPTextModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "models", "tiny-sd")
OUT = os.path.join(ROOT, "tests", "fixtures", "baselines", "custom_diffusion")
REF = os.path.join(ROOT, "tests", "fixtures", "reference")
TOKEN = "<new1>"
INIT = "ktn"  # the first of the script's default --initializer_token "ktn+pll+ucd"
PROMPT = "photo of a <new1> cat"  # the README's --instance_prompt
BATCH = 2  # --train_batch_size in the README recipe
LR = 1e-5 * 1 * BATCH * 1  # --scale_lr: learning_rate x grad accumulation x batch size x processes
WD, EPS, BETAS, MAX_NORM = 1e-2, 1e-8, (0.9, 0.999), 1.0
WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"


def seeded(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def batch():
    mask = torch.zeros(2, 1, 16, 16)
    mask[0] = 1.0
    mask[1, :, 4:12, 4:12] = 1.0
    return {
        "batch.latents": seeded(11, 2, 4, 16, 16),
        "batch.noise": seeded(12, 2, 4, 16, 16),
        "batch.timesteps": torch.tensor([100, 700], dtype=torch.int64),
        "batch.mask": mask,
    }


def ids(tok, prompt, n=2):
    return tok([prompt] * n, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def tokenizer():
    return AutoTokenizer.from_pretrained(TINY, subfolder="tokenizer", use_fast=False)


def init_token_id(tok):
    """The script's `tokenizer.encode([initializer_token], add_special_tokens=False)[0]` as
    transformers 4's slow tokenizers read a list of strings: tokens, not text."""
    i = tok.convert_tokens_to_ids(INIT)
    assert i == 42170 and i != tok.unk_token_id, i
    assert tok.encode(INIT, add_special_tokens=False) == [74, 7248]  # the text "ktn": 2 tokens
    assert tok.encode([INIT], add_special_tokens=False) == [[74, 7248]]  # transformers 5: a batch
    return i


def attn2_layers(unet):
    return [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]


def custom_procs(unet, cls, offsets=None):
    """The script's processors (train_kv=True, train_q_out=False for attn2), K/V weights from the
    layer's own to_k/to_v (+ offsets[layer] = (dk, dv) if given)."""
    st = unet.state_dict()
    procs = {}
    for name in unet.attn_processors:
        cross = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        layer = name.split(".processor")[0]
        if cross is not None:
            w = {"to_k_custom_diffusion.weight": st[layer + ".to_k.weight"].clone(),
                 "to_v_custom_diffusion.weight": st[layer + ".to_v.weight"].clone()}
            if offsets is not None:
                w["to_k_custom_diffusion.weight"] += offsets[layer][0]
                w["to_v_custom_diffusion.weight"] += offsets[layer][1]
            procs[name] = cls(train_kv=True, train_q_out=False, hidden_size=hidden, cross_attention_dim=cross)
            procs[name].load_state_dict(w)
        else:
            procs[name] = cls(train_kv=False, train_q_out=False, hidden_size=hidden, cross_attention_dim=cross)
    return procs


def masked_loss(pred, target, mask):
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    return ((loss * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()


def cd_step(b, cls=CustomDiffusionAttnProcessor):
    tok = tokenizer()
    te = CLIPTextModel.from_pretrained(TINY, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet")
    assert tok.add_tokens(TOKEN) == 1
    new_id = tok.convert_tokens_to_ids(TOKEN)
    assert new_id == 49408
    init_id = init_token_id(tok)
    te.resize_token_embeddings(len(tok))
    token_embeds = te.get_input_embeddings().weight.data
    token_embeds[new_id] = token_embeds[init_id]
    tm = te.text_model if hasattr(te, "text_model") else te
    for p in itertools.chain(tm.encoder.parameters(), tm.final_layer_norm.parameters(),
                             tm.embeddings.position_embedding.parameters()):
        p.requires_grad = False
    unet.requires_grad_(False)
    unet.set_attn_processor(custom_procs(unet, cls))
    layers = AttnProcsLayers(unet.attn_processors)
    emb = te.get_input_embeddings().weight
    orig = emb.detach().clone()
    params = dict(unet.named_parameters())
    kv_init = {}
    for layer in attn2_layers(unet):
        for kv in ("k", "v"):
            p = params[f"{layer}.processor.to_{kv}_custom_diffusion.weight"]
            assert p.requires_grad
            kv_init[(layer, kv)] = p.detach().clone()
    opt = torch.optim.AdamW(itertools.chain(te.get_input_embeddings().parameters(), layers.parameters()),
                            lr=LR, betas=BETAS, weight_decay=WD, eps=EPS)
    unet.train()
    te.train()

    sched = DDPMScheduler.from_pretrained(TINY, subfolder="scheduler")
    assert sched.config.prediction_type == "epsilon"
    input_ids = ids(tok, PROMPT)
    noisy = sched.add_noise(b["batch.latents"], b["batch.noise"], b["batch.timesteps"])
    states = te(input_ids)[0]
    states.retain_grad()
    pred = unet(noisy, b["batch.timesteps"], states).sample
    loss = masked_loss(pred, b["batch.noise"], b["batch.mask"])
    loss.backward()

    assert (states.grad[:, 0] == 0).all() and states.grad[:, 1].abs().max() > 0, "the detach"
    g = emb.grad
    cat = tok.convert_tokens_to_ids("cat</w>")
    assert g[cat].abs().max() > 0, "no gradient on other rows before the zeroing"
    index_grads_to_zero = torch.arange(len(tok)) != new_id
    g.data[index_grads_to_zero, :] = g.data[index_grads_to_zero, :].fill_(0)
    assert (g[:new_id] == 0).all() and g[new_id].abs().max() > 0

    out = {
        "cd.token_id": torch.tensor([new_id], dtype=torch.int64),
        "cd.init_token_id": torch.tensor([init_id], dtype=torch.int64),
        "cd.ids": input_ids,
        "cd.loss": loss.detach().reshape(1),
        "cd.init.token": orig[new_id].reshape(1, -1),
        "cd.grad.token": g[new_id].clone().reshape(1, -1),
    }
    grads = [g[new_id].double()]
    for (layer, kv) in kv_init:
        gk = params[f"{layer}.processor.to_{kv}_custom_diffusion.weight"].grad
        out[f"cd.grad.{layer}.to_{kv}_custom_diffusion.weight"] = gk.clone()
        grads.append(gk.double().flatten())
    norm64 = torch.cat([x.flatten() for x in grads]).norm()
    norm = torch.nn.utils.clip_grad_norm_(itertools.chain(te.parameters(), layers.parameters()), MAX_NORM)
    assert abs(norm.item() - norm64.item()) <= 1e-6 * norm64.item(), (norm.item(), norm64.item())
    out["cd.grad_norm"] = norm64.reshape(1)
    clipped = norm.item() > MAX_NORM
    if not clipped:  # the clip multiplies by min(1, 1 / (norm + 1e-6)) = 1: nothing changes
        assert torch.equal(g[new_id], out["cd.grad.token"][0])
        for (layer, kv) in kv_init:
            assert torch.equal(params[f"{layer}.processor.to_{kv}_custom_diffusion.weight"].grad,
                               out[f"cd.grad.{layer}.to_{kv}_custom_diffusion.weight"])
    else:
        out["cd.clipped.token"] = g[new_id].clone().reshape(1, -1)
        for (layer, kv) in kv_init:
            out[f"cd.clipped.{layer}.to_{kv}_custom_diffusion.weight"] = \
                params[f"{layer}.processor.to_{kv}_custom_diffusion.weight"].grad.clone()
    opt.step()
    out["cd.after.token"] = emb[new_id].detach().clone().reshape(1, -1)
    for (layer, kv) in kv_init:
        p = params[f"{layer}.processor.to_{kv}_custom_diffusion.weight"].detach()
        assert not torch.equal(p, kv_init[(layer, kv)])
        out[f"cd.after.{layer}.to_{kv}_custom_diffusion.weight"] = p.clone()
    # The other rows: not restored, only decayed (Adam's update of a zero gradient is 0).
    keep = torch.ones(len(tok), dtype=torch.bool)
    keep[new_id] = False
    assert torch.equal(emb.detach()[keep], orig[keep].mul(1 - LR * WD)), "other rows not just decayed"
    assert not torch.equal(emb.detach()[keep], orig[keep])
    return out, clipped


def check_plain_equivalence():
    """CD processors with the original K/V weights == diffusers' AttnProcessor, bitwise."""
    tok = tokenizer()
    te = CLIPTextModel.from_pretrained(TINY, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet")
    b = batch()
    with torch.no_grad():
        states = te(ids(tok, "photo of a cat"))[0]
        unet.set_attn_processor(AttnProcessor())
        plain = unet(b["batch.latents"], b["batch.timesteps"], states).sample
        unet.set_attn_processor(custom_procs(unet, CustomDiffusionAttnProcessor))
        cd = unet(b["batch.latents"], b["batch.timesteps"], states).sample
    assert torch.equal(plain, cd), (plain - cd).abs().max()


def fixed_state(unet, init_vec):
    g = torch.Generator().manual_seed(21)
    st = unet.state_dict()
    offsets = {}
    for layer in attn2_layers(unet):
        dk = 0.05 * torch.randn(st[layer + ".to_k.weight"].shape, generator=g)
        dv = 0.05 * torch.randn(st[layer + ".to_v.weight"].shape, generator=g)
        offsets[layer] = (dk, dv)
    return offsets, (init_vec + 0.1 * seeded(22, 32))


def save_new_embed(text_encoder, modifier_token_id, modifier_token, output_dir, safe_serialization=True):
    """The script's save_new_embed (accelerator.unwrap_model is the identity here)."""
    learned_embeds = text_encoder.get_input_embeddings().weight
    for x, y in zip(modifier_token_id, modifier_token):
        learned_embeds_dict = {}
        learned_embeds_dict[y] = learned_embeds[x]
        if safe_serialization:
            filename = f"{output_dir}/{y}.safetensors"
            safetensors.torch.save_file(learned_embeds_dict, filename, metadata={"format": "pt"})
        else:
            filename = f"{output_dir}/{y}.bin"
            torch.save(learned_embeds_dict, filename)


def write_files():
    """The fixed state, saved by the script's code path. Returns the vector and the K/V state."""
    tok = tokenizer()
    te = CLIPTextModel.from_pretrained(TINY, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet")
    assert tok.add_tokens(TOKEN) == 1
    new_id = tok.convert_tokens_to_ids(TOKEN)
    init_id = init_token_id(tok)
    te.resize_token_embeddings(len(tok))
    offsets, vec = fixed_state(unet, te.get_input_embeddings().weight.data[init_id].clone())
    with torch.no_grad():
        te.get_input_embeddings().weight[new_id] = vec
    unet.set_attn_processor(custom_procs(unet, CustomDiffusionAttnProcessor2_0, offsets))
    unet = unet.to(torch.float32)
    unet.save_attn_procs(OUT, safe_serialization=True)
    save_new_embed(te, [new_id], [TOKEN], OUT, safe_serialization=True)
    expect = {}
    st = unet.state_dict()
    for layer in attn2_layers(unet):
        expect[f"{layer}.processor.to_k_custom_diffusion.weight"] = st[layer + ".to_k.weight"] + offsets[layer][0]
        expect[f"{layer}.processor.to_v_custom_diffusion.weight"] = st[layer + ".to_v.weight"] + offsets[layer][1]
    written = safetensors.torch.load_file(os.path.join(OUT, WEIGHTS))
    assert set(written) == set(expect), sorted(written)
    for k in expect:
        assert torch.equal(written[k], expect[k]), k
    emb_file = safetensors.torch.load_file(os.path.join(OUT, TOKEN + ".safetensors"))
    assert list(emb_file) == [TOKEN] and emb_file[TOKEN].shape == (32,)
    assert torch.equal(emb_file[TOKEN], vec)
    return vec.reshape(1, 32), written


def generate(pipe, prompt, init, **kw):
    return pipe(prompt, negative_prompt="", num_inference_steps=3, guidance_scale=7.5,
                latents=init.clone(), output_type="latent", **kw).images


def pipeline():
    pipe = StableDiffusionPipeline.from_pretrained(TINY, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_custom_diffusion(pipe, path):
    """Public API only: one CustomDiffusionAttnProcessor per layer named in the file."""
    sd = safetensors.torch.load_file(path)
    procs = dict(pipe.unet.attn_processors)
    for name in procs:
        w = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        if w:
            p = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False,
                                             hidden_size=w["to_k_custom_diffusion.weight"].shape[0],
                                             cross_attention_dim=w["to_k_custom_diffusion.weight"].shape[1])
            p.load_state_dict(w)
            procs[name] = p
    pipe.unet.set_attn_processor(procs)


def check_loaded(pipe, written):
    n = 0
    for name, p in pipe.unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            assert type(p) is CustomDiffusionAttnProcessor and p.train_kv and not p.train_q_out, name
            for kv in ("k", "v"):
                assert torch.equal(getattr(p, f"to_{kv}_custom_diffusion").weight.detach(),
                                   written[f"{name}.to_{kv}_custom_diffusion.weight"]), name
            n += 1
    assert n == 6


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    check_plain_equivalence()
    b = batch()
    steps = dict(b)
    cd, clipped = cd_step(b)
    steps.update(cd)
    # The script's class (SDPA) gives the same step to float rounding.
    sdpa, _ = cd_step(b, CustomDiffusionAttnProcessor2_0)
    for k, v in cd.items():
        if v.is_floating_point():
            scale = max(1.0, v.abs().max().item()) if k.startswith("cd.after") else v.abs().max().item()
            d = (sdpa[k] - v).abs().max().item()
            assert d <= 1e-5 * scale, (k, d, scale)

    vec, written = write_files()
    init = safetensors.torch.load_file(os.path.join(REF, "txt2img.safetensors"))["init_noise"]
    gen = {"init_noise": init, "cd.vector": vec}
    prompt = f"a photo of a {TOKEN} cat sitting by a teapot"
    gen["plain.latents"] = generate(pipeline(), "a photo of a cat sitting by a teapot", init)

    # The README's calls: the token loads; load_attn_procs changes nothing.
    pipe = pipeline()
    pipe.unet.load_attn_procs(OUT, weight_name=WEIGHTS)
    kinds = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    print("unet.load_attn_procs(dir, weight_name=...) leaves the processors as:", sorted(kinds))
    pipe.load_textual_inversion(OUT, weight_name=TOKEN + ".safetensors")
    assert pipe.tokenizer.convert_tokens_to_ids(TOKEN) == 49408
    gen["cd_token_only.latents"] = generate(pipe, prompt, init)
    if kinds == {"AttnProcessor2_0"}:
        set_custom_diffusion(pipe, os.path.join(OUT, WEIGHTS))
    check_loaded(pipe, written)
    gen["cd.latents"] = generate(pipe, prompt, init)

    # Other ways: the token with an explicit name, the processors through the loader's helper.
    pipe = pipeline()
    pipe.load_textual_inversion(os.path.join(OUT, TOKEN + ".safetensors"), token=TOKEN)
    procs = dict(pipe.unet.attn_processors)
    procs.update(pipe.unet._process_custom_diffusion(safetensors.torch.load_file(os.path.join(OUT, WEIGHTS))))
    pipe.unet.set_attn_processor(procs)
    check_loaded(pipe, written)
    assert torch.equal(generate(pipe, prompt, init), gen["cd.latents"])
    pipe = pipeline()
    try:
        pipe.unet.load_attn_procs(OUT, weight_name=WEIGHTS, _pipeline=pipe)
        print("load_attn_procs(..., _pipeline=pipe) loaded the safetensors file")
    except ValueError as e:
        print("load_attn_procs(..., _pipeline=pipe) raises:", str(e)[:120])

    d_token = (gen["cd.latents"] - gen["cd_token_only.latents"]).abs().max().item()
    d_plain = (gen["cd.latents"] - gen["plain.latents"]).abs().max().item()
    assert d_token > 1e-3 and d_plain > 1e-3, (d_token, d_plain)
    d_tok_plain = (gen["cd_token_only.latents"] - gen["plain.latents"]).abs().max().item()
    assert d_tok_plain > 1e-3, d_tok_plain

    # One metadata key: safetensors writes several in a random order (the bytes would differ per run).
    meta = {"info": json.dumps({"diffusers": diffusers.__version__, "torch": torch.__version__,
                                "transformers": transformers.__version__,
                                "script": "tools/make_custom_diffusion_fixtures.py"}, sort_keys=True)}
    safetensors.torch.save_file({k: v.contiguous() for k, v in steps.items()},
                                os.path.join(OUT, "steps.safetensors"), metadata=meta)
    safetensors.torch.save_file({k: v.contiguous() for k, v in gen.items()},
                                os.path.join(OUT, "generation.safetensors"), metadata=meta)
    for f in os.listdir(OUT):
        os.chmod(os.path.join(OUT, f), 0o644)
    print("cd.loss", steps["cd.loss"].item(), "grad_norm", steps["cd.grad_norm"].item(),
          "clipped" if clipped else "not clipped (norm <= 1)",
          "| latents max diff vs token only", d_token, "vs plain", d_plain, "token only vs plain", d_tok_plain)
    print({k: list(v.shape) for k, v in steps.items() if not k.startswith("cd.grad.") and not k.startswith("cd.after.")})


if __name__ == "__main__":
    main()
