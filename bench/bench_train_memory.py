"""Per-GPU memory of DiT training under DDP and FSDP (train.py --parallel), computed from byte counts: the table
in the README. No GPU is used or needed.

    python bench/bench_train_memory.py [--micro-batch 48] [--cap-len 256] [--grid 16] [--gpus 8 16 64]
    python bench/bench_train_memory.py --lora 16 64      # train.py --lora on one GPU: the README's LoRA table

Model state: exact parameter counts of the presets (built on the meta device) times the bytes each holds:
DDP keeps on every GPU fp32 weights (4), fp32 gradients (4, DDP's buckets are views of them), AdamW's two fp32
moments (8) and the fp32 EMA (4), i.e. 20 bytes per parameter, plus bf16 copies of the weights that autocast
makes in the forward (2). FSDP keeps 20 / N bytes per parameter, plus a working set of unsharded blocks in bf16:
the block running and the one prefetched (2 x 2 bytes per block parameter), one block's bf16 gradient and its fp32
copy for the reduce-scatter (2 + 4), and the root's parameters (embedders, final layer: 2), which stay gathered
from forward to backward.

Activations: the bytes autograd saves for backward, counted with torch.autograd.graph.saved_tensors_hooks
(distinct storages, weights and their bf16 copies excluded) in a forward of the model at its real width on the
CPU, bf16 autocast as train.py uses on the GPU, K/V repeated for the masked attention as the CUDA path does; per
token and per block kind (joint, noise refiner, context refiner, the rest), scaled to the micro-batch (every
sample at the worst case: a full caption of --cap-len tokens and a --grid x --grid latent). With activation
checkpointing a joint block keeps only its fp32 input during the forward and recomputes one block at a time in
the backward. CPU kernels are not CUDA's (flash / memory-efficient attention save the same out + logsumexp, but
a GPU measurement would settle the last few percent); the caching allocator's fragmentation is not counted.

--lora RANK ...: one GPU of train.py --lora: the frozen base in bf16 (2 bytes per parameter: no fp32 master, no
gradient, no AdamW, no EMA), the adapters of the default targets with fp32 weights, gradients, AdamW and EMA (20
bytes per adapter parameter), and the activations measured as above on the model with its adapters (the base frozen:
autograd saves what the adapters' and the inputs' gradients need), with checkpointing, at 256, 512 and 1024 px
(captions of 256, 256 and 512 tokens: stages 1, 2 and 4) and micro-batch 1-4; with Gemma-2-2B in bf16 and DINOv3 on
the GPU, or without them (--cache: the features precomputed).
"""

import argparse
import contextlib
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nextdit  # noqa: E402
from dinov3 import DINOv3, DINOv3Config  # noqa: E402
from gemma2 import Gemma2, Gemma2Config  # noqa: E402
from nextdit import NextDiT, NextDiTConfig  # noqa: E402
from svgt2i import flow_matching_loss  # noqa: E402

GB = 1e9


def count(module):
    return sum(p.numel() for p in module.parameters())


def sizes(name):
    """Parameter counts of a preset at the release's widths (384 latent channels, Gemma's 2304)."""
    with torch.device("meta"):
        m = NextDiT(dataclasses.replace(NextDiTConfig.from_name(name), in_channels=384, cap_feat_dim=2304))
    blocks = [*m.noise_refiner, *m.context_refiner, *m.layers]
    total = count(m)
    return {"total": total, "trainable": total - count(m.norm_final), "block": max(count(b) for b in blocks),
            "root": total - sum(count(b) for b in blocks)}


def state_bytes(s, gpus=1, fsdp=False):
    """Weights, gradients, AdamW, EMA and the transient bf16 parameters of one GPU."""
    if not fsdp:
        return 16 * s["trainable"] + 4 * s["total"], 2 * s["trainable"]
    return (16 * s["trainable"] + 4 * s["total"]) / gpus, (2 * 2 + 2 + 4) * s["block"] + 2 * s["root"]


@contextlib.contextmanager
def saved_by_region(model, out):
    """out[region] += bytes of the distinct storages autograd saves while a block of that region runs."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape)[::o] for p in model.parameters() if p.ndim == 2 for o in (1, -1)}
    seen, region = set(), ["rest"]

    def enter(name):
        def hook(module, args):
            region[0] = name
        return hook

    handles = []
    for name in ("layers", "noise_refiner", "context_refiner"):
        for block in getattr(model, name):
            handles.append(block.register_forward_pre_hook(enter(name)))
            handles.append(block.register_forward_hook(lambda m, a, o: region.__setitem__(0, "rest")))

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            weight_copy = t.ndim == 2 and t.dtype == torch.bfloat16 and tuple(t.shape) in weight_shapes
            key = "weight copies" if weight_copy else region[0]
            out[key] = out.get(key, 0) + st.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for h in handles:
            h.remove()


def measure(name, cap_len=24, grid=4, batch=2, lora_rank=None):
    """Saved bytes per padded token and block of each region, from one bf16-autocast forward of `batch` samples at
    the real width with 1 joint layer (captions of cap_len and cap_len - 8 tokens: padded, so masked as in
    training)."""
    cfg = dataclasses.replace(NextDiTConfig.from_name(name), in_channels=384, cap_feat_dim=2304, n_layers=1)
    torch.manual_seed(0)
    model = NextDiT(cfg)
    if lora_rank:                                           # train.py --lora: the base frozen, adapters trained
        nextdit.add_lora(model.requires_grad_(False), lora_rank, lora_rank)
    g = torch.Generator().manual_seed(0)
    x1 = [torch.randn(384, grid, grid, generator=g) for _ in range(batch)]
    noise = [torch.randn(384, grid, grid, generator=g) for _ in range(batch)]
    caps = torch.randn(batch, cap_len, 2304, generator=g)
    mask = torch.arange(cap_len)[None] < torch.tensor([cap_len - 8 * (i % 2) for i in range(batch)])[:, None]
    out = {}
    repeat = nextdit.REPEAT_KV_WHEN_MASKED
    nextdit.REPEAT_KV_WHEN_MASKED = {"cpu", "cuda"}          # what CUDA runs for a masked batch
    try:
        with saved_by_region(model, out), torch.autocast("cpu", dtype=torch.bfloat16):
            flow_matching_loss(model, x1, noise, torch.rand(batch, generator=g), caps, mask)
    finally:
        nextdit.REPEAT_KV_WHEN_MASKED = repeat
    S, N = cap_len + grid * grid, grid * grid
    R = cfg.n_refiner_layers
    per_token = {"layers": out["layers"] / (batch * S), "noise_refiner": out["noise_refiner"] / (R * batch * N),
                 "context_refiner": out["context_refiner"] / (R * batch * cap_len), "rest": out["rest"] / (batch * S)}
    return per_token, NextDiTConfig.from_name(name)


def activations(per_token, cfg, B, cap_len, grid):
    """Saved bytes of a micro-batch of B samples: without and with activation checkpointing."""
    N, S = grid * grid, cap_len + grid * grid
    refiners = cfg.n_refiner_layers * (per_token["noise_refiner"] * N + per_token["context_refiner"] * cap_len)
    rest = per_token["rest"] * S
    joint = per_token["layers"] * S
    plain = B * (refiners + rest + cfg.n_layers * joint)
    # checkpointed: each joint block keeps its fp32 input [S, dim]; one block's activations are rebuilt in backward
    ckpt = B * (refiners + rest + cfg.n_layers * 4 * S * cfg.dim + joint)
    return plain, ckpt


def frozen_bytes():
    """Gemma-2-2B in bf16 (its embedding apart: gathered whole when Gemma is sharded), DINOv3 ViT-S/16+ in fp32."""
    with torch.device("meta"):
        gemma, dino = Gemma2(Gemma2Config()), DINOv3(DINOv3Config())
    return 2 * count(gemma), 2 * count(gemma.embed_tokens), 2 * max(count(l) for l in gemma.layers), 4 * count(dino)


def lora_table(ranks, gemma, dino):
    """The README's LoRA table: one GPU, rank x resolution x micro-batch, GB with and without the frozen encoders."""
    cfg = dataclasses.replace(NextDiTConfig.from_name("2b"), in_channels=384, cap_feat_dim=2304)
    with torch.device("meta"):
        total = count(NextDiT(cfg))
    print("| rank | px | micro-batch | base bf16 | adapters + grads, AdamW, EMA | activations (checkpointing) | "
          "total, --cache | + Gemma bf16, DINOv3 |")
    print("|---|---|---|---|---|---|---|---|")
    for rank in ranks:
        with torch.device("meta"):
            adapted = nextdit.add_lora(NextDiT(cfg), rank, rank)
        adapters = sum(v.numel() for v in nextdit.lora_state_dict(adapted).values())
        per_token, preset = measure("2b", lora_rank=rank)
        for px, cap_len in ((256, 256), (512, 256), (1024, 512)):
            for B in (1, 2, 3, 4):
                _, ckpt = activations(per_token, preset, B, cap_len, px // 16)
                kept = 2 * total + 20 * adapters
                print(f"| {rank} | {px} | {B} | {2 * total / GB:.2f} | {adapters / 1e6:.1f}M: {20 * adapters / GB:.2f} | "
                      f"{ckpt / GB:.2f} | **{(kept + ckpt) / GB:.1f}** | {(kept + ckpt + gemma + dino) / GB:.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--micro-batch", type=int, default=48, help="images per GPU per forward (README's stage 1)")
    p.add_argument("--cap-len", type=int, default=256, help="caption tokens (stage 1's maximum)")
    p.add_argument("--grid", type=int, default=16, help="latent grid side (256 px / 16)")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--lora", type=int, nargs="+", metavar="RANK", help="the LoRA table (train.py --lora) instead")
    args = p.parse_args()
    torch.set_num_threads(1)
    gemma, embed, gemma_layer, dino = frozen_bytes()
    if args.lora:
        return lora_table(args.lora, gemma, dino)
    print(f"frozen: Gemma-2-2B bf16 {gemma / GB:.2f} GB (with --shard-text-encoder {gemma / GB:.2f} / N + "
          f"{(embed + 2 * gemma_layer) / GB:.2f} gathered while encoding), DINOv3 fp32 {dino / GB:.2f} GB")
    rows = []
    for name in ("2b", "0.8b"):
        s = sizes(name)
        per_token, cfg = measure(name)
        plain, ckpt = activations(per_token, cfg, args.micro_batch, args.cap_len, args.grid)
        print(f"{name}: {s['total']:,} parameters ({s['trainable']:,} trainable), largest block {s['block']:,}, "
              f"root {s['root']:,}; saved per token and block: " +
              ", ".join(f"{k} {v / 1e3:.1f} kB" for k, v in per_token.items()))
        for fsdp, gpus in [(False, None)] + [(True, g) for g in args.gpus]:
            kept, transient = state_bytes(s, gpus, fsdp)
            total = kept + transient + ckpt
            rows.append(f"| {name.upper()} | {'FSDP' if fsdp else 'DDP'} | {gpus or 'any'} | {kept / GB:.1f} | "
                        f"{transient / GB:.2f} | {ckpt / GB:.1f} / {plain / GB:.1f} | **{total / GB:.1f}** | "
                        f"{(total + gemma + dino) / GB:.1f} |")
    print(f"\nPer GPU, GB; activations of a micro-batch of {args.micro_batch} at {args.cap_len} caption + "
          f"{args.grid ** 2} image tokens, with / without checkpointing\n")
    print("| model | parallel | GPUs | weights, grads, AdamW, EMA | bf16 working set | activations | total "
          "(checkpointing) | + Gemma bf16, DINOv3 |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))

if __name__ == "__main__":
    main()
