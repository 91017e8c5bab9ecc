"""
Train SVG-T2I's diffusion transformer: flow matching in normalised DINOv3 feature space, captions
from Gemma-2, torch DDP or FSDP2 on one or many nodes, bf16 autocast, the paper's four stages
(Table 4).

    # one node, 8 GPUs, stage 1 (256 px) from scratch
    torchrun --nproc_per_node 8 train.py --stage 1 --data data.jsonl --out runs/s1 \\
        --autoencoder pre-trained/autoencoder/svg_autoencoder-P-stage3.ckpt \\
        --dinov3 pre-trained/dinov3_vits16plus_pretrain_lvd1689m-*.pth \\
        --stats pre-trained/dinov3_s16p_layer_patchtoken_stats_dist.pt --gemma gemma-2-2b \\
        --micro-batch 48
    # the next stage starts from the previous one's weights (frozen parts, statistics carry over)
    torchrun --nproc_per_node 8 train.py --stage 2 --data data.jsonl --out runs/s2 \\
        --init-from runs/s1
    # many nodes: the same command on every node
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        train.py --stage 1 ...
    # continue a run that stopped (preempted, crashed, killed): bit-exact continuation
    torchrun --nproc_per_node 8 train.py --stage 1 ... --out runs/s1 --resume
    # GPUs a replica does not fit: FSDP2 shards weights, gradients, AdamW and EMA; --resume works
    # across modes and world sizes (4 nodes: shard within each, replicate across them)
    torchrun --nproc_per_node 8 train.py --stage 1 ... --parallel fsdp
    torchrun --nnodes 4 ... train.py --stage 1 ... --parallel fsdp --hsdp-shard 8
    # tiny everything (model and frozen encoders), on a laptop CPU in seconds
    python train.py --model tiny --data data.jsonl --out runs/tiny
    # the toy model of toy.py (data, frozen parts, decoder, then this same loop)
    python toy.py train
    # fine-tune the release on your images through rank-16 LoRA adapters, on one GPU
    python train.py --stage 3 --lora 16 --init-from pre-trained/dit-*/ --data mine.jsonl ...

A step (the loop below): a micro-batch of images, each cropped to the aspect bucket closest to its
own (data.py), is encoded by DINOv3 in fp32 and normalised with the latent statistics (x1); t is
logit-normal shifted by the resolution; svgt2i.flow_matching_loss regresses
NextDiT(x_t, t, caption) onto x1 - noise, per sample, and the losses are averaged over
the global batch.

Where we differ from the official trainer, on purpose (README, "Where we differ"): captions are cut
at the stage's length and their variants really sampled; the EMA decays at 0.9999 with a warm-up;
every random draw of a sample is seeded by its place in the data stream (the same run on any number
of GPUs, resumed bit for bit); an unreadable image is replaced by the next record, with a warning;
DDP by default, and gradients reduced in fp32 under --parallel fsdp.
"""

import argparse
import contextlib
import dataclasses
import math
import os
import time

import torch

from data import Records, TrainSet, crops_for
from nextdit import LORA_TARGETS, PRESETS, NextDiT, NextDiTConfig, lora_state_dict, nextdit_keymap
from plumbing import UsageError
from plumbing.cli import HelpFormatter, add_system_args, check_train_args, command_line
from plumbing.files import read_state_dict
from plumbing.loading import lora_model
from plumbing.frozen import dit_run_record, setup_frozen
from plumbing.release import DIT_CHECKPOINT_FILES, init_weights_file
from plumbing.runs import (Dist, Meter, batch_plan, check_finite, check_replicas,
                           checkpoint_to_resume, data_stream, end_of_run, end_of_step, fmt_time,
                           load_fitting, open_run, peak_flops, restore_state, stop_on_signals,
                           warn_skipped, wrap_ddp, write_checkpoint)
from plumbing.sharding import (parallel_plan, read_model_ema_optimizer, shard,
                               write_model_ema_optimizer)
from svgt2i import SYSTEM_PROMPTS, flow_matching_loss, sample_training_t, training_shift

# -------------------------------------------------------------------------------------------------
# Stages (Table 4) and the official recipe (reference nextdit.md section 4)

# stage: resolution, global batch, steps, max text tokens, caption length ratios
# (short, middle, long; Table 1: data C/D for stages 1-3, the high-aesthetic data E for stage 4)
STAGES = {
    1: dict(resolution=256, global_batch=1536, steps=91_000, max_text_len=256,
            caption_ratios=(0.10, 0.35, 0.55)),
    2: dict(resolution=512, global_batch=768, steps=90_000, max_text_len=256,
            caption_ratios=(0.10, 0.35, 0.55)),
    3: dict(resolution=1024, global_batch=768, steps=44_000, max_text_len=256,
            caption_ratios=(0.10, 0.35, 0.55)),
    4: dict(resolution=1024, global_batch=768, steps=40_000, max_text_len=512,
            caption_ratios=(0.0, 0.0, 1.0)),
}
RECIPE = dict(save_every=2000, log_every=10, workers=min(4, os.cpu_count() or 1),
              checkpointing=True, threads=0, lr=2e-4, ema_decay=0.9999)
# --model tiny runs every stage on a CPU: half the resolution, small batches, few steps; one
# intra-op thread (the tiny tensors gain nothing from more; on a busy machine extra ones spin).
TINY_STAGE = dict(global_batch=16, steps=100, save_every=50, log_every=10, workers=0,
                  checkpointing=False, threads=1)
# --model toy (python toy.py train): 64-px images (4 x 4 DINOv3 patches), a higher lr, a shorter
# EMA for 2,200 steps; no activation checkpointing (same weights bit for bit, a quarter faster).
TOY_STAGE = dict(resolution=64, global_batch=64, steps=2200, lr=1e-3, ema_decay=0.999,
                 save_every=250, log_every=50, workers=0, checkpointing=False)

ADAM_BETAS, ADAM_EPS = (0.9, 0.95), 1e-15  # upstream's AdamW; a constant lr (no warm-up, schedule)
T_BINS = 10                                # loss is logged per t-bin: [0, 0.1), ..., [0.9, 1]


# -------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train SVG-T2I's NextDiT (flow matching in DINOv3 "
                                            "latent space).", formatter_class=HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--stage", type=int, default=1, help="1-4: a Table 4 preset (resolution, "
                   "batch, steps, text length, caption ratios); each can be overridden below")
    g.add_argument("--model", default="2b", help="NextDiT preset: " + ", ".join(PRESETS))
    g.add_argument("--model-config", default=None, help="JSON object of NextDiTConfig overrides, "
                   "e.g. '{\"n_layers\": 8}' (in_channels and cap_feat_dim always follow the "
                   "frozen encoders)")
    g.add_argument("--data", help=".jsonl file of {\"path\", \"prompt\"} records (required)")
    g.add_argument("--out", help="output folder: checkpoints, logs, statistics (required)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                   help="continue exactly: from OUT's latest checkpoint, or from the given "
                        "run/checkpoint folder")
    g.add_argument("--init-from", default=None, metavar="DIR", help="start from these weights "
                   "(the previous stage's run or checkpoint folder, or an official consolidated "
                   ".pth); mismatched shapes are dropped with a warning; frozen parts and "
                   "statistics default to that run's")
    g.add_argument("--init-from-ema", action="store_true",
                   help="with --init-from: take the EMA weights")
    g.add_argument("--seed", type=int, default=0,
                   help="model init; data order, captions, t and noise per sample")
    g = p.add_argument_group("stage preset overrides (default: the --stage preset; --model tiny "
                             "halves the resolution and uses global batch 16, 100 steps, one "
                             "thread, no loader workers, a checkpoint every 50)")
    g.add_argument("--resolution", type=int, help="anchor resolution: crops of about "
                   "resolution^2 px")
    g.add_argument("--steps", type=int, help="total optimizer steps of this stage")
    g.add_argument("--global-batch", type=int, help="images per optimizer step, all ranks")
    g.add_argument("--max-text-len", type=int, help="Gemma tokens per caption (multiple of 8)")
    g.add_argument("--caption-ratios", help="short,middle,long caption sampling ratios")
    g = p.add_argument_group("recipe")
    g.add_argument("--micro-batch", type=int, help="images per forward pass per rank (default: "
                   "the whole local batch); global batch = micro-batch x accumulation x world")
    g.add_argument("--lr", type=float,
                   help="AdamW learning rate, constant (default 2e-4; --model toy: 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=2.0,
                   help="max global gradient norm (0: no clipping)")
    g.add_argument("--ema-decay", type=float, help="EMA decay (default 0.9999; --model toy: "
                   "0.999; the official trainer: 0.95)")
    g.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false", help="use "
                   "--ema-decay from the first update (default: min(decay, (1 + n) / (10 + n)))")
    g.add_argument("--caption-dropout", type=float, default=0.1,
                   help="probability of the empty caption (for CFG)")
    g.add_argument("--zh-ratio", type=float, default=0.2,
                   help="probability of the Chinese caption when present")
    g.add_argument("--system-prompt", default="base", help="for records without one: "
                   + ", ".join(SYSTEM_PROMPTS) + ", or a literal")
    g = p.add_argument_group("frozen parts")
    g.add_argument("--autoencoder", help="SVG autoencoder checkpoint (its decoder is what "
                   "sample.py needs; its encoder.* keys, if any, are DINOv3)")
    g.add_argument("--dinov3", help="DINOv3 ViT-S/16+ weights "
                   "(dinov3_vits16plus_pretrain_lvd1689m-*.pth)")
    g.add_argument("--gemma", help="Gemma-2-2B folder (config.json, safetensors, tokenizer.model)")
    g.add_argument("--stats", help="latent statistics (dinov3_s16p_layer_patchtoken_stats_dist"
                   ".pt); default: computed from the data into OUT/latent_stats.pt")
    g.add_argument("--stats-images", type=int, default=10000,
                   help="images used to compute the statistics")
    g.add_argument("--cache", metavar="DIR", help="precompute DINOv3 latents and Gemma features "
                   "of the whole data set into DIR (once), then train from it")
    g = p.add_argument_group("LoRA: fine-tune --init-from's DiT, frozen, through low-rank adapters")
    g.add_argument("--lora", type=int, metavar="RANK", help="train rank-RANK adapters (nextdit.py, "
                   "LoRA); the base is held in the autocast dtype and its shape is --init-from's")
    g.add_argument("--lora-alpha", type=float, help="adapter scale alpha / rank (default: rank)")
    g.add_argument("--lora-targets", default=",".join(LORA_TARGETS), help="the layers adapted, by "
                   "name: qkv, out, w1, w2, w3 (attention and SwiGLU), adaLN_modulation")
    g = add_system_args(p)
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="DiT autocast (master weights stay fp32); auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--text-dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="Gemma dtype; auto: bf16 on GPU (as upstream), fp32 on CPU")
    g.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="ddp: a full "
                   "replica per rank; fsdp: FSDP2, weights, gradients, AdamW and EMA sharded over "
                   "the ranks (for models a replica does not fit)")
    g.add_argument("--hsdp-shard", type=int, metavar="N", help="with --parallel fsdp: shard "
                   "within groups of N ranks (a node), replicate across the groups")
    g.add_argument("--shard-text-encoder", action="store_true", help="shard the frozen Gemma "
                   "over the ranks too (FSDP2; default: a bf16 copy per rank)")
    g.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing of the joint blocks (default: on, off for "
                        "--model tiny)")
    g.add_argument("--compile", action="store_true", help="torch.compile each DiT block "
                   "(regional: one graph serves all layers; the first steps compile)")
    g.add_argument("--peak-tflops", type=float, help="accelerator peak for the MFU estimate "
                   "(default: known GPUs' dense bf16 peak)")
    return p.parse_args(argv)


def finish_args(args):
    """Every flag left unset takes its --stage preset's value (--model tiny: every stage at half
    its resolution; toy: the toy's recipe); then all are checked once (plumbing.cli)."""
    if args.stage in STAGES:                # (another --stage is refused by check_train_args)
        preset = dict(STAGES[args.stage], **RECIPE)
        if args.model == "tiny":
            preset.update(TINY_STAGE, resolution=preset["resolution"] // 2)
        elif args.model == "toy":
            preset.update(TOY_STAGE)
        for k, v in preset.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    return check_train_args(args, STAGES)


# -------------------------------------------------------------------------------------------------
# The model, the batch, the step


def build_config(args, latent_channels, text_dim):
    """The --model preset with --model-config's overrides; the widths follow the frozen parts."""
    try:
        return dataclasses.replace(NextDiTConfig.from_name(args.model),
                                   **(args.model_config or {}), in_channels=latent_channels,
                                   cap_feat_dim=text_dim)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--model-config: {e}") from None


def build_model(args, config, dist, init_file, bf16):
    """NextDiT (initialised from --seed, then --init-from; with --parallel fsdp then sharded), its
    trainable parameters, AdamW and an fp32 EMA of every tensor (sharded as the weights are)."""
    torch.manual_seed(args.seed)
    with torch.device(dist.device):    # whole on every rank first: the same init as unsharded
        # (--lora: the base, frozen, from --init-from's file, and fresh adapters)
        model = lora_model(init_file, args, config, dist.device, bf16) if args.lora else \
            NextDiT(config)
    model.grad_checkpointing = args.checkpointing
    if args.compile:
        model.compile_blocks()
    # `norm_final` is in every checkpoint but unused by forward: frozen, or DDP waits for its
    # gradient forever
    model.norm_final.requires_grad_(False)
    if init_file is not None and not args.lora:  # what fits: mis-shaped tensors dropped, warned
        load_fitting(model, nextdit_keymap(read_state_dict(str(init_file))),
                     f"--init-from {init_file}", dist)
    if args.parallel == "fsdp":
        blocks = [*model.noise_refiner, *model.context_refiner, *model.layers]
        shard(model, blocks, dist.mesh, bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW's default per-tensor loop is slow on DTensors; foreach computes the same bits
    impl = ({"fused": True} if dist.device.type == "cuda" else
            {"foreach": True} if args.parallel == "fsdp" else {})
    opt = torch.optim.AdamW(params, lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                            weight_decay=args.weight_decay, **impl)
    ema = {k: v.detach().clone().float()       # of every tensor; with --lora, of the adapters
           for k, v in (lora_state_dict(model) if args.lora else model.state_dict()).items()}
    dist.log(f"NextDiT {args.model}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable "
             f"parameters, {config.in_channels} latent channels, caption width "
             f"{config.cap_feat_dim}")
    return model, params, opt, ema


def prepare_batch(items, frozen, stats, cache, max_text_len, device, text_dtype):
    """Micro-batch items -> normalised latents x1 (list of [C, h_i, w_i], fp32), caption features
    [B, L, D], caption mask [B, L]."""
    if cache is None:
        raw = frozen.encode_images([it["image"] for it in items])
        feats, mask = frozen.encode_texts([it["text"] for it in items], max_text_len)
    else:                  # cached features hold the valid tokens only: pad to the longest
        raw = [it["latent"].to(device) for it in items]
        L = max(it["text_feats"].shape[0] for it in items)
        feats = torch.zeros(len(items), L, items[0]["text_feats"].shape[1], dtype=text_dtype,
                            device=device)
        mask = torch.zeros(len(items), L, dtype=torch.bool, device=device)
        for b, it in enumerate(items):
            n = it["text_feats"].shape[0]
            feats[b, :n], mask[b, :n] = it["text_feats"].to(device), True
    x1 = [stats.normalize(r[None])[0] for r in raw]
    return x1, feats.to(device), mask.to(device)


def draw_t_and_noise(items, x1, anchor_tokens, device):
    """Each sample's t [B] (logit-normal, shifted for `anchor_tokens` image tokens) and noise
    (like x1), from its own seed."""
    t, noise = [], []
    for it, x in zip(items, x1):
        g = torch.Generator().manual_seed(it["noise_seed"])
        t.append(sample_training_t(1, anchor_tokens, generator=g))
        noise.append(torch.randn(x.shape, generator=g).to(device))
    return torch.cat(t).to(device), noise


def ema_decay(args, n):
    """The EMA decay of update n: --ema-decay, with the warm-up min(decay, (1 + n) / (10 + n))."""
    return min(args.ema_decay, (1 + n) / (10 + n)) if args.ema_warmup else args.ema_decay


@torch.no_grad()
def update_ema(ema, model, decay):
    for name, p in model.named_parameters():
        if p.requires_grad:            # (a frozen tensor's EMA is itself)
            ema[name].lerp_(p.detach().float(), 1 - decay)


def train_flops(config, cap_lens, img_lens):
    """Training FLOPs of one micro-batch: forward + backward = 3 forwards of
    NextDiTConfig.flops per sample (no recomputation: MFU counts model FLOPs)."""
    return sum(3 * config.flops(c, n) for c, n in zip(cap_lens, img_lens))


def meter_losses(meter, losses, t):
    """Per-sample losses [B] into the meter: their mean, and per t-bin (loss_t0 .. loss_t9)."""
    losses, bins = losses.detach().cpu(), (t.detach().cpu() * T_BINS).long().clamp(0, T_BINS - 1)
    meter.add(loss=losses, **{f"loss_t{b}": losses[bins == b] for b in range(T_BINS)})


def report(dist, meter, out, args, step, skipped):
    """The interval's means over every rank: printed, and a record of OUT/log.jsonl."""
    m = meter.report(step, skipped)
    by_t = [m[f"loss_t{b}"] for b in range(T_BINS)]
    rec = {"step": step, "loss": m["loss"], "loss_by_t": by_t, "grad_norm": m["grad_norm"],
           "images_per_s": m["images_per_s"], "mfu": m["mfu"], "lr": args.lr,
           "skipped": m["skipped"], "elapsed_s": m["elapsed_s"]}
    bins = " ".join("-" if v is None else f"{v:.3f}" for v in by_t)
    mfu = "n/a" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%"
    dist.record(out, f"step {step}/{args.steps} ({100 * step / args.steps:.1f}%) loss "
                f"{m['loss']:.4f} | by t {bins} | grad {m['grad_norm']:.3f} | "
                f"{m['images_per_s']:.1f} img/s | MFU {mfu} | skipped {m['skipped']} | "
                f"eta {fmt_time(m['eta_s'])}", rec)


def save(dist, out, model, ema, opt, counters, skipped, run_record, stats_path, args):
    """OUT/ckpt-{step:07d}/ (DIT_CHECKPOINT_FILES), once the replicas are proven identical. Every
    rank calls it."""
    sharded = args.parallel == "fsdp"
    check_replicas(model, dist, shards=(args.hsdp_shard or dist.world) if sharded else 1)
    write_checkpoint(dist, out, args.keep, counters, skipped, run_record,
                     lambda folder: write_model_ema_optimizer(folder, model, ema, opt, dist,
                                                              sharded, counters["step"]),
                     stats=stats_path, seed=args.seed, resolution=args.resolution,
                     parallel=args.parallel)


# -------------------------------------------------------------------------------------------------
# Training


def train(args):
    # Setup this process: rank, world, device, dtypes, the batch split, the mesh when sharded
    dist = Dist.start(args.device)
    device = args.device = dist.device
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = "bf16" if device.type == "cuda" else "fp32"      # --precision, --text-dtype auto
    precision = auto if args.precision == "auto" else args.precision
    text_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        auto if args.text_dtype == "auto" else args.text_dtype]
    per_rank, accum = batch_plan(args, dist)       # images per rank, micro-batches per step
    parallel_plan(args, dist)

    # Setup the run folder: OUT/ (locked), the checkpoint to resume, the weights to start from
    out = open_run(args.out, args.resume, dist)
    resume_from = args.resume and checkpoint_to_resume(args.resume, out, DIT_CHECKPOINT_FILES,
                                                       dist.warn)
    init_file = (init_weights_file(args.init_from, args.init_from_ema)   # (--lora: its base)
                 if args.init_from and (args.lora or not resume_from) else None)

    # Setup the frozen parts: given, else from the run we continue or start from, else (tiny)
    # made here; the feature cache; the latent statistics (computed if not given)
    records = Records(args.data, default_system=args.system_prompt)
    crops = crops_for(args.resolution)
    sources = [resume_from, init_file and init_file.parent]
    frozen, cache, stats, text_dim = setup_frozen(args, dist, out, records, crops, sources,
                                                  text_dtype)

    # Setup the model, AdamW and the EMA: the same init on every rank; then the resumed state
    config = build_config(args, stats.channels, text_dim)
    model, params, opt, ema = build_model(args, config, dist, init_file, precision == "bf16")
    config = model.config                         # (--lora: the base's)
    step = position = ema_updates = skipped = 0   # skipped: this rank's unreadable images
    if resume_from:
        read_model_ema_optimizer(resume_from, model, ema, opt, f"--model {args.model}")
        for group in opt.param_groups:    # the command line wins (upstream resets lr and wd)
            group.update(lr=args.lr, weight_decay=args.weight_decay, betas=ADAM_BETAS,
                         eps=ADAM_EPS)
        state, skipped = restore_state(resume_from, dist, out / "log.jsonl")
        step, position, ema_updates = state["step"], state["position"], state["ema_updates"]
    ddp = wrap_ddp(model, dist) if args.parallel == "ddp" else model
    run_record = dit_run_record(args, frozen.paths, config)

    # Setup the data: this rank's micro-batches of the global positions still to come
    dataset = TrainSet(records, crops, args.seed, args.resolution, args.caption_dropout,
                       args.caption_ratios, args.zh_ratio, cache)
    batches = data_stream(args, dist, dataset, position, max(0, args.steps - step))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    anchor_tokens = (args.resolution // 16) ** 2    # the time shift follows this token count
    meter = Meter(dist, ["loss"] + [f"loss_t{b}" for b in range(T_BINS)], args.steps,
                  args.global_batch, peak_flops(device, args.peak_tflops))
    warned = (set(), set())      # records warned of: unreadable, without a prompt
    dist.log(f"stage {args.stage}: {args.resolution}px ({len(crops)} crop sizes), shift "
             f"{training_shift(anchor_tokens):.3f}, {args.steps} steps, global batch "
             f"{args.global_batch} = {dist.world} ranks x {accum} x micro {args.micro_batch}, max "
             f"text {args.max_text_len} tokens, {precision}, {len(records)} records")

    # Training loop: an optimizer step of `accum` micro-batches per rank, then log, save, stop
    with stop_on_signals() as stop:
        while step < args.steps:
            t0 = time.time()
            opt.zero_grad(set_to_none=True)
            for k in range(accum):
                # The flow-matching step: latents x1, captions, each sample's t and noise
                items = next(batches)
                skipped += warn_skipped(items, records, warned, dist)
                x1, cap_feats, cap_mask = prepare_batch(items, frozen, stats, cache,
                                                        args.max_text_len, device, text_dtype)
                t, noise = draw_t_and_noise(items, x1, anchor_tokens, device)
                # DDP syncs the last micro-batch only; FSDP reduce-scatters each (its no_sync
                # would hold every block's full gradient until the last)
                sync = (ddp.no_sync() if ddp is not model and k < accum - 1
                        else contextlib.nullcontext())
                with sync:
                    with autocast:
                        losses = flow_matching_loss(ddp, x1, noise, t, cap_feats, cap_mask)  # [B]
                    (losses.sum() / per_rank).backward()    # averaged over ranks: the global mean
                meter_losses(meter, losses, t)
                meter.flops += train_flops(config, cap_mask.sum(1).tolist(),
                                           [x[0].numel() for x in x1])

            # AdamW (the gradient clipped; --grad-clip 0: not), then the EMA; a gradient that is not
            # finite stops the run before its update
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf)
            check_finite(step + 1, {"gradient norm": float(grad_norm)})
            opt.step()
            update_ema(ema, model, ema_decay(args, ema_updates))
            ema_updates += 1
            step, position = step + 1, position + args.global_batch
            meter.step(float(grad_norm), time.time() - t0)

            # Log every --log-every steps, save every --save-every; a signal saves and stops
            counters = {"step": step, "position": position, "ema_updates": ema_updates}
            if end_of_step(dist, args, step, stop,
                           lambda: report(dist, meter, out, args, step, skipped),
                           lambda: save(dist, out, model, ema, opt, counters, skipped,
                                        run_record, frozen.paths["stats"], args)):
                break
    end_of_run(dist, step, args, meter.t_start, out)
    return out


def main(argv=None):
    args = parse_args(argv)
    with command_line("train.py"):
        train(finish_args(args))


if __name__ == "__main__":
    main()
