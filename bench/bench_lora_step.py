"""Peak memory of one training step of the 2B DiT on the CPU at 256 px: train.py --lora (the base frozen in bf16,
adapters of the default targets trained, AdamW and EMA of the adapters) against a full-parameter step (fp32 weights,
gradients, AdamW and EMA). Each step runs in its own process, whose peak resident memory (ru_maxrss) is the figure;
the model is built on the meta device and its random weights are made straight in their dtype, as loading does.

    python bench/bench_lora_step.py [--layers 26] [--rank 16] [--modes lora full]

One step as train.py takes it: micro-batch 1, a 256-token caption and a 16 x 16 latent (256 px), bf16 autocast,
activation checkpointing, AdamW, the EMA update. A full-parameter step of the 26-layer model needs 52 GB of state
(20 bytes per parameter) and cannot run on a smaller machine: --layers N builds the same model with fewer joint
blocks, so the two modes can also be compared where both fit.
"""

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nextdit import NextDiT, NextDiTConfig, add_lora, lora_state_dict  # noqa: E402
from svgt2i import flow_matching_loss  # noqa: E402
from train import update_ema  # noqa: E402

GB = 1e9


def random_weights(model, dtype):
    """The meta model's tensors made one at a time in `dtype` (norm weights 1, the rest N(0, 0.02)), assigned."""
    for name, p in list(model.named_parameters()):
        owner = model.get_submodule(name.rpartition(".")[0])
        value = torch.ones(p.shape, dtype=dtype) if p.ndim == 1 and "norm" in name else \
            torch.empty(p.shape, dtype=dtype).normal_(0, 0.02)
        setattr(owner, name.rpartition(".")[2], torch.nn.Parameter(value))
    return model


def one_step(mode, layers, rank):
    torch.manual_seed(0)
    cfg = dataclasses.replace(NextDiTConfig.from_name("2b"), in_channels=384, cap_feat_dim=2304, n_layers=layers)
    with torch.device("meta"):
        model = NextDiT(cfg)
    model = random_weights(model, torch.bfloat16 if mode == "lora" else torch.float32)
    model.grad_checkpointing = True
    model.norm_final.requires_grad_(False)
    if mode == "lora":
        add_lora(model.requires_grad_(False), rank, rank)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-15)
    ema = {k: v.detach().clone().float()
           for k, v in (lora_state_dict(model) if mode == "lora" else model.state_dict()).items()}
    g = torch.Generator().manual_seed(0)
    x1, noise = [torch.randn(384, 16, 16, generator=g)], [torch.randn(384, 16, 16, generator=g)]
    caps, mask = torch.randn(1, 256, 2304, generator=g).bfloat16(), torch.ones(1, 256, dtype=torch.bool)
    ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.time()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = flow_matching_loss(model, x1, noise, torch.tensor([0.5]), caps, mask)
    losses.mean().backward()
    torch.nn.utils.clip_grad_norm_(params, 2.0)
    opt.step()
    update_ema(ema, model, 0.9999)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "layers": layers, "rank": rank if mode == "lora" else None,
            "parameters": sum(p.numel() for p in model.parameters()), "trained": sum(p.numel() for p in params),
            "before_step_gb": round(ready / GB, 2), "peak_gb": round(peak / GB, 2), "step_s": round(time.time() - t0, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[26], help="joint blocks (the 2B model: 26)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--one", nargs=2, metavar=("MODE", "LAYERS"), help=argparse.SUPPRESS)   # a child process
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_step(args.one[0], int(args.one[1]), args.rank)))
        return
    print("| step | joint blocks | parameters | trained | resident before the step, GB | peak, GB | step, s |")
    print("|---|---|---|---|---|---|---|")
    for layers in args.layers:
        for mode in args.modes:
            r = subprocess.run([sys.executable, __file__, "--one", mode, str(layers), "--rank", str(args.rank)],
                               capture_output=True, text=True)
            if r.returncode:
                why = "killed: out of memory" if r.returncode in (-9, 137) else r.stderr.strip().splitlines()[-1]
                print(f"| {mode} | {layers} | | | | {why} | |")
                continue
            m = json.loads(r.stdout.strip().splitlines()[-1])
            name = f"LoRA rank {m['rank']}" if mode == "lora" else "full-parameter"
            print(f"| {name} | {layers} | {m['parameters'] / 1e9:.2f}B | {m['trained'] / 1e6:.1f}M | "
                  f"{m['before_step_gb']:.1f} | **{m['peak_gb']:.1f}** | {m['step_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
