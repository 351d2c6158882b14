"""Reference fixtures for Perfusion (Tewel et al. 2023, "Key-Locked Rank One Editing for
Text-to-Image Personalization") on the bundled tiny model. There is no official code; this file
implements the paper's equations directly in PyTorch (float64 where the formulas are), with the
tiny model run by diffusers / transformers, independently of the Rust code:

    W'e = W(e - (sim/E) i*) + sigmoid((sim/E - beta)/tau) o*,  sim = e^T C^-1 i*,  E = i*^T C^-1 i*

in every cross-attention layer (`attn2`), for K (o*_K = W_K i_super, locked) and V (o*_V trained);
several concepts: W'e = W(e - I a) + sum_j sigmoid((sim_j/E_j - beta)/tau) o*_j with
a = (I^T C^-1 I)^-1 I^T C^-1 e, the C^-1-orthogonal projection on the span of the i*'s (the
paper's appendix B: Gram-Schmidt / QR in the metric C^-1, here checked against the QR form).

Writes tests/fixtures/baselines/perfusion/:

- `covariance.safetensors`: `cov.matrix` F64 [32, 32], the uncentered covariance mean(e e^T) of the
  tiny text encoder's outputs (`last_hidden_state`, float32, accumulated in float64) over the
  non-padding tokens (start and end tokens included: attention_mask of the tokenizer, padding
  "max_length" 77) of the FIRST 64 captions of assets/perfusion/captions.txt; `cov.tokens` I64 [1].
- `edit.safetensors`: one layer's gated edit (LAYER = down_blocks.0.attentions.0.transformer_blocks
  .0.attn2, W its to_k / to_v weights [32, 32]) with C from above and the inference gate (0.7,
  0.15): `edit.input` [1, 77, 32] = the text encoder's output for "a photo of a teapot on a beach";
  `edit.target` [32] = its "teapot" row (position 5) + 0.05 x seeded(31); `edit.superclass` [32] =
  the "teapot" row; `edit.value_output` [32] = W_V superclass + 0.1 x seeded(32); `edit.key` and
  `edit.value` [1, 77, 32], the edited projections. Two concepts (`multi.*`): the second target
  = the "beach" row (position 8) + 0.05 x seeded(33), its superclass the "beach" row, its value
  output W_V beach + 0.1 x seeded(34): `multi.target2`, `multi.superclass2`,
  `multi.value_output2`, `multi.key`, `multi.value`.
- `step.safetensors`: one training step's loss and gradients (training gate 0.75 / 0.1), prompt
  "a photo of a teapot" for both rows of the baseline batch (latents seeded(11) [2, 4, 16, 16],
  noise seeded(12), timesteps [100, 700], DDPMScheduler.add_noise, epsilon target, plain MSE). The
  concept word is a token added to the tokenizer, in the place of "teapot" (position 5), its
  embedding `step.embedding` [1, 32] = teapot's row + 0.1 x seeded(35). As the learner's first
  batch: `step.superclass` = the mean over the batch of the plain prompt's "teapot" encoding,
  `step.target` = the mean of the concept prompt's encoding at position 5 (no gradient),
  o*_K = W_K superclass, o*_V = W_V superclass per layer (the trained parameter). Keys:
  `batch.latents`, `batch.noise`, `step.loss`, `step.grad.embedding` [1, 32], `step.grad.LAYER.value_output` [out] for the 6 attn2
  LAYERs.

Every file carries one metadata key, `info` (JSON: versions and this script).
Run from the project root with the reference environment (torch, diffusers, transformers):
    python tools/make_perfusion_fixtures.py
"""

import json
import os

import diffusers
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "models", "tiny-sd")
OUT = os.path.join(ROOT, "tests", "fixtures", "baselines", "perfusion")
CAPTIONS = os.path.join(ROOT, "assets", "perfusion", "captions.txt")
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
GATE, TRAIN_GATE = (0.7, 0.15), (0.75, 0.1)
INFO = {"info": json.dumps({
    "script": "tools/make_perfusion_fixtures.py",
    "torch": torch.__version__,
    "diffusers": diffusers.__version__,
    "transformers": transformers.__version__,
})}


def seeded(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def encode(tok, te, prompts):
    enc = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")
    return te(enc.input_ids)[0], enc


def covariance(tok, te):
    with open(CAPTIONS) as f:
        captions = [l.strip() for l in f if l.strip()][:64]
    total = torch.zeros(32, 32, dtype=torch.float64)
    n = 0
    with torch.no_grad():
        for c in captions:
            states, enc = encode(tok, te, [c])
            k = int(enc.attention_mask.sum())
            x = states[0, :k].double()
            total += x.T @ x
            n += k
    return total / n, n


def edit(W, e, inputs, outputs, c_inv, gate):
    """The gated rank-one edit of W [out, in] applied to e [..., in]; inputs [n, in] (the i*'s),
    outputs [n, out] (the o*'s), in float64."""
    beta, tau = gate
    W, e, I, O = W.double(), e.double(), inputs.double(), outputs.double()
    ci = c_inv @ I.T  # [in, n]
    gram = I @ ci  # [n, n]: I^T C^-1 I
    a = e @ ci @ torch.linalg.inv(gram)  # [..., n]
    sim = (e @ ci) / torch.diagonal(gram)  # [..., n]: sim_j / E_j
    return e @ W.T - a @ (I @ W.T) + torch.sigmoid((sim - beta) / tau) @ O


def edit_qr(W, e, inputs, outputs, c_inv, gate):
    """The same through the appendix's route: L L^T = C^-1, QR of L^T I, u = L^-T Q; the
    projection of e on span(I) in the metric C^-1 is u u^T C^-1 e."""
    beta, tau = gate
    W, e, I, O = W.double(), e.double(), inputs.double(), outputs.double()
    L = torch.linalg.cholesky(c_inv)
    q, _ = torch.linalg.qr(L.T @ I.T)
    u = torch.linalg.solve(L.T, q)  # [in, n]
    proj = (e @ c_inv @ u) @ u.T  # [..., in]
    sim = (e @ c_inv @ I.T) / torch.einsum("ni,ij,nj->n", I, c_inv, I)
    return (e - proj) @ W.T + torch.sigmoid((sim - beta) / tau) @ O


class Edited(torch.nn.Module):
    """A cross-attention layer's to_k or to_v with the edit (one concept), as training runs it."""

    def __init__(self, linear, target, output, c_inv, gate):
        super().__init__()
        self.linear, self.target, self.output, self.c_inv, self.gate = linear, target, output, c_inv, gate

    def forward(self, e):
        beta, tau = self.gate
        W = self.linear.weight
        ci = (self.c_inv @ self.target.double()).float()  # [in]
        energy = (self.target.double() @ self.c_inv @ self.target.double()).float()
        s = (e @ ci) / energy  # [b, t]
        wi = W @ self.target
        return e @ W.T - s[..., None] * wi + torch.sigmoid((s - beta) / tau)[..., None] * self.output


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(TINY, subfolder="tokenizer", use_fast=False)
    te = CLIPTextModel.from_pretrained(TINY, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet")
    te.requires_grad_(False)
    unet.requires_grad_(False)
    c, n = covariance(tok, te)
    c_inv = torch.linalg.inv(c)
    safetensors.torch.save_file({"cov.matrix": c, "cov.tokens": torch.tensor([n])},
                                os.path.join(OUT, "covariance.safetensors"), metadata=INFO)

    # One layer's edit, one and two concepts.
    attn = unet.get_submodule(LAYER)
    Wk, Wv = attn.to_k.weight.detach(), attn.to_v.weight.detach()
    with torch.no_grad():
        e, enc = encode(tok, te, ["a photo of a teapot on a beach"])
    ids = enc.input_ids[0].tolist()
    assert ids[5] == tok.convert_tokens_to_ids("teapot</w>"), ids[:9]
    assert ids[8] == tok.convert_tokens_to_ids("beach</w>"), ids[:9]
    sup = e[0, 5]
    target = sup + 0.05 * seeded(31, 32)
    vo = Wv @ sup + 0.1 * seeded(32, 32)
    key = edit(Wk, e, target[None], (Wk @ sup)[None], c_inv, GATE)
    value = edit(Wv, e, target[None], vo[None], c_inv, GATE)
    # For one concept this is the formula as the paper writes it.
    sim = (e.double() @ c_inv @ target.double()) / (target.double() @ c_inv @ target.double())
    paper = (e.double() - sim[..., None] * target.double()) @ Wv.double().T \
        + torch.sigmoid((sim - GATE[0]) / GATE[1])[..., None] * vo.double()
    assert torch.allclose(value, paper, atol=1e-10), (value - paper).abs().max()
    sup2 = e[0, 8]
    target2 = sup2 + 0.05 * seeded(33, 32)
    vo2 = Wv @ sup2 + 0.1 * seeded(34, 32)
    I = torch.stack([target, target2])
    mk = edit(Wk, e, I, torch.stack([Wk @ sup, Wk @ sup2]), c_inv, GATE)
    mv = edit(Wv, e, I, torch.stack([vo, vo2]), c_inv, GATE)
    qr = edit_qr(Wv, e, I, torch.stack([vo, vo2]), c_inv, GATE)
    assert torch.allclose(mv, qr, atol=1e-8), (mv - qr).abs().max()
    # Each target is mapped near its own output (the gate of the other is small there).
    for t, o in ((target, vo), (target2, vo2)):
        got = edit(Wv, t[None], I, torch.stack([vo, vo2]), c_inv, GATE)[0]
        rel = (got - o.double()).norm() / o.norm()
        assert rel < 0.2, rel
    safetensors.torch.save_file({
        "edit.input": e.clone(), "edit.target": target, "edit.superclass": sup.clone(),
        "edit.value_output": vo, "edit.key": key.float(), "edit.value": value.float(),
        "multi.target2": target2, "multi.superclass2": sup2.clone(), "multi.value_output2": vo2,
        "multi.key": mk.float(), "multi.value": mv.float(),
    }, os.path.join(OUT, "edit.safetensors"), metadata=INFO)

    # One training step.
    assert tok.add_tokens("<pot>") == 1
    pot = tok.convert_tokens_to_ids("<pot>")
    te.resize_token_embeddings(len(tok))
    table = te.get_input_embeddings().weight
    teapot = tok.convert_tokens_to_ids("teapot</w>")
    embedding = table[teapot].detach() + 0.1 * seeded(35, 32)
    with torch.no_grad():
        table[pot] = embedding
    with torch.no_grad():
        plain, _ = encode(tok, te, ["a photo of a teapot"] * 2)
        concept, enc = encode(tok, te, ["a photo of a <pot>"] * 2)
    assert enc.input_ids[0, 5] == pot
    superclass = plain[:, 5].mean(0)
    target = concept[:, 5].mean(0)
    layers = [n for n, m in unet.named_modules() if n.endswith("attn2")]
    assert len(layers) == 6, layers
    outputs = {}
    for name in layers:
        a = unet.get_submodule(name)
        o_k = (a.to_k.weight @ superclass).detach()
        o_v = torch.nn.Parameter((a.to_v.weight @ superclass).detach().clone())
        outputs[name] = o_v
        a.to_k = Edited(a.to_k, target, o_k, c_inv, TRAIN_GATE)
        a.to_v = Edited(a.to_v, target, o_v, c_inv, TRAIN_GATE)
    te.get_input_embeddings().weight.requires_grad_(True)
    states = te(enc.input_ids)[0]
    sched = DDPMScheduler.from_pretrained(TINY, subfolder="scheduler")
    latents, noise = seeded(11, 2, 4, 16, 16), seeded(12, 2, 4, 16, 16)
    t = torch.tensor([100, 700])
    pred = unet(sched.add_noise(latents, noise, t), t, states).sample
    loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    out = {
        "step.embedding": embedding[None].clone(),
        "step.superclass": superclass.clone(),
        "step.target": target.clone(),
        "step.loss": loss.detach().reshape(1),
        "batch.latents": latents,
        "batch.noise": noise,
        "step.grad.embedding": te.get_input_embeddings().weight.grad[pot][None].clone(),
    }
    for name, o in outputs.items():
        assert o.grad.abs().max() > 0, name
        out[f"step.grad.{name}.value_output"] = o.grad.clone()
    safetensors.torch.save_file(out, os.path.join(OUT, "step.safetensors"), metadata=INFO)
    print(f"wrote {OUT}: C over {n} tokens, loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
