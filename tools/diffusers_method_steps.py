#!/usr/bin/env python3
"""One training step of each baseline method as diffusers' scripts take it, timed, to set
beside `infusion-repl bench`'s "training step, batch 4, METHOD" rows (tools/compare_bench.py
prints the ratios). Random weights in SD1.5's shapes from the shared baseline's configs
(shared/bench/diffusers_baseline.py, found beside this script's argument `--baseline`), batch 4,
512x512 (64x64 latents), the model in `--dtype`, the trained parameters in f32 as the scripts'
mixed precision keeps them:
- textual_inversion: the token embedding table trains (the script's way), the text encoder runs
  with gradient, the UNet's input gradient flows back through it;
- lora: peft rank 4 on to_q/to_k/to_v/to_out.0 (train_dreambooth_lora.py's targets);
- dreambooth: every UNet parameter, AdamW (train_dreambooth.py), the UNet in f32 (the script's
  master weights) with `--dtype`'s autocast;
- infusion: the paper's step written with diffusers' attention processors (there is no
  diffusers script): F's UNet pass without gradient records every cross-attention's
  probabilities, C's pass uses them with one residual per layer added to the concept token's
  value, and only those 16 residuals train (AdamW, lr 0.01), as `infusion-repl train` does.

On the CPU each step's peak resident memory is measured too (VmHWM, started over after the
warm-up through /proc/self/clear_refs, as `bench` does). Measure one method per process
(`--methods lora`): memory an earlier method freed may stay with the process.

usage: diffusers_method_steps.py --baseline PATH/diffusers_baseline.py [--device cuda]
       [--dtype fp16] [--tiny] [--json OUT] [--methods textual_inversion,lora,dreambooth]
"""
import argparse
import importlib.util
import json
import sys

import torch
import torch.nn.functional as F


def load_baseline(path):
    spec = importlib.util.spec_from_file_location("diffusers_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--methods", default="infusion,textual_inversion,lora,dreambooth")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    base = load_baseline(args.baseline)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    dev = torch.device(args.device)
    b = base.Bench(dev, args.warmup, args.repeats)
    lat_hw, batch = (16 if args.tiny else 64), 4
    sched = base.scheduler()
    g = torch.Generator("cpu").manual_seed(3)
    lat = torch.randn(batch, 4, lat_hw, lat_hw, generator=g).to(dev)
    noise = torch.randn(batch, 4, lat_hw, lat_hw, generator=g).to(dev)
    t = torch.randint(0, 1000, (batch,), generator=g).to(dev)
    ids = base.token_ids(dev)[1:].expand(batch, -1)
    out = {}

    def record(name, r):
        out[name] = r
        rss = r.get("peak_rss_bytes")
        mem = f", peak RSS {rss / 2**20:.0f} MiB" if rss else ""
        print(f"{name}: {r['median_s']:.4f} s/step{mem}", flush=True)
        if args.json:
            json.dump(out, open(args.json, "w"), indent=1)

    for method in args.methods.split(","):
        try:
            run(method, base, args, b, dev, dtype, (lat, noise, t, ids, sched), record)
        except Exception as e:  # one method's failure (a missing package, memory) keeps the rest
            print(f"{method}: not measured ({type(e).__name__}: {e})", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


CONCEPT_TOKEN = 5  # the concept word's position in the prompt's ids (any one will do for timing)


class InfusionProcessor:
    """A cross-attention layer of F (records its probabilities) or of C (uses F's, and adds the
    layer's residual to the concept token's value)."""

    def __init__(self, name, state):
        self.name, self.state = name, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.to_v(encoder_hidden_states)
        if self.state["mode"] == "f":
            probs = attn.get_attention_scores(q, k, None)
            self.state["probs"][self.name] = probs.detach()
        else:
            probs = self.state["probs"][self.name]
            onehot = torch.zeros(v.shape[1], 1, dtype=v.dtype, device=v.device)
            onehot[CONCEPT_TOKEN] = 1
            v = v + onehot * self.state["delta"][self.name].to(v.dtype)
        out = attn.batch_to_head_dim(torch.bmm(probs, attn.head_to_batch_dim(v)))
        return attn.to_out[1](attn.to_out[0](out))


def infusion_layers(unet, dev):
    """Sets Infusion's processor on every cross-attention layer; returns the shared state."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    state = {"mode": "f", "probs": {}, "delta": {}}
    procs = {}
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name[: -len(".processor")])
            state["delta"][name] = torch.zeros(attn.to_v.out_features, device=dev,
                                               requires_grad=True)
            procs[name] = InfusionProcessor(name, state)
        else:
            procs[name] = AttnProcessor2_0()
    unet.set_attn_processor(procs)
    return state


def peak_rss_reset():
    """Starts the process's resident peak over (Linux; what `bench` does per row)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run(method, base, args, b, dev, dtype, batch_data, record):
    lat, noise, t, ids, sched = batch_data
    unet, _, text = base.build_models(args.tiny, 0)
    text.to(dev, dtype)
    lr = 1e-4
    if method == "dreambooth":
        unet.to(dev, torch.float32).requires_grad_(True)
        params = list(unet.parameters())
    else:
        unet.to(dev, dtype)
    if method == "textual_inversion":
        emb = text.get_input_embeddings()
        emb.weight.data = emb.weight.data.float()
        emb.requires_grad_(True)
        params = [emb.weight]
    if method == "lora":
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
    if method == "infusion":
        state = infusion_layers(unet, dev)
        params = list(state["delta"].values())
        lr = 1e-2
    opt = torch.optim.AdamW(params, lr=lr)

    def step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            if method == "textual_inversion":
                states = text(ids)[0]
            else:
                with torch.no_grad():
                    states = text(ids)[0]
            noisy = sched.add_noise(lat, noise, t).to(dtype if method != "dreambooth" else torch.float32)
            if method == "infusion":
                state["mode"] = "f"
                with torch.no_grad():
                    unet(noisy, t, encoder_hidden_states=states)
                state["mode"] = "c"
            pred = unet(noisy, t, encoder_hidden_states=states).sample
        loss = F.mse_loss(pred.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(b.warmup):
        step()
    b.reset_mem()
    peak_rss_reset()
    r = b.time(step, warmup=0)
    if method == "infusion":  # the residuals, and only they, learned something
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        assert not any(p.requires_grad for p in unet.parameters())
    r.update(peak_mem_bytes=b.peak(), peak_rss_bytes=peak_rss_bytes(),
             trainable=sum(p.numel() for p in params))
    # The names of bench's rows.
    label = {"lora": ", lora rank 4", "infusion": ""}.get(method, f", {method}")
    record(f"training step, batch 4{label}", r)


if __name__ == "__main__":
    sys.exit(main())
