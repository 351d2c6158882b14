#!/usr/bin/env python3
"""diffusers on the CPU against `infusion-repl bench` on the same saved weights, side by side.

Runs diffusers (PyTorch's CPU path, f32) on a diffusers folder, then our bench on the same
folder in the same run, and prints the ratio table of the CPU speed issue (#15):

  load the folder | one UNet step at batch 2 (CFG) and 4 | text encoder + VAE decode per image |
  text-to-image per image | the Infusion pair (base + custom) against diffusers' plain image

Each diffusers row is printed as soon as it is measured; ours stream from bench as it runs.
Beside the times, each side's resident peak (VmHWM of its process, started over after each
row's warm-up, Linux) gives a second table: the memory users need, weights included.

  --save-sd15 DIR   first write a folder with random weights (seed 0) in SD1.5's shapes
                    (the UNet, VAE and CLIP text encoder of SD1.5's configs, DDIM scheduler,
                    the fixtures' CLIP tokenizer) and measure on it
  --model DIR       measure on this folder (e.g. ../shared/fixtures/tiny-sd for the tiny rows)

Setup (PyPI, CPU only): pip install torch diffusers==0.42.1 transformers safetensors
  (checked with torch 2.11.0, diffusers 0.42.1, transformers 5.17).

usage: tools/cpu_side_by_side.py (--model DIR | --save-sd15 DIR) [--bin PATH] [--steps 50]
         [--repeats 3] [--threads N] [--only load,unet,vae,txt2img,pair] [--json OUT]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROMPT = "a photo of a cat sitting by a teapot"  # what bench generates (src/app/bench.rs)
GROUPS = ["load", "unet", "vae", "txt2img", "pair"]


def save_sd15(out):
    """A diffusers folder with SD1.5's shapes and random weights (seed 0)."""
    import diffusers
    import torch
    import transformers
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
        layers_per_block=2, latent_channels=4, sample_size=512)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    fixtures = os.path.join(ROOT, "..", "shared", "fixtures", "tiny-sd")
    tok = transformers.CLIPTokenizer.from_pretrained(os.path.join(fixtures, "tokenizer"))
    sched = diffusers.DDIMScheduler.from_pretrained(os.path.join(fixtures, "scheduler"))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)


def reset_peak():
    """Starts this process's resident peak (VmHWM) over, as our bench does (Linux: 5 to
    /proc/self/clear_refs); False where the kernel cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes():
    """This process's resident peak since the last reset_peak (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def timed(fn, repeats, warmup=1):
    """Median seconds of `repeats` calls after `warmup`, and the process's resident peak over
    the timed calls (bytes, or None): the same method as `infusion-repl bench` on the CPU."""
    for _ in range(warmup):
        fn()
    reset = reset_peak()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), (peak_bytes() if reset else None)


def diffusers_rows(model, args, only):
    """(seconds, peak resident bytes) per measurement, printed as each is measured."""
    import diffusers
    import torch
    torch.set_num_threads(args.threads)
    out = {}

    def show(name, measured):
        out[name] = measured
        s, peak = measured
        mib = f"{peak / 2**20:8.0f} MiB peak" if peak else ""
        print(f"diffusers  {name:<40} {s:10.4f} s {mib}", flush=True)

    def load():
        return diffusers.StableDiffusionPipeline.from_pretrained(
            model, safety_checker=None, requires_safety_checker=False)

    if "load" in only:
        show("load the model", timed(load, args.repeats))
    pipe = load()
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    lat = unet.config.sample_size
    with torch.no_grad():
        ids = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        states = text(ids)[0]
        if "unet" in only:
            g = torch.Generator().manual_seed(1)
            t = torch.tensor(500)
            for b in (2, 4):
                x = torch.randn(b, unet.config.in_channels, lat, lat, generator=g)
                ctx = states.repeat(b // 2, 1, 1)
                show(f"unet forward, batch {b}",
                     timed(lambda: unet(x, t, encoder_hidden_states=ctx).sample, args.repeats))
        if "vae" in only:
            show("text encoder, batch 2", timed(lambda: text(ids)[0], args.repeats))
            z = torch.randn(1, vae.config.latent_channels, lat, lat,
                            generator=torch.Generator().manual_seed(2))
            show("vae decode, per image",
                 timed(lambda: vae.decode(z / vae.config.scaling_factor).sample, args.repeats))
        if "txt2img" in only or "pair" in only:
            gen = lambda: pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5,
                               generator=torch.Generator().manual_seed(0), output_type="np")
            show("text-to-image, per image", timed(gen, args.repeats))
            # Per step as bench measures it: (t(3 steps) - t(1 step)) / 2 of whole runs.
            run = lambda n: lambda: pipe(PROMPT, num_inference_steps=n, guidance_scale=7.5,
                                         generator=torch.Generator().manual_seed(0),
                                         output_type="np")
            one, three = timed(run(1), args.repeats), timed(run(3), args.repeats)
            peaks = [p for p in (one[1], three[1]) if p]
            show("text-to-image, per step",
                 (max(0.0, (three[0] - one[0]) / 2), max(peaks) if peaks else None))
    return out


def our_rows(model, args, only):
    """Our bench on the same folder (its rows stream through): (seconds, peak resident bytes)
    by row name."""
    groups = [g for g in only if g != "vae"] + (["vae"] if "vae" in only else [])
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "ours.json")
        cmd = [args.bin, "bench", "--model", model, "--only", ",".join(groups), "--steps",
               str(args.steps), "--repeats", str(args.repeats), "--json", report]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        rows = json.load(open(report))["rows"]
    return {r["name"]: (r["seconds"], r.get("peak_memory_bytes")) for r in rows}


def table(theirs, ours, steps):
    lines = [
        ("loading the folder", "load the model", "load the model", 2.0),
        ("one UNet step at batch 2 (CFG)", "unet forward, batch 2", "unet forward, batch 2", 1.2),
        ("one UNet step at batch 4", "unet forward, batch 4", "unet forward, batch 4", None),
        ("text encoder + VAE decode, per image", ("text encoder, batch 2", "vae decode, per image"),
         ("text encoder, batch 2", "vae decode, per image"), 1.2),
        (f"text-to-image, {steps} steps, per image", "text-to-image, per image",
         "text-to-image, per image", None),
        (f"Infusion pair (base + custom), {steps} steps, vs diffusers' plain image",
         "text-to-image, per image", "infusion pair (base+custom)", 2.0),
        ("one step of text-to-image (whole runs of 1 and 3 steps)", "text-to-image, per step",
         "text-to-image, per step", 0.6),
        ("one step of the pair vs diffusers' plain step (the same runs)",
         "text-to-image, per step", "infusion pair, per step", 1.0),
    ]
    print("\n| measure | diffusers (CPU) | infusion-repl (CPU) | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    result = []
    for title, t_name, o_name, target in lines:
        t_names = t_name if isinstance(t_name, tuple) else (t_name,)
        o_names = o_name if isinstance(o_name, tuple) else (o_name,)
        t = sum(theirs[n][0] for n in t_names) if all(n in theirs for n in t_names) else None
        o = sum(ours[n][0] for n in o_names) if all(n in ours for n in o_names) else None
        if t is None or o is None:
            continue
        tgt = f"<= {target}x" if target else ""
        print(f"| {title} | {t:.3f} s | {o:.3f} s | {o / t:.2f}x | {tgt} |")
        row = dict(measure=title, diffusers_s=t, ours_s=o, ratio=o / t, target=target)
        # The process's resident peak over the timed runs, each side's largest part.
        t_peak = max((theirs[n][1] or 0) for n in t_names)
        o_peak = max((ours[n][1] or 0) for n in o_names)
        if t_peak and o_peak:
            row.update(diffusers_peak_mib=t_peak / 2**20, ours_peak_mib=o_peak / 2**20)
        result.append(row)
    peaks = [r for r in result if "ours_peak_mib" in r]
    if peaks:
        print("\n| measure | diffusers peak RSS | infusion-repl peak RSS | ratio | target |")
        print("|---|---:|---:|---:|---:|")
        for r in peaks:
            t, o = r["diffusers_peak_mib"], r["ours_peak_mib"]
            print(f"| {r['measure']} | {t:.0f} MiB | {o:.0f} MiB | {o / t:.2f}x | <= 1.0x |")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="a diffusers folder both sides load")
    where.add_argument("--save-sd15", help="write random SD1.5-shaped weights here first")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "infusion-repl"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--only", default=",".join(GROUPS))
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args()
    only = [g for g in args.only.split(",") if g]
    bad = [g for g in only if g not in GROUPS]
    if bad:
        sys.exit(f"unknown group(s) {bad}; groups: {', '.join(GROUPS)}")
    model = args.model
    if args.save_sd15:
        model = args.save_sd15
        if not os.path.exists(os.path.join(model, "model_index.json")):
            t0 = time.perf_counter()
            save_sd15(model)
            print(f"saved random SD1.5-shaped weights to {model} in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    if not os.path.exists(args.bin):
        sys.exit(f"{args.bin} does not exist: build it with `cargo build --release` first")
    print(f"{model}: {args.threads} threads, {args.steps} steps, median of {args.repeats}",
          flush=True)
    theirs = diffusers_rows(model, args, only)
    ours = our_rows(model, args, only)
    result = table(theirs, ours, args.steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=model, threads=args.threads, steps=args.steps,
                           diffusers=theirs, ours=ours, table=result), f, indent=1)


if __name__ == "__main__":
    main()
