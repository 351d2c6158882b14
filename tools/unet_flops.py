"""The arithmetic of one SD1.x UNet call, from its diffusers config (issue #25, "toward the
hardware's limit").

Counts multiply-adds (MACs; FLOPs = 2 MACs) layer by layer as diffusers' UNet2DConditionModel
runs them (SD1.x: CrossAttnDownBlock2D x3 + DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D +
CrossAttnUpBlock2D x3; ResnetBlock2D; Transformer2DModel with one BasicTransformerBlock:
self-attention, cross-attention, GEGLU feed-forward), for a batch and a latent size:

- direct: every convolution and matrix product as written;
- as we run it on the CPU: the 3x3 stride-1 convolutions of at least 16x16 outputs by
  Winograd F(4x4, 3x3), whose element-wise stage makes 36 multiplications per 4x4 output tile
  and input channel instead of 144 (4x fewer; the transforms, a few additions and small
  multiples per value, are not counted); smaller ones (8x8) direct.

Norms, activations, softmax and the time embedding are a few percent of the multiply-adds at most
and are listed apart as element-wise work (values touched), not in the MACs.

The walk also counts the parameters of the layers it visits, which checks it against the model:
SD1.5's config gives 859,520,964 and the bundled tiny model's 1,106,212, diffusers' counts
exactly.

No dependency: reads the config JSON only.
    python tools/unet_flops.py [models/tiny-sd/unet/config.json | sd15] [--batch 2] [--size 64]
"""

import argparse
import json
import os

# Output pixels from which our 3x3 stride-1 convolutions run Winograd (`sd::cpu::winograd`).
WINOGRAD_MIN_PIXELS = 16 * 16

SD15 = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
TEXT_TOKENS = 77


class Count:
    """Multiply-adds by kind, and the parameters of the layers walked (a check of the walk:
    SD1.5's UNet has 859,520,964)."""

    def __init__(self):
        self.rows = {}
        self.params = 0
        # Of the stride-1 3x3 convolutions' MACs, those Winograd takes (as direct MACs).
        self.winograd_macs = 0

    def add(self, kind, macs):
        self.rows[kind] = self.rows.get(kind, 0) + macs

    def conv(self, cin, cout, k, hw_out, stride=1):
        self.params += cin * cout * k * k + cout
        macs = cin * cout * k * k * hw_out
        if k == 3 and stride == 1:
            self.add("conv3x3 (stride 1)", macs)
            if hw_out >= WINOGRAD_MIN_PIXELS:
                self.winograd_macs += macs
        elif k == 3:
            self.add("conv3x3 (stride 2)", macs)
        else:
            self.add("conv1x1", macs)

    def linear(self, cin, cout, tokens, kind="linear", bias=True):
        self.params += cin * cout + (cout if bias else 0)
        self.add(kind, cin * cout * tokens)

    def norm(self, ch):
        self.params += 2 * ch


def resnet(c, cin, cout, hw, temb):
    c.norm(cin)
    c.conv(cin, cout, 3, hw)
    c.linear(temb, cout, 1, "time embedding")
    c.norm(cout)
    c.conv(cout, cout, 3, hw)
    if cin != cout:
        c.conv(cin, cout, 1, hw)


def transformer(c, ch, hw, text_dim):
    n = hw
    c.norm(ch)
    c.conv(ch, ch, 1, n)  # proj_in (SD1.x: a 1x1 convolution)
    # Self-attention: q, k, v (no bias) and out projections; scores and weighted sum over n x n.
    c.norm(ch)
    for _ in range(3):
        c.linear(ch, ch, n, "attention projections", bias=False)
    c.linear(ch, ch, n, "attention projections")
    c.add("self-attention q k^T, p v", 2 * n * n * ch)
    # Cross-attention: q and out over n, k and v from the 77 text states.
    c.norm(ch)
    c.linear(ch, ch, n, "attention projections", bias=False)
    c.linear(text_dim, ch, TEXT_TOKENS, "attention projections", bias=False)
    c.linear(text_dim, ch, TEXT_TOKENS, "attention projections", bias=False)
    c.linear(ch, ch, n, "attention projections")
    c.add("cross-attention q k^T, p v", 2 * n * TEXT_TOKENS * ch)
    # GEGLU: ch -> 2 x 4ch, then 4ch -> ch.
    c.norm(ch)
    c.linear(ch, 8 * ch, n, "feed-forward (GEGLU)")
    c.linear(4 * ch, ch, n, "feed-forward (GEGLU)")
    c.conv(ch, ch, 1, n)  # proj_out


def unet(cfg, size):
    c = Count()
    chans = cfg["block_out_channels"]
    temb = 4 * chans[0]
    c.linear(chans[0], temb, 1, "time embedding")
    c.linear(temb, temb, 1, "time embedding")
    layers = cfg["layers_per_block"]
    text_dim = cfg["cross_attention_dim"]
    hw = size * size
    c.conv(cfg["in_channels"], chans[0], 3, hw)
    skips = [chans[0]]
    side = size
    cin = chans[0]
    for i, (ch, kind) in enumerate(zip(chans, cfg["down_block_types"])):
        for _ in range(layers):
            resnet(c, cin, ch, side * side, temb)
            if kind.startswith("CrossAttn"):
                transformer(c, ch, side * side, text_dim)
            cin = ch
            skips.append(ch)
        if i + 1 < len(chans):
            side //= 2
            c.conv(ch, ch, 3, side * side, stride=2)
            skips.append(ch)
    mid = chans[-1]
    resnet(c, mid, mid, side * side, temb)
    transformer(c, mid, side * side, text_dim)
    resnet(c, mid, mid, side * side, temb)
    rev = list(reversed(chans))
    cin = mid
    for i, (ch, kind) in enumerate(zip(rev, cfg["up_block_types"])):
        for _ in range(layers + 1):
            skip = skips.pop()
            resnet(c, cin + skip, ch, side * side, temb)
            if kind.startswith("CrossAttn"):
                transformer(c, ch, side * side, text_dim)
            cin = ch
        if i + 1 < len(rev):
            side *= 2
            c.conv(ch, ch, 3, side * side)  # upsampler: nearest x2, then a 3x3 convolution
    c.norm(chans[0])
    c.conv(chans[0], cfg["out_channels"], 3, size * size)
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="sd15")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=64, help="latent side (64 for 512 px)")
    args = ap.parse_args()
    if args.config == "sd15":
        cfg = SD15
    else:
        with open(args.config) as f:
            cfg = {**SD15, **json.load(f)}
    c = unet(cfg, args.size)
    b = args.batch
    total = sum(c.rows.values()) * b
    wino = c.winograd_macs * b
    winograd = total - wino + wino / 4
    print(
        f"UNet of {os.path.basename(args.config)}, batch {b}, {args.size}x{args.size} latents "
        f"({c.params:,} parameters walked)"
    )
    print(f"{'part':34} {'GMACs':>10} {'share':>7}")
    for kind, macs in sorted(c.rows.items(), key=lambda kv: -kv[1]):
        print(f"{kind:34} {macs * b / 1e9:10.1f} {macs * b / total:7.1%}")
    print(f"{'total (direct)':34} {total / 1e9:10.1f}   = {2 * total / 1e12:.3f} TFLOPs")
    print(
        f"{'with Winograd F(4x4,3x3) >= 16x16':34} {winograd / 1e9:10.1f}   = "
        f"{2 * winograd / 1e12:.3f} TFLOPs of multiply-adds"
    )


if __name__ == "__main__":
    main()
