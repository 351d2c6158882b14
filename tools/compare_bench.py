#!/usr/bin/env python3
"""Ratios of our benchmark (infusion-repl bench --json) to the diffusers baseline
(shared/bench/diffusers_baseline.py --json) measured in the same device call, against the
targets of the CUDA issue. Prints a markdown table per variant of ours (kernels,
convolutions).

A `diffusers-methods.json` beside DIFFUSERS.json (tools/diffusers_method_steps.py) adds a row
per baseline method's training step that ours measured too.

usage: compare_bench.py DIFFUSERS.json OURS.json [OURS.json ...]"""
import json
import os
import sys


def table(ours_path, theirs, methods):
    report = json.load(open(ours_path))
    ours = {r["name"]: r for r in report["rows"]}
    print(f"\n### ours: {report.get('kernels', 'naive')} kernels, "
          f"{report.get('convolutions', 'im2col')} convolutions ({ours_path})\n")
    t2i = theirs["txt2img"]
    train = theirs["train_step"]["per_layer"]
    rows = [
        ("UNet forward, batch 2", ours["unet forward, batch 2"], theirs["unet_forward"]["batch2"], None),
        ("UNet forward, batch 4", ours["unet forward, batch 4"], theirs["unet_forward"]["batch4"], None),
        ("text-to-image, 50 steps", ours["text-to-image, per image"], t2i, 0.8),
        ("Infusion pair vs diffusers' plain image", ours["infusion pair (base+custom)"], t2i, 1.3),
        ("training step, batch 4", ours["training step, batch 4"], train, 1.0),
    ]
    rows += [(name, ours[name], r, None) for name, r in methods.items() if name in ours]
    print("| measurement | ours (s) | diffusers (s) | ratio | target | met | peak ours / diffusers (GiB) |")
    print("|---|---:|---:|---:|---:|---|---|")
    gib = 1024 ** 3
    for name, o, t, target in rows:
        ratio = o["seconds"] / t["median_s"]
        met = "" if target is None else ("yes" if ratio <= target else "no")
        po = o.get("peak_memory_bytes")
        pt = t.get("peak_mem_bytes")
        peak = f"{po / gib:.2f} / {pt / gib:.2f}" if po and pt else "-"
        tgt = "" if target is None else f"<= {target}"
        print(f"| {name} | {o['seconds']:.4f} | {t['median_s']:.4f} | {ratio:.2f} | {tgt} | {met} | {peak} |")
    for name, r in ours.items():
        if (name.startswith("self-attention") or name.startswith("group norm")) and r.get("ratio"):
            print(f"\n{name}: {r['seconds'] * 1e3:.3f} ms, {r['ratio'][1]:.2f}x the naive one")
    po = ours["text-to-image, per image"].get("peak_memory_bytes")
    pt = t2i.get("peak_mem_bytes")
    if po and pt:
        print(f"\nPeak memory of generation: {po / gib:.2f} GiB vs {pt / gib:.2f} GiB "
              f"(target: no higher) -> {'met' if po <= pt else 'not met'}")


def main(theirs_path, ours_paths):
    theirs = json.load(open(theirs_path))
    beside = os.path.join(os.path.dirname(theirs_path), "diffusers-methods.json")
    methods = json.load(open(beside)) if os.path.exists(beside) else {}
    for path in ours_paths:
        table(path, theirs, methods)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
