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
  master weights) with `--dtype`'s autocast.

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
    ap.add_argument("--methods", default="textual_inversion,lora,dreambooth")
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
        print(f"{name}: {r['median_s']:.4f} s/step", flush=True)
        if args.json:
            json.dump(out, open(args.json, "w"), indent=1)

    for method in args.methods.split(","):
        try:
            run(method, base, args, b, dev, dtype, (lat, noise, t, ids, sched), record)
        except Exception as e:  # one method's failure (a missing package, memory) keeps the rest
            print(f"{method}: not measured ({type(e).__name__}: {e})", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def run(method, base, args, b, dev, dtype, batch_data, record):
    lat, noise, t, ids, sched = batch_data
    unet, _, text = base.build_models(args.tiny, 0)
    text.to(dev, dtype)
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
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            if method == "textual_inversion":
                states = text(ids)[0]
            else:
                with torch.no_grad():
                    states = text(ids)[0]
            pred = unet(sched.add_noise(lat, noise, t).to(dtype if method != "dreambooth" else torch.float32),
                        t, encoder_hidden_states=states).sample
        loss = F.mse_loss(pred.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    b.reset_mem()
    r = b.time(step)
    r.update(peak_mem_bytes=b.peak(), trainable=sum(p.numel() for p in params))
    # The names of bench's rows.
    label = "lora rank 4" if method == "lora" else method
    record(f"training step, batch 4, {label}", r)


if __name__ == "__main__":
    sys.exit(main())
