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
    # the toy model of toy.py: data, frozen parts, decoder, then this same loop
    python train.py --toy

A step (the loop below): a micro-batch of images, each cropped to the aspect bucket closest to its
own (data.py), is encoded by DINOv3 in fp32 and normalised with the latent statistics (x1); t is
logit-normal shifted by the resolution; svgt2i.flow_matching_loss regresses
NextDiT(x_t, t, caption) onto x1 - noise, per sample, and the losses are averaged over
the global batch.

Where the official trainer (train_svg_t2i.py) is not followed, on purpose:
- Max caption length really follows the stage (256/256/256/512). Upstream passes `max_cap_len` into
  the `is_train` slot of encode_prompt, so every stage silently truncated captions at 256 tokens.
- Caption variants are really sampled (short/middle/long with Table 1's ratios, zh/en 0.2/0.8).
  Upstream builds the item processor without `use_long_cap` and never reads its
  `text_len_weights`: dead code.
- EMA decay defaults to 0.9999 with a warm-up, min(decay, (1 + n) / (10 + n)) after n updates.
  Upstream's 0.95 averages over ~20 steps only, which is no averaging for a run of 10^5 steps;
  0.9999 (~10^4 steps, the DiT/SiT default) is a real average, and the warm-up keeps the EMA of
  short runs (and of each new stage) close to the model instead of near its initialisation.
  `--ema-decay 0.95 --no-ema-warmup` reproduces upstream.
- Every source of randomness of a sample (caption choice, caption dropout, t, noise) comes from a
  generator seeded by (seed, resolution, the sample's position in the data stream). So a run gives
  the same result on any number of GPUs for the same global batch, and a resumed run
  continues bit for bit.
- A missing or unreadable image is replaced by the next record (as upstream's dataset does), but
  with a warning and a count instead of silence.
- DDP by default instead of FSDP SHARD_GRAD_OP: plainer, and the 2.6B model's fp32 weights,
  gradients, AdamW moments and EMA (about 52 GB) fit on one 80 GB GPU next to Gemma in bf16, with
  activation checkpointing. --parallel fsdp is FULL_SHARD (FSDP2, per block), for smaller GPUs:
  gradients are reduced in fp32 (upstream: bf16), and the EMA is sharded too.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from data import Cache, Records, TrainSet, caption_texts, crops_for
from nextdit import PRESETS, NextDiT, NextDiTConfig, nextdit_keymap
from runs import (Dist, HelpFormatter, Progress, UsageError, absolute_paths, add_system_args,
                  batch_plan, check_replicas, command_line, compute_stats, data_stream,
                  device_mesh, fmt_time, load_fitting, load_full_optimizer, load_sharded,
                  open_run, peak_flops, read_into, restore_run_state, resume_folder, run_state,
                  save_checkpoint, save_sharded, shard, stop_on_signals, truncate_log,
                  warn_skipped, wrap_ddp, write_safetensors)
from svgt2i import (GEMMA_DIRS, RELEASE_DIRS, SYSTEM_PROMPTS, Autoencoder, TextEncoder,
                    atomic_write, checkpoint_folder, default_folder, find_weights,
                    flow_matching_loss, load_autoencoder, load_dinov3, load_gemma2,
                    load_latent_stats, load_tokenizer, read_state_dict, recorded_but_gone,
                    recorded_frozen, sample_training_t, training_shift)


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
# --model tiny runs every stage on a CPU: half the resolution, small batches, few steps. One
# intra-op thread: the tiny tensors gain nothing from more, and on a busy machine extra
# threads only spin.
TINY_STAGE = dict(global_batch=16, steps=100, save_every=50, log_every=10, workers=0,
                  checkpointing=False, threads=1)
# --model toy (python train.py --toy): 64-px images (a 4 x 4 grid of DINOv3 patches), a higher lr
# and a shorter EMA for a 2,200-step run.
TOY_STAGE = dict(resolution=64, global_batch=64, steps=2200, lr=1e-3, ema_decay=0.999,
                 save_every=250, log_every=50, workers=0)

# What a checkpoint folder holds; --resume checks each before trusting the checkpoint. The
# safetensors hold full tensors in every mode (what sample.py and --init-from read); then
# optimizer.pt (ddp) or dcp/ (fsdp: the sharded model, optimizer and EMA, torch.distributed.
# checkpoint). Either resumes in either mode, on any number of ranks.
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt|dcp", "state.pt",
                    "run.json", "latent_stats.pt")
FROZEN = ("autoencoder", "dinov3", "gemma")    # the frozen parts a run records
ADAM_BETAS, ADAM_EPS = (0.9, 0.95), 1e-15  # upstream's AdamW; a constant lr (no warm-up, schedule)
T_BINS = 10                                # loss is logged per t-bin: [0, 0.1), ..., [0.9, 1]


# -------------------------------------------------------------------------------------------------
# Frozen parts: DINOv3 (the latent space), the statistics, Gemma-2 (captions)


class Frozen:
    """The frozen encoders, loaded on first use (a run that reads a complete cache never
    loads them)."""

    def __init__(self, paths, device, text_dtype, mesh=None):
        self.paths, self.device, self.text_dtype = paths, device, text_dtype
        self.mesh = mesh                # --shard-text-encoder: Gemma sharded over it (FSDP2)
        self._encoder, self._text = None, None

    @property
    def encoder(self):
        """Autoencoder with its DINOv3 only. Training encodes with DINOv3 alone, also when given an
        R autoencoder (upstream's R yaml has no extra_vit_config, so its latents are
        the P latents)."""
        if self._encoder is None:
            dino = None
            if self.paths["autoencoder"]:
                dino = load_autoencoder(self.paths["autoencoder"],
                                        dinov3_path=self.paths["dinov3"],
                                        device=self.device).encoder
            elif self.paths["dinov3"]:
                dino = load_dinov3(self.paths["dinov3"], device=self.device)
            if dino is None:
                raise UsageError("no DINOv3 weights: the autoencoder checkpoint has no encoder.* "
                                 "keys; pass --dinov3 dinov3_vits16plus_pretrain_lvd1689m-*.pth")
            self._encoder = Autoencoder(None, dino.requires_grad_(False)).to(self.device).eval()
        return self._encoder

    @property
    def text(self):
        if self._text is None:
            model = load_gemma2(self.paths["gemma"], device=self.device, dtype=self.text_dtype)
            if self.mesh is not None:     # every rank encodes every micro-batch: in step
                shard(model, model.layers, self.mesh, forward_methods=("encode",))
            self._text = TextEncoder(load_tokenizer(self.paths["gemma"]), model)
        return self._text

    @torch.no_grad()
    def encode_images(self, images):
        """Images [3, h_i, w_i] -> raw DINOv3 features [C, h_i/16, w_i/16], fp32
        (no autocast, as upstream), one encoder call per group of equal size."""
        out, groups = [None] * len(images), {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape), []).append(i)
        with torch.autocast(self.device.type, enabled=False):
            for idx in groups.values():
                feats = self.encoder.encode(torch.stack([images[i] for i in idx]).to(self.device))
                for i, f in zip(idx, feats):
                    out[i] = f.float()
        return out

    def encode_texts(self, texts, max_length):
        return self.text(texts, max_length=max_length)

    def widths(self, cache=None):
        """(latent channels, caption feature width), from the cache when it knows them."""
        if cache is not None and cache.meta.get("latent_channels"):
            return cache.meta["latent_channels"], cache.meta["text_dim"]
        return self.encoder.encoder.config.dim, self.text.model.config.hidden_size

    def free(self):
        self._encoder = self._text = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def release_files():
    """The official release's frozen parts and statistics when it sits beside the command
    (./pre-trained, ./gemma-2-2b): what `torchrun train.py --stage 1 --data D --out O` uses."""
    folder = default_folder(RELEASE_DIRS)
    if folder is None:
        return {"gemma": default_folder(GEMMA_DIRS)}
    found = find_weights(folder, default_folder(GEMMA_DIRS), need=())
    return {k: found[k] for k in FROZEN + ("stats",)}


def relative_to_run(path, out):
    """How run.json records a frozen part: relative to the checkpoint folder when it lies inside the
    run (so a moved or copied run still finds it), absolute otherwise."""
    path = os.path.abspath(path)
    inside = os.path.commonpath([path, os.path.abspath(out)]) == os.path.abspath(out)
    return os.path.join("..", os.path.relpath(path, out)) if inside else path


def frozen_paths(args, d, out, records, sources):
    """The frozen parts, each from the command line, else from the run.json of the checkpoint we
    resume or start from (--init-from), so a stage chain keeps its encoders; for --model tiny
    without them, tiny random ones are made in OUT/frozen (toy.make_tiny_frozen). Then the latent
    statistics (stats_file)."""
    paths = {k: getattr(args, k) for k in FROZEN}
    for src in filter(None, sources):
        recorded = recorded_frozen(src)
        for k in FROZEN:
            if not paths[k] and k in recorded:
                if not os.path.exists(recorded[k]):
                    raise recorded_but_gone(src, k, recorded[k])
                paths[k] = recorded[k]
    if args.model != "tiny" and not all(paths.values()):     # the release beside the command
        release = release_files()
        paths = {k: paths[k] or release.get(k) for k in FROZEN}
        args.stats = args.stats or release.get("stats")
    if not (paths["autoencoder"] or paths["dinov3"]) or not paths["gemma"]:
        if args.model != "tiny":
            raise UsageError("missing frozen parts: pass --autoencoder (and --dinov3 if it has no "
                             "encoder.* keys) and --gemma (the Gemma-2-2B folder), or run from the "
                             f"folder holding the release (looked in ./{', ./'.join(RELEASE_DIRS)}"
                             f" and ./{', ./'.join(GEMMA_DIRS)}); see README")
        if d.main and not (out / "frozen.json").is_file():
            import toy
            # the tokenizer of the tiny Gemma is trained on the captions as Gemma will see them
            sample = [records[i] for i in range(min(len(records), 10000))]
            texts = {t for r in sample for _, t in caption_texts(r)} | set(SYSTEM_PROMPTS.values())
            made = toy.make_tiny_frozen(str(out / "frozen"), sorted(texts), seed=args.seed)
            made = {k: os.path.relpath(v, out) for k, v in made.items()}    # the run may move
            atomic_write(out / "frozen.json", lambda tmp: tmp.write_text(json.dumps(made)))
        d.barrier()
        made = json.loads((out / "frozen.json").read_text())
        paths.update({k: str(out / made[k]) for k in FROZEN if made.get(k)})
    paths["stats"] = stats_file(args, d, sources, out)
    for k in ("autoencoder", "dinov3", "stats"):
        if paths[k] and not os.path.isfile(paths[k]):
            raise UsageError(f"--{k}: file not found: {paths[k]}")
    if not os.path.isdir(paths["gemma"]):
        raise UsageError(f"--gemma: folder not found: {paths['gemma']} (expected the Gemma-2-2B "
                         "folder)")
    return paths


def stats_file(args, d, sources, out):
    """The latent statistics: --stats; else the copy inside the checkpoint we resume or start from
    (a stage chain must keep its normalisation), copied to OUT/latent_stats.pt; else None: to be
    computed there."""
    if args.stats:
        return args.stats
    mine = out / "latent_stats.pt"
    for src in sources:
        theirs = Path(src or "") / "latent_stats.pt"
        if src and theirs.is_file():
            if d.main and (not mine.is_file() or mine.read_bytes() != theirs.read_bytes()):
                atomic_write(mine, lambda tmp: shutil.copyfile(theirs, tmp))
            d.barrier()
            return str(mine)
    return str(mine) if mine.is_file() else None


def open_cache(args, d, records, crops, frozen):
    """--cache DIR: the DINOv3 latents and Gemma features of every record, computed once
    (ranks share the work) and then read instead of the images."""
    meta = {"data": os.path.abspath(records.path), "records": len(records),
            "resolution": args.resolution, "max_text_len": args.max_text_len,
            "system_prompt": args.system_prompt,
            "text_dtype": str(frozen.text_dtype).replace("torch.", ""),
            "dinov3": frozen.paths["dinov3"] or frozen.paths["autoencoder"],
            "gemma": frozen.paths["gemma"]}
    try:
        cache = Cache(args.cache, meta)
    except ValueError as e:
        raise UsageError(str(e)) from None
    missing = cache.missing(range(d.rank, len(records), d.world))
    if d.main:
        cache.write_empty(frozen.encode_texts, args.max_text_len)
    progress = Progress(f"cache: rank {d.rank} records", len(missing), stream=sys.stdout)
    for start in range(0, len(missing), args.micro_batch):
        chunk = missing[start:start + args.micro_batch]
        cache.fill(chunk, records, crops, frozen.encode_images, frozen.encode_texts,
                   args.max_text_len)
        if d.main:
            progress(start + len(chunk))
    written = d.all_sum(len(missing))
    if written:
        d.log(f"cache: wrote {written} records to {args.cache}")
    d.barrier()
    if d.main:
        cache.finish(len(records))
    d.barrier()
    return cache.load()


# -------------------------------------------------------------------------------------------------
# Checkpoints: written atomically, resumed exactly


def init_weights_file(path, prefer_ema):
    """--init-from: a checkpoint folder of ours (model.safetensors, or ema.safetensors with
    --init-from-ema), a run folder (its latest checkpoint), an official folder
    (consolidated[_ema].00-of-01.pth) or a weights file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UsageError(f"--init-from: {path} does not exist")
    path = Path(checkpoint_folder(str(path)))
    names = ["model.safetensors", "consolidated.00-of-01.pth"]
    if prefer_ema:
        names = ["ema.safetensors", "consolidated_ema.00-of-01.pth"] + names
    for n in names:
        if (path / n).is_file():
            return path / n
    raise UsageError(f"--init-from: no weights in {path} (expected {' or '.join(names)})")


def load_init_weights(model, file, d):
    """Load what fits (runs.load_fitting) of a NextDiT checkpoint."""
    load_fitting(model, nextdit_keymap(read_state_dict(str(file))), f"--init-from {file}", d)


def resume(folder, model, ema, opt, args, d):
    """Model, EMA, optimizer and run state from a checkpoint of either mode, into this run's
    (sharded or not: each rank keeps its part). Returns
    (step, position, ema updates, this rank's skipped-image count): zeros without a checkpoint."""
    if folder is None:
        return 0, 0, 0, 0
    try:
        if (folder / "dcp").is_dir():       # --parallel fsdp's: resharded to this run's layout
            load_sharded(folder / "dcp", model, opt, ema=ema)
        else:
            read_into(model.state_dict(), folder / "model.safetensors")
            read_into(ema, folder / "ema.safetensors")
            load_full_optimizer(opt, folder / "optimizer.pt")
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--resume {folder}: the checkpoint does not fit --model {args.model} "
                         f"({str(e).strip().splitlines()[0]}): pass the run's "
                         "--model/--model-config") from None
    for group in opt.param_groups:    # the command line wins (upstream resets lr and wd on resume)
        group.update(lr=args.lr, weight_decay=args.weight_decay, betas=ADAM_BETAS, eps=ADAM_EPS)
    state, skipped = restore_run_state(folder, d)
    if d.main:      # the steps after the checkpoint will be logged again
        truncate_log(Path(args.out) / "log.jsonl", state["step"])
    return state["step"], state["position"], state["ema_updates"], skipped


# -------------------------------------------------------------------------------------------------
# Progress: loss per t-bin, images/s, MFU, ETA


def train_flops(config, cap_lens, img_lens):
    """Training FLOPs of one micro-batch: forward + backward = 3 forwards of
    NextDiTConfig.flops per sample (no recomputation: MFU counts model FLOPs)."""
    return sum(3 * config.flops(c, n) for c, n in zip(cap_lens, img_lens))


class Meter:
    """Sums over a log interval; reduced over ranks when reported
    (rank 0 prints and appends OUT/log.jsonl)."""

    def __init__(self, d, args, out):
        self.d, self.args, self.out = d, args, out
        self.peak = peak_flops(args.device, args.peak_tflops)
        self.t_start = time.time()
        self.reset()

    def reset(self):
        self.bins = torch.zeros(2, T_BINS, dtype=torch.float64)   # loss sums, counts
        self.flops, self.bad_steps = 0.0, 0
        self.steps, self.seconds, self.images, self.grad_norm = 0, 0.0, 0, 0.0

    def add_losses(self, losses, t):
        b = (t.detach().cpu() * T_BINS).long().clamp(0, T_BINS - 1)
        self.bins[0].index_add_(0, b, losses.cpu().double())
        self.bins[1].index_add_(0, b, torch.ones_like(b, dtype=torch.float64))

    def step(self, grad_norm, seconds):
        self.steps += 1
        self.seconds += seconds
        self.images += self.args.global_batch
        self.grad_norm += grad_norm

    def report(self, step, skipped):
        args, d = self.args, self.d
        vec = d.all_reduce(torch.cat([self.bins.flatten(), torch.tensor([self.flops, skipped],
                                                                        dtype=torch.float64)]))
        bins = vec[:2 * T_BINS].view(2, T_BINS)
        flops, skipped = vec[-2].item(), int(vec[-1].item())
        loss = (bins[0].sum() / bins[1].sum()).item()
        by_bin = [(bins[0, i] / bins[1, i]).item() if bins[1, i] > 0 else None
                  for i in range(T_BINS)]
        ips = self.images / self.seconds
        mfu = flops / self.seconds / (self.peak * d.world) if self.peak else None
        eta = (args.steps - step) * self.seconds / self.steps
        rec = {"step": step, "loss": loss, "loss_by_t": by_bin,
               "grad_norm": self.grad_norm / self.steps, "images_per_s": ips, "mfu": mfu,
               "lr": args.lr, "skipped": skipped, "bad_steps": self.bad_steps,
               "elapsed_s": time.time() - self.t_start}
        bins_txt = " ".join("-" if v is None else f"{v:.3f}" for v in by_bin)
        d.record(self.out, f"step {step}/{args.steps} ({100 * step / args.steps:.1f}%) loss "
                 f"{loss:.4f} | by t {bins_txt} | grad {rec['grad_norm']:.3f} | {ips:.1f} img/s "
                 f"| MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | skipped {skipped} | "
                 f"eta {fmt_time(eta)}", rec)
        self.reset()


# -------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train SVG-T2I's NextDiT (flow matching in DINOv3 "
                                            "latent space).",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--stage", type=int, default=1,
                   help="1-4: a Table 4 preset (resolution, batch, steps, text "
                   "length, caption ratios); any preset value can be overridden below")
    g.add_argument("--model", default="2b", help="NextDiT preset: " + ", ".join(PRESETS))
    g.add_argument("--model-config", default=None,
                   help="JSON object of NextDiTConfig overrides, e.g. "
                   "'{\"n_layers\": 8}' (in_channels and cap_feat_dim always follow the frozen "
                   "encoders)")
    g.add_argument("--data", default=None,
                   help=".jsonl file of {\"path\", \"prompt\"} records (required)")
    g.add_argument("--out", default=None,
                   help="output folder: checkpoints, logs, statistics (required)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                   help="continue exactly: from OUT's latest checkpoint, or from the given "
                        "run/checkpoint folder")
    g.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from these weights (the previous "
                   "stage's run or checkpoint folder, or an official consolidated .pth); "
                   "mismatched shapes are dropped with a warning; frozen parts and statistics "
                   "default to that run's")
    g.add_argument("--init-from-ema", action="store_true",
                   help="with --init-from: take the EMA weights")
    g.add_argument("--seed", type=int, default=0,
                   help="model init; data order, captions, t and noise per sample")
    g = p.add_argument_group("stage preset overrides (default: the --stage preset; --model tiny "
                             "halves the resolution and uses global batch 16, 100 steps, one "
                             "thread, no loader workers, a checkpoint every 50)")
    g.add_argument("--resolution", type=int, default=None,
                   help="anchor resolution: crops of about resolution^2 px")
    g.add_argument("--steps", type=int, default=None, help="total optimizer steps of this stage")
    g.add_argument("--global-batch", type=int, default=None,
                   help="images per optimizer step, all ranks together")
    g.add_argument("--max-text-len", type=int, default=None,
                   help="Gemma tokens per caption (multiple of 8)")
    g.add_argument("--caption-ratios", default=None,
                   help="short,middle,long caption sampling ratios")
    g = p.add_argument_group("recipe")
    g.add_argument("--micro-batch", type=int, default=None,
                   help="images per forward pass per rank (default: the whole local batch); the "
                        "global batch is "
                   "micro-batch x accumulation steps x world size")
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate, constant (default 2e-4; --model toy: 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=2.0, help="max global gradient norm")
    g.add_argument("--ema-decay", type=float, default=None,
                   help="EMA decay (default 0.9999; --model toy: 0.999; the official trainer: "
                        "0.95)")
    g.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false",
                   help="use --ema-decay from the first update (default: min(decay, (1 + n) / (10 "
                        "+ n)))")
    g.add_argument("--caption-dropout", type=float, default=0.1,
                   help="probability of the empty caption (for CFG)")
    g.add_argument("--zh-ratio", type=float, default=0.2,
                   help="probability of the Chinese caption when present")
    g.add_argument("--system-prompt", default="base",
                   help="for records without one: " + ", ".join(SYSTEM_PROMPTS)
                   + ", or a literal")
    g = p.add_argument_group("frozen parts")
    g.add_argument("--autoencoder", default=None,
                   help="SVG autoencoder checkpoint (its decoder is what sample.py "
                   "needs; its encoder.* keys, if any, are DINOv3)")
    g.add_argument("--dinov3", default=None, help="DINOv3 ViT-S/16+ weights "
                   "(dinov3_vits16plus_pretrain_lvd1689m-*.pth)")
    g.add_argument("--gemma", default=None,
                   help="Gemma-2-2B folder (config.json, safetensors, tokenizer.model)")
    g.add_argument("--stats", default=None,
                   help="latent statistics (dinov3_s16p_layer_patchtoken_stats_dist.pt); "
                   "default: computed from the data into OUT/latent_stats.pt")
    g.add_argument("--stats-images", type=int, default=10000,
                   help="images used to compute the statistics")
    g.add_argument("--cache", default=None, metavar="DIR",
                   help="precompute DINOv3 latents and Gemma features of "
                   "the whole data set into DIR (once), then train from it")
    g = add_system_args(p)
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="DiT autocast (master weights stay fp32); auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--text-dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="Gemma dtype; auto: bf16 on GPU (as upstream), fp32 on CPU")
    g.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                   help="ddp: a full replica per rank; fsdp: FSDP2, weights, gradients, AdamW "
                        "and EMA sharded over the ranks (for models a replica does not fit)")
    g.add_argument("--hsdp-shard", type=int, default=None, metavar="N",
                   help="with --parallel fsdp: shard within groups of N ranks (a node), "
                        "replicate across the groups")
    g.add_argument("--shard-text-encoder", action="store_true",
                   help="shard the frozen Gemma over the ranks too (FSDP2; default: a bf16 "
                        "copy per rank)")
    g.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing of the joint blocks (default: on, off for "
                        "--model tiny)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each DiT block (regional: one graph serves all layers; "
                        "the first steps compile)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="accelerator peak for the MFU estimate "
                   "(default: known GPUs' dense bf16 peak)")
    g = p.add_argument_group("toy model (python train.py --toy: data, frozen parts, decoder, DiT, "
                             "bundle)")
    g.add_argument("--toy", action="store_true",
                   help="train the toy SVG-T2I on the shapes world (toy.py) on a CPU")
    g.add_argument("--toy-images", type=int, default=6000,
                   help="training images of the shapes world")
    g.add_argument("--toy-decoder-steps", type=int, default=2000,
                   help="decoder reconstruction steps of train_autoencoder.py (batch 16)")
    g.add_argument("--bundle", default=None,
                   help="where --toy writes the finished model (default: assets/toy, "
                   "the folder sample.py --toy reads)")
    return p.parse_args(argv)


def finish_args(args):
    """Fill the stage preset, check the values, make paths absolute."""
    if not args.data or not args.out:
        raise UsageError("--data FILE.jsonl and --out DIR are required (or --toy for the toy "
                         "model)")
    if args.stage not in STAGES:
        raise UsageError(f"--stage {args.stage}: choose 1, 2, 3 or 4 (Table 4)")
    if args.model not in PRESETS:
        raise UsageError(f"--model {args.model!r}: choose one of {', '.join(PRESETS)}")
    preset = dict(STAGES[args.stage], **RECIPE)
    if args.model == "tiny":            # every stage, at half its resolution
        preset.update(TINY_STAGE, resolution=preset["resolution"] // 2)
    elif args.model == "toy":
        preset.update(TOY_STAGE)
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if isinstance(args.caption_ratios, str):
        try:
            args.caption_ratios = tuple(float(x) for x in args.caption_ratios.split(","))
        except ValueError:
            args.caption_ratios = ()
    ratios = args.caption_ratios
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise UsageError("--caption-ratios: three non-negative numbers short,middle,long, e.g. "
                         "0.1,0.35,0.55")
    if args.resolution < 32 or args.resolution % 16:
        raise UsageError(f"--resolution {args.resolution}: use a multiple of 16 (256, 512, 1024)")
    if args.max_text_len < 8 or args.max_text_len % 8 or args.max_text_len > 592:
        raise UsageError(f"--max-text-len {args.max_text_len}: use a multiple of 8 up to 592 (the "
                         "DiT's RoPE covers 600 caption positions)")
    for name in ("steps", "global_batch", "stats_images", "save_every", "log_every"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    for name in ("caption_dropout", "zh_ratio"):
        if not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must lie in [0, 1]")
    if not 0 <= args.ema_decay < 1:
        raise UsageError("--ema-decay must lie in [0, 1)")
    if isinstance(args.model_config, str):
        try:
            args.model_config = json.loads(args.model_config)
        except json.JSONDecodeError:
            args.model_config = None
        if not isinstance(args.model_config, dict):
            raise UsageError("--model-config: a JSON object of NextDiTConfig fields, e.g. "
                             "'{\"n_layers\": 8}'")
    return absolute_paths(args, ("data", "out", "autoencoder", "dinov3", "gemma", "stats", "cache",
                                 "init_from"))


def build_config(args, latent_channels, text_dim):
    over = dict(args.model_config or {})
    bad = sorted(set(over) - {f.name for f in dataclasses.fields(NextDiTConfig)})
    if bad:
        raise UsageError(f"--model-config: unknown NextDiTConfig fields {bad}")
    try:
        return dataclasses.replace(NextDiTConfig.from_name(args.model), **over,
                                   in_channels=latent_channels, cap_feat_dim=text_dim)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--model-config: {e}") from None


# -------------------------------------------------------------------------------------------------
# Training


def prepare_batch(items, frozen, stats, cache, max_text_len, device, text_dtype):
    """Micro-batch items -> normalised latents x1 (list of [C, h_i, w_i], fp32), caption features
    [B, L, D], caption mask [B, L]."""
    if cache is None:
        raw = frozen.encode_images([it["image"] for it in items])
        feats, mask = frozen.encode_texts([it["text"] for it in items], max_text_len)
    else:
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


def draw_t_and_noise(items, x1, shift_len, device):
    """Each sample's t [B] (logit-normal, shifted by the resolution) and noise (like x1), from
    its own seed."""
    t, noise = [], []
    for it, x in zip(items, x1):
        g = torch.Generator().manual_seed(it["noise_seed"])
        t.append(sample_training_t(1, shift_len, generator=g))
        noise.append(torch.randn(x.shape, generator=g).to(device))
    return torch.cat(t).to(device), noise


def ema_decay(args, n):
    """The EMA decay of update n: --ema-decay, with the warm-up min(decay, (1 + n) / (10 + n))."""
    return min(args.ema_decay, (1 + n) / (10 + n)) if args.ema_warmup else args.ema_decay


@torch.no_grad()
def update_ema(ema, model, decay):
    for name, p in model.named_parameters():
        ema[name].lerp_(p.detach().float(), 1 - decay)


def dtypes(args, device):
    """--precision (the DiT's autocast) and --text-dtype (Gemma's); auto: bf16 on GPU, fp32 on
    CPU."""
    auto = "bf16" if device.type == "cuda" else "fp32"
    precision = auto if args.precision == "auto" else args.precision
    text = auto if args.text_dtype == "auto" else args.text_dtype
    return precision, {"bf16": torch.bfloat16, "fp32": torch.float32}[text]


def open_folders(args, d):
    """OUT/, the checkpoint to resume, the weights to start from."""
    out = open_run(args.out, args.resume, d)
    resume_dir = None
    if args.resume:
        resume_dir = resume_folder(args.resume, out, CHECKPOINT_FILES, d.warn)
    init_file = None
    if args.init_from and not resume_dir:
        init_file = init_weights_file(args.init_from, args.init_from_ema)
    return out, resume_dir, init_file


def parallel_plan(args, d):
    """--parallel, --hsdp-shard and --shard-text-encoder checked against the world size; the
    device mesh (d.mesh) when anything is sharded."""
    sharded = args.parallel == "fsdp" or args.shard_text_encoder
    if sharded and d.world == 1:
        flag = "--parallel fsdp" if args.parallel == "fsdp" else "--shard-text-encoder"
        raise UsageError(f"{flag} shards over processes: run it under torchrun with 2 or more "
                         "(one process trains the same with --parallel ddp and resumes any "
                         "checkpoint)")
    if args.hsdp_shard is not None:
        sizes = [n for n in range(1, d.world + 1) if d.world % n == 0]
        if args.parallel != "fsdp":
            raise UsageError("--hsdp-shard needs --parallel fsdp")
        if args.hsdp_shard not in sizes:
            raise UsageError(f"--hsdp-shard {args.hsdp_shard} does not divide the world size "
                             f"{d.world}: pass one of {', '.join(map(str, sizes))}")
    if args.shard_text_encoder and args.cache:
        raise UsageError("--shard-text-encoder cannot fill a --cache (each rank encodes records "
                         "of its own): fill the cache in a run without it")
    if sharded:
        d.mesh = device_mesh(d, args.hsdp_shard)


def setup_frozen(args, d, out, records, crops, sources, text_dtype):
    """The frozen encoders, the feature cache and the latent statistics (computed if not given)."""
    paths = frozen_paths(args, d, out, records, sources)
    frozen = Frozen(paths, d.device, text_dtype, d.mesh if args.shard_text_encoder else None)
    cache = open_cache(args, d, records, crops, frozen) if args.cache else None
    if not paths["stats"]:
        paths["stats"] = str(out / "latent_stats.pt")
        d.log(f"latent statistics: computing from {min(len(records), args.stats_images)} images "
              f"into {paths['stats']}")
        compute_stats(d, records, range(min(len(records), args.stats_images)), crops,
                      frozen.encode_images, cache, args.micro_batch, paths["stats"])
    d.log(f"latent statistics: {paths['stats']}")
    latent_channels, text_dim = frozen.widths(cache)
    stats = load_latent_stats(paths["stats"], channels=latent_channels)
    if cache is not None:
        frozen.free()
    if not paths["autoencoder"]:
        d.log("note: no --autoencoder: sampling from these checkpoints will need --autoencoder "
              "(the decoder)")
    return frozen, cache, stats, text_dim, paths


def build_model(args, config, d, init_file, bf16):
    """NextDiT (initialised from --seed, then --init-from; with --parallel fsdp then sharded), its
    trainable parameters, AdamW and an fp32 EMA of every tensor (sharded as the weights are)."""
    torch.manual_seed(args.seed)
    with torch.device(d.device):    # whole on every rank first: the same init as unsharded
        model = NextDiT(config)
    model.grad_checkpointing = args.checkpointing
    if args.compile:
        model.compile_blocks()
    # `norm_final` is in every checkpoint but unused by forward: frozen, or DDP waits for its
    # gradient forever
    model.norm_final.requires_grad_(False)
    if init_file is not None:
        load_init_weights(model, init_file, d)
    if args.parallel == "fsdp":
        shard(model, [*model.noise_refiner, *model.context_refiner, *model.layers], d.mesh, bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW's default per-tensor loop is slow on DTensors; foreach computes the same bits
    impl = ({"fused": True} if d.device.type == "cuda" else
            {"foreach": True} if args.parallel == "fsdp" else {})
    opt = torch.optim.AdamW(params, lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                            weight_decay=args.weight_decay, **impl)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    d.log(f"NextDiT {args.model}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable "
          f"parameters, {config.in_channels} latent channels, caption width {config.cap_feat_dim}")
    return model, params, opt, ema


def data_stream_of(args, d, records, crops, cache, position, steps):
    """This rank's micro-batches for the next `steps` steps, from global position `position` on."""
    dataset = TrainSet(records, crops, args.seed, args.resolution, args.caption_dropout,
                       args.caption_ratios, args.zh_ratio, cache)
    return data_stream(args, d, dataset, position, steps)


def run_record(args, paths, config):
    """What run.json records: the frozen parts, the model, every argument."""
    frozen = {k: paths[k] and relative_to_run(paths[k], args.out) for k in FROZEN + ("stats",)}
    return {"frozen": frozen,
            "resolution": args.resolution, "stage": args.stage,
            "model": {"preset": args.model, "config": dataclasses.asdict(config)},
            "args": {k: (str(v) if isinstance(v, torch.device) else v)
                     for k, v in vars(args).items()}}


def save(d, out, model, ema, opt, counters, skipped, run_info, stats_path, args):
    """OUT/ckpt-{step:07d}/: {model,ema}.safetensors (full tensors, official key names),
    optimizer.pt (ddp) or dcp/ (fsdp: every rank writes its shards), state.pt (counters, every
    rank's generators and skipped count), run.json, latent_stats.pt. Every rank calls it."""
    sharded = args.parallel == "fsdp"
    check_replicas(model, d, shards=(args.hsdp_shard or d.world) if sharded else 1)
    state = run_state(d, counters, skipped, seed=args.seed, resolution=args.resolution,
                      parallel=args.parallel)
    step, meta = counters["step"], {"format": "pt", "step": str(counters["step"])}

    def write(folder):      # on every rank: the full files are gathered tensor by tensor
        write_safetensors(folder / "model.safetensors", model.state_dict(), d.main, meta)
        write_safetensors(folder / "ema.safetensors", ema, d.main, meta)
        if sharded:
            save_sharded(folder / "dcp", model, opt, ema=ema)
        elif d.main:
            torch.save(opt.state_dict(), folder / "optimizer.pt")
        if d.main:
            torch.save(state, folder / "state.pt")
            shutil.copyfile(stats_path, folder / "latent_stats.pt")
            (folder / "run.json").write_text(json.dumps({**run_info, "step": step}, indent=1))
    folder = save_checkpoint(out, step, write, args.keep, d)
    d.log(f"saved {folder}")


def train(args):
    # Setup distributed
    d = Dist.start(args.device)
    device = args.device = d.device
    if args.threads:
        torch.set_num_threads(args.threads)
    precision, text_dtype = dtypes(args, device)
    local, accum = batch_plan(args, d)
    parallel_plan(args, d)
    out, resume_dir, init_file = open_folders(args, d)

    # Frozen parts: given, else from the run we continue or start from, else (tiny) made here
    records = Records(args.data, default_system=args.system_prompt)
    crops = crops_for(args.resolution)
    sources = [str(p) if p else None for p in (resume_dir, init_file and init_file.parent)]
    frozen, cache, stats, text_dim, paths = setup_frozen(args, d, out, records, crops, sources,
                                                         text_dtype)

    # Model, EMA, optimiser: the same init on every rank (and DDP broadcasts rank 0's anyway)
    config = build_config(args, stats.channels, text_dim)
    model, params, opt, ema = build_model(args, config, d, init_file, precision == "bf16")

    # Resume (skipped: this rank's count of unreadable images)
    step, position, ema_updates, skipped = resume(resume_dir, model, ema, opt, args, d)
    ddp = wrap_ddp(model, d) if args.parallel == "ddp" else model
    run_info = run_record(args, paths, config)

    # Data: this rank's slice of the global positions still to come
    batches = data_stream_of(args, d, records, crops, cache, position, max(0, args.steps - step))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    shift_len = (args.resolution // 16) ** 2    # the time shift follows the anchor's token count
    d.log(f"stage {args.stage}: {args.resolution}px ({len(crops)} crop sizes), shift "
          f"{training_shift(shift_len):.3f}, {args.steps} steps, global batch {args.global_batch} "
          f"= {d.world} ranks x {accum} x micro {args.micro_batch}, max text {args.max_text_len} "
          f"tokens, {precision}, {len(records)} records")

    # Loop
    meter, warned = Meter(d, args, out), (set(), set())
    with stop_on_signals() as stop:
        while step < args.steps:
            t0 = time.time()
            opt.zero_grad(set_to_none=True)
            for k in range(accum):
                items = next(batches)
                skipped += warn_skipped(items, records, warned, d)
                x1, cap_feats, cap_mask = prepare_batch(items, frozen, stats, cache,
                                                        args.max_text_len, device, text_dtype)
                t, noise = draw_t_and_noise(items, x1, shift_len, device)
                # DDP syncs the last micro-batch only; FSDP reduce-scatters each (its no_sync
                # would hold every block's full gradient until the last)
                sync = (ddp.no_sync() if ddp is not model and k < accum - 1
                        else contextlib.nullcontext())
                with sync:
                    with autocast:
                        losses = flow_matching_loss(ddp, x1, noise, t, cap_feats, cap_mask)  # [B]
                    (losses.sum() / local).backward()   # averaged over ranks: the global mean
                meter.add_losses(losses.detach(), t)
                meter.flops += train_flops(config, cap_mask.sum(1).tolist(),
                                           [x[0].numel() for x in x1])
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            if torch.isfinite(grad_norm):
                opt.step()
                update_ema(ema, model, ema_decay(args, ema_updates))
                ema_updates += 1
            else:   # the same on every rank (the gradients are all-reduced): every rank skips it
                d.log(f"warning: step {step + 1}: non-finite gradient norm, update skipped")
                meter.bad_steps += 1
            step += 1
            position += args.global_batch
            meter.step(float(grad_norm), time.time() - t0)

            # Log, save, stop
            reason = stop()
            stopping = d.all_sum(int(reason is not None)) > 0
            if step % args.log_every == 0 or step == args.steps or stopping:
                meter.report(step, skipped)
            if step % args.save_every == 0 or step == args.steps or stopping:
                counters = {"step": step, "position": position, "ema_updates": ema_updates}
                save(d, out, model, ema, opt, counters, skipped, run_info, paths["stats"], args)
            if stopping:
                d.log(f"stopped by {reason or 'another rank'} at step {step}: continue with "
                      "--resume")
                break
    if step >= args.steps:
        d.log(f"done: step {step}/{args.steps} ({fmt_time(time.time() - meter.t_start)} in this "
              f"process); checkpoints in {out}")
    return out


def main(argv=None):
    args = parse_args(argv)
    with command_line("train.py"):
        if args.toy:        # the toy model: toy.py prepares its parts, then train() runs its DiT
            import toy
            toy.train(args)
        else:
            train(finish_args(args))


if __name__ == "__main__":
    main()
