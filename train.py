"""
Train SVG-T2I's diffusion transformer: flow matching in normalised DINOv3 feature space, captions from Gemma-2,
torch DDP on one or many nodes, bf16 autocast, the paper's four stages (Table 4).

    # one node, 8 GPUs, stage 1 (256 px) from scratch
    torchrun --nproc_per_node 8 train.py --stage 1 --data data.jsonl --out runs/s1 \\
        --autoencoder pre-trained/autoencoder/svg_autoencoder-P-stage3.ckpt \\
        --dinov3 pre-trained/dinov3_vits16plus_pretrain_lvd1689m-*.pth \\
        --stats pre-trained/dinov3_s16p_layer_patchtoken_stats_dist.pt --gemma gemma-2-2b --micro-batch 48
    # the next stage starts from the previous one's weights (frozen parts and statistics carry over)
    torchrun --nproc_per_node 8 train.py --stage 2 --data data.jsonl --out runs/s2 --init-from runs/s1
    # many nodes: the same command on every node
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py --stage 1 ...
    # continue a run that stopped (preempted, crashed, killed): bit-exact continuation
    torchrun --nproc_per_node 8 train.py --stage 1 ... --out runs/s1 --resume
    # tiny everything (model and frozen encoders), on a laptop CPU in seconds
    python train.py --model tiny --data data.jsonl --out runs/tiny

Data: a .jsonl file, one record per line: {"path": "img.jpg", "prompt": "a cat"} (paths may be relative to the
file). "prompt" may hold caption variants, {"short": .., "middle": .., "long": ..} and/or {"en": .., "zh": ..};
one is drawn per sample with the paper's ratios. Optional "system_prompt" (a name from svgt2i.SYSTEM_PROMPTS or a
literal). The official HQ record form {"image_path", "super_high_quality_caption"} gets the "align" prompt.

A step: each image is cropped to the official aspect-ratio bucket closest to its own aspect (so a batch mixes
sizes and goes to NextDiT as a list), DINOv3 encodes it in fp32, the features are normalised with the latent
statistics (x1), t is logit-normal shifted by the resolution, x_t = t x1 + (1 - t) noise, and the loss is the mean
squared error to the velocity x1 - noise, averaged per sample, then over the global batch.

Where the official trainer (train_svg_t2i.py) is not followed, on purpose:
- Max caption length really follows the stage (256/256/256/512). Upstream passes `max_cap_len` into the
  `is_train` slot of encode_prompt, so every stage silently truncated captions at 256 tokens.
- Caption variants are really sampled (short/middle/long with Table 1's ratios, zh/en 0.2/0.8). Upstream builds
  the item processor without `use_long_cap` and never reads its `text_len_weights`: dead code.
- EMA decay defaults to 0.9999 with a warm-up, min(decay, (1 + n) / (10 + n)) after n updates. Upstream's 0.95
  averages over ~20 steps only, which is no averaging for a run of 10^5 steps; 0.9999 (~10^4 steps, the DiT/SiT
  default) is a real average, and the warm-up keeps the EMA of short runs (and of each new stage) close to the
  model instead of near its initialisation. `--ema-decay 0.95 --no-ema-warmup` reproduces upstream.
- Every source of randomness of a sample (caption choice, caption dropout, t, noise) comes from a generator seeded
  by (seed, resolution, the sample's position in the data stream). So a run gives the same result on any number of
  GPUs for the same global batch, and a resumed run continues bit for bit.
- A missing or unreadable image is replaced by the next record (as upstream's dataset does), but with a warning
  and a count instead of silence.
- DDP instead of FSDP SHARD_GRAD_OP: plainer, and the 2.6B model's fp32 weights, gradients, AdamW moments and
  EMA (about 52 GB) fit on one 80 GB GPU next to Gemma in bf16, with activation checkpointing.
"""

import argparse
import array
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import svgt2i
from decoder import DecoderConfig
from dinov3 import DINOv3Config, load_dinov3
from gemma2 import Gemma2Tokenizer, load_gemma2
from nextdit import NextDiT, NextDiTConfig, unwrap_state_dict
from svgt2i import (SYSTEM_PROMPTS, Autoencoder, StatsAccumulator, TextEncoder, images_to_tensor, interpolate,
                    load_autoencoder, load_latent_stats, read_state_dict, sample_training_t, system_prompt_text,
                    training_shift, velocity_target)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


# -----------------------------------------------------------------------------------------------------------------
# Stages (Table 4) and the official recipe (reference nextdit.md section 4)

# stage: resolution, global batch, steps, max text tokens, caption length ratios (short, middle, long; Table 1:
# data C/D for stages 1-3, the high-aesthetic data E for stage 4)
STAGES = {
    1: dict(resolution=256, global_batch=1536, steps=91_000, max_text_len=256, caption_ratios=(0.10, 0.35, 0.55)),
    2: dict(resolution=512, global_batch=768, steps=90_000, max_text_len=256, caption_ratios=(0.10, 0.35, 0.55)),
    3: dict(resolution=1024, global_batch=768, steps=44_000, max_text_len=256, caption_ratios=(0.10, 0.35, 0.55)),
    4: dict(resolution=1024, global_batch=768, steps=40_000, max_text_len=512, caption_ratios=(0.0, 0.0, 1.0)),
}
# --model tiny runs every stage on a CPU: half the resolution, small batches, few steps.
# One intra-op thread: the tiny tensors gain nothing from more, and on a busy machine extra threads only spin.
TINY_STAGE = dict(global_batch=16, steps=100, save_every=50, log_every=10, workers=0, checkpointing=False, threads=1)

# The toy model's DiT (python train.py --toy): 4.3M parameters, 48-wide heads as 3 x 16 RoPE axes, and its recipe
# (--model toy): 64-px images (a 4 x 4 grid of DINOv3 patches), a higher lr and a shorter EMA for a 2,200-step run.
TOY_DIT = dict(dim=192, n_layers=6, n_refiner_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=512, axes_dims=(16, 16, 16))
TOY_SIZE = 64
TOY_BUNDLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")   # what sample.py --toy reads
TOY_STAGE = dict(resolution=TOY_SIZE, global_batch=64, steps=2200, lr=1e-3, ema_decay=0.999, save_every=250,
                 log_every=50, workers=0)
MODELS = {"2b": NextDiTConfig.svg_t2i_2b, "0.8b": NextDiTConfig.svg_t2i_08b, "tiny": NextDiTConfig.tiny,
          "toy": lambda: NextDiTConfig(**TOY_DIT)}

ADAM_BETAS, ADAM_EPS = (0.9, 0.95), 1e-15    # upstream's AdamW; lr is constant (no warm-up, no schedule)
LENGTHS, LANGUAGES = ("short", "middle", "long"), ("en", "zh")
T_BINS = 10                                  # loss is logged per t-bin: [0, 0.1), ..., [0.9, 1] (0 = noise)
PEAK_TFLOPS = {"H200": 989, "H100": 989, "H800": 989, "H20": 148, "A100": 312, "A800": 312, "L40S": 362,
               "B200": 2250, "GB200": 2500}  # dense bf16, for the MFU estimate


# -----------------------------------------------------------------------------------------------------------------
# Images: the official aspect-ratio crops

def crop_size_list(num_patches, patch=16, max_ratio=4.0):
    """Crop sizes (w, h) in px of at most `num_patches` patches and aspect at most max_ratio, as the official
    generate_crop_size_list: walk the width down from num_patches patches while the height grows as far as the
    budget allows, i.e. for w patches the heights num_patches // (w + 1) .. num_patches // w; a side is kept only if
    side_px // 32 is even (with 16 px patches: n mod 4 is 0 or 1). 256 px -> 15 sizes, 512 -> 27, 1024 -> 51."""
    sizes = []
    for wp in range(num_patches, 0, -1):
        for hp in range(max(1, num_patches // (wp + 1)), num_patches // wp + 1):
            w, h = wp * patch, hp * patch
            if max(wp, hp) / min(wp, hp) <= max_ratio and (w // 32) % 2 == 0 and (h // 32) % 2 == 0:
                sizes.append((w, h))
    return sizes


def closest_crop(width, height, crops):
    """The crop whose aspect is closest to the image's: largest min(cw/w, ch/h) / max(cw/w, ch/h); ties go to the
    larger (w, h) (the official `var_center_crop` with random_top_k=1)."""
    def kept(c):
        sw, sh = c[0] / width, c[1] / height
        return min(sw, sh) / max(sw, sh)
    return max(crops, key=lambda c: (kept(c), c))


def center_crop(image, size):
    """Box-halve while both sides are at least twice the crop, bicubic-resize so the crop just fits, cut the middle."""
    cw, ch = size
    while image.width >= 2 * cw and image.height >= 2 * ch:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = max(cw / image.width, ch / image.height)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left, top = (image.width - cw) // 2, (image.height - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def to_rgb(image):
    """RGB; transparency is composited on white (upstream does this for RGBA and converts P/L)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(path, crops):
    """The training view of an image: [3, h, w] in [-1, 1], cropped to its closest aspect bucket."""
    with Image.open(path) as im:
        im.load()
        image = to_rgb(im)
    return images_to_tensor([center_crop(image, closest_crop(image.width, image.height, crops))])[0]


# -----------------------------------------------------------------------------------------------------------------
# Records and captions

def parse_captions(prompt, where):
    """A record's "prompt" -> {language: {length: caption}}. A plain string is one caption ("en", "any")."""
    def lengths(value, lang):
        if value is None or isinstance(value, str):
            return {"any": value or ""}
        if not isinstance(value, dict) or not value or set(value) - set(LENGTHS):
            raise ValueError(f"{where}: prompt[{lang!r}] must be a string or an object with keys among "
                             f"{', '.join(LENGTHS)}")
        if not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f"{where}: caption variants must be strings")
        return dict(value)

    if isinstance(prompt, dict) and prompt and set(prompt) <= set(LANGUAGES):
        return {lang: lengths(v, lang) for lang, v in prompt.items()}
    if isinstance(prompt, dict) and set(prompt) - set(LENGTHS):
        raise ValueError(f"{where}: unknown caption keys {sorted(set(prompt) - set(LENGTHS))}: use "
                         f"{', '.join(LENGTHS)} and/or {', '.join(LANGUAGES)}")
    return {"en": lengths(prompt, "en")}


def parse_record(line, base, where, default_system="base"):
    """One .jsonl line -> {"path", "captions", "system"}; raises ValueError naming the line."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object with \"path\" and \"prompt\"")
    if "super_high_quality_caption" in rec:          # the official HQ record form, trained with the align prompt
        path, prompt, system = rec.get("image_path"), rec["super_high_quality_caption"], "align"
    else:
        path, prompt, system = rec.get("path"), rec.get("prompt"), default_system
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: missing \"path\" (the image file, absolute or relative to the .jsonl)")
    system = rec.get("system_prompt", system)
    if not isinstance(system, str):
        raise ValueError(f"{where}: \"system_prompt\" must be a string")
    return {"path": os.path.join(base, path), "captions": parse_captions(prompt, where),
            "system": system_prompt_text(system)}


class Records:
    """The .jsonl data file, read by line offsets: 60M records cost 60M offsets, not 60M dicts. Records are parsed
    when used (the first 1000 are checked at start, so a wrong file fails at once)."""

    def __init__(self, path, default_system="base"):
        if not os.path.isfile(path):
            raise UsageError(f"data file not found: {path} (expected a .jsonl file of {{\"path\", \"prompt\"}} lines)")
        self.path, self.base, self.default_system = path, os.path.dirname(os.path.abspath(path)), default_system
        offsets, lines, pos = array.array("q"), array.array("q"), 0      # 8 bytes a record, not a Python int
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    offsets.append(pos)
                    lines.append(n)
                pos += len(line)
        if not offsets:
            raise UsageError(f"{path}: no records (expected one JSON object per line)")
        self.offsets, self.lines = np.frombuffer(offsets, dtype=np.int64), np.frombuffer(lines, dtype=np.int64)
        self._file, self._pid = None, None
        for i in range(min(len(self), 1000)):
            try:
                self[i]
            except ValueError as e:
                raise UsageError(str(e)) from None

    def __len__(self):
        return len(self.offsets)

    def __getstate__(self):     # DataLoader workers open their own handle
        return {**self.__dict__, "_file": None, "_pid": None}

    def __getitem__(self, i):
        if self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        self._file.seek(int(self.offsets[i]))
        return parse_record(self._file.readline(), self.base, f"{self.path}:{self.lines[i]}", self.default_system)


def choose_caption(captions, rng, dropout, length_ratios, zh_ratio):
    """(language, length) of the caption to train on, or None: dropped (the empty string, for CFG).
    Exactly three draws, so the stream never depends on the record."""
    drop, u_lang, u_len = rng.random(), rng.random(), rng.random()
    if drop < dropout:
        return None
    lang = "zh" if u_lang < zh_ratio else "en"
    if lang not in captions:
        lang = next(iter(captions))
    options = list(captions[lang])
    weights = [length_ratios[LENGTHS.index(k)] if k in LENGTHS else 1.0 for k in options]
    if sum(weights) <= 0:            # the record only has lengths this stage never draws: use what it has
        weights = [1.0] * len(options)
    u, total = u_len * sum(weights), 0.0
    for k, w in zip(options, weights):
        total += w
        if u < total:
            return lang, k
    return lang, options[-1]


def caption_text(record, choice):
    """The text Gemma encodes: system prompt + caption; a dropped caption is "" without system prompt (upstream)."""
    return "" if choice is None else record["system"] + record["captions"][choice[0]][choice[1]]


# -----------------------------------------------------------------------------------------------------------------
# The data stream: global positions -> records, every random choice seeded by the position

def sample_seeds(seed, resolution, position):
    """Two independent 63-bit seeds (captions, t + noise) for the sample at `position` of the data stream."""
    a, b = np.random.SeedSequence([seed, resolution, position]).generate_state(2, np.uint64)
    return int(a) >> 1, int(b) >> 1


class Positions(torch.utils.data.Sampler):
    """The (position, record index) pairs this rank reads. Step s covers global positions
    [start + s G, start + (s + 1) G); rank r takes the r-th contiguous slice of G / W. Position p is record
    perm_e[p mod N] of epoch e = p // N, with a permutation seeded by (seed, resolution, e)."""

    def __init__(self, n_records, seed, resolution, start, steps, global_batch, rank, world):
        self.n, self.seed, self.resolution, self.start = n_records, seed, resolution, start
        self.steps, self.global_batch, self.rank, self.world = steps, global_batch, rank, world
        self._epoch, self._perm = None, None

    def index(self, position):
        epoch, k = divmod(position, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, self.resolution, epoch]).permutation(self.n)
        return int(self._perm[k])

    def __len__(self):
        return self.steps * (self.global_batch // self.world)

    def __iter__(self):
        local = self.global_batch // self.world
        for s in range(self.steps):
            first = self.start + s * self.global_batch + self.rank * local
            for p in range(first, first + local):
                yield p, self.index(p)


class TrainSet(torch.utils.data.Dataset):
    """Item (position, index) -> one training sample. An unreadable image (or record) is replaced by the next
    record of the file; what was skipped comes back in the item, so the trainer can warn and count."""

    MAX_TRIES = 64

    def __init__(self, records, crops, args, cache=None):
        self.records, self.crops, self.cache = records, crops, cache
        self.seed, self.resolution = args.seed, args.resolution
        self.dropout, self.ratios, self.zh_ratio = args.caption_dropout, args.caption_ratios, args.zh_ratio

    def __len__(self):
        return len(self.records)

    def load(self, index):
        """(record, image [3, h, w] in [-1, 1]) or, with a cache, (record, cached tensors)."""
        record = self.records[index]
        try:
            if self.cache is not None:
                return record, self.cache.read(index)
            return record, load_image(record["path"], self.crops)
        except Exception as e:
            raise ValueError(f"{record['path']}: {describe(e)}") from None

    def __getitem__(self, item):
        position, index = item
        caption_seed, noise_seed = sample_seeds(self.seed, self.resolution, position)
        skipped = []
        for k in range(self.MAX_TRIES):
            i = (index + k) % len(self.records)
            try:
                record, data = self.load(i)
                break
            except Exception as e:  # any decoding error of any image library: skip, report, go on
                skipped.append((i, describe(e)))
        else:
            raise UsageError(f"{self.records.path}: {self.MAX_TRIES} records in a row from line "
                             f"{self.records.lines[index]} could not be read (last: {skipped[-1][1]})")
        choice = choose_caption(record["captions"], random.Random(caption_seed), self.dropout, self.ratios,
                                self.zh_ratio)
        out = {"position": position, "index": i, "noise_seed": noise_seed, "skipped": skipped,
               "text": caption_text(record, choice)}
        if self.cache is None:
            out["image"] = data
        else:
            out["latent"] = data["latent"]
            out["text_feats"] = data[Cache.text_key(choice)] if choice is not None else self.cache.empty
        return out


def describe(e):
    """An exception as one short line."""
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def collate(items):
    return items


# -----------------------------------------------------------------------------------------------------------------
# Frozen parts: DINOv3 (the latent space), the statistics, Gemma-2 (captions)

class Frozen:
    """The frozen encoders, loaded on first use (a run that reads a complete cache never loads them)."""

    def __init__(self, paths, device, text_dtype):
        self.paths, self.device, self.text_dtype = paths, device, text_dtype
        self._encoder, self._text = None, None

    @property
    def encoder(self):
        """Autoencoder with its DINOv3 only. Training encodes with DINOv3 alone, also when given an R autoencoder
        (upstream's R yaml has no extra_vit_config, so its latents are the P latents)."""
        if self._encoder is None:
            dino = None
            if self.paths["autoencoder"]:
                ae = load_autoencoder(self.paths["autoencoder"], dinov3_path=self.paths["dinov3"],
                                      device=self.device, dtype=torch.float32)
                dino = ae.encoder
            elif self.paths["dinov3"]:
                dino = load_dinov3(self.paths["dinov3"], device=self.device, dtype=torch.float32)
            if dino is None:
                raise UsageError("no DINOv3 weights: the autoencoder checkpoint has no encoder.* keys; pass --dinov3 "
                                 "dinov3_vits16plus_pretrain_lvd1689m-*.pth")
            self._encoder = Autoencoder(None, dino.requires_grad_(False)).to(self.device).eval()
        return self._encoder

    @property
    def latent_channels(self):
        return self.encoder.encoder.config.dim

    @property
    def text(self):
        if self._text is None:
            folder = self.paths["gemma"]
            tok = os.path.join(folder, "tokenizer.model")
            if not os.path.isfile(tok):
                raise UsageError(f"{tok} not found: the Gemma folder needs its sentencepiece tokenizer.model")
            self._text = TextEncoder(Gemma2Tokenizer(tok), load_gemma2(folder, device=self.device, dtype=self.text_dtype))
        return self._text

    @torch.no_grad()
    def encode_images(self, images):
        """Images [3, h_i, w_i] -> raw DINOv3 features [C, h_i/16, w_i/16], fp32 (no autocast, as upstream),
        one encoder call per group of equal size."""
        out = [None] * len(images)
        groups = {}
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

    def free(self):
        self._encoder = self._text = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def frozen_widths(frozen, cache):
    """(latent channels, caption feature width) from the cache, else from the frozen models."""
    if cache is not None and cache.meta.get("latent_channels"):
        return cache.meta["latent_channels"], cache.meta["text_dim"]
    return frozen.latent_channels, frozen.text.model.config.hidden_size


def compute_stats(records, crops, frozen, cache, args, rank, world, path):
    """Per-channel mean/std of the DINOv3 features of the first --stats-images records (as cropped for training),
    summed over ranks, saved in the official format ({'mean', 'std'}: [1, C]) to `path`."""
    acc = StatsAccumulator()
    todo = list(range(rank, min(len(records), args.stats_images), world))
    batch = []

    def flush():
        if batch:
            for f in frozen.encode_images(batch):
                acc.update(f[None])
            batch.clear()

    for i in todo:
        try:
            if cache is not None:
                acc.update(cache.read(i)["latent"][None])
                continue
            batch.append(load_image(records[i]["path"], crops))
        except Exception as e:
            log(f"warning: statistics skip {records.path}:{records.lines[i]} ({describe(e)})", every_rank=True)
            continue
        if len(batch) == args.micro_batch:
            flush()
    flush()
    if world > 1:
        device = args.device if args.device.type == "cuda" else torch.device("cpu")
        # ranks without data still join: the channel count is agreed on first
        C = torch.tensor([0 if acc.sum is None else acc.sum.numel()], device=device)
        dist.all_reduce(C, op=dist.ReduceOp.MAX)
        C = int(C)
        vec = torch.zeros(1 + 2 * C, dtype=torch.float64, device=device)
        if acc.sum is not None:
            vec[0], vec[1:1 + C], vec[1 + C:] = float(acc.n), acc.sum, acc.sumsq
        dist.all_reduce(vec)
        vec = vec.cpu()
        acc.n, acc.sum, acc.sumsq = int(vec[0]), vec[1:1 + C].clone(), vec[1 + C:].clone()
    if acc.n == 0:
        raise UsageError(f"cannot compute latent statistics: none of the first {args.stats_images} images could be "
                         "read (pass --stats FILE)")
    if rank == 0:
        atomic_torch_save(acc.state(), path)
    barrier()


# -----------------------------------------------------------------------------------------------------------------
# The optional feature cache: DINOv3 latents and Gemma features precomputed on disk

class Cache:
    """DIR/meta.json (what the features depend on), DIR/empty.safetensors (the dropped caption),
    DIR/{i // 10000:05d}/{i:09d}.safetensors per record: "latent" [C, h, w] raw fp32 DINOv3 features and
    "text.{language}.{length}" [n_tokens, D] Gemma features of every caption variant (valid tokens only; padding
    is re-added per batch, which changes nothing: Gemma is causal and NextDiT masks padded keys).
    An unreadable image gets a DIR/.../{i:09d}.bad file instead, and is skipped like an unreadable image."""

    def __init__(self, folder, meta):
        self.folder, self.meta, self.empty = Path(folder), meta, None

    @staticmethod
    def text_key(choice):
        return f"text.{choice[0]}.{choice[1]}"

    def file(self, i, suffix=".safetensors"):
        return self.folder / f"{i // 10000:05d}" / f"{i:09d}{suffix}"

    def read(self, i):
        if self.file(i, ".bad").exists():
            raise ValueError(self.file(i, ".bad").read_text().strip())
        return load_file(str(self.file(i)))

    def load_empty(self):
        self.empty = load_file(str(self.folder / "empty.safetensors"))["text"]

    @classmethod
    def open(cls, folder, records, frozen, crops, args, rank, world):
        """Open the cache, computing what is missing first (ranks share the work)."""
        folder = Path(folder)
        meta = {"data": os.path.abspath(records.path), "records": len(records), "resolution": args.resolution,
                "max_text_len": args.max_text_len, "system_prompt": args.system_prompt,
                "text_dtype": str(frozen.text_dtype).replace("torch.", ""),
                "dinov3": frozen.paths["dinov3"] or frozen.paths["autoencoder"], "gemma": frozen.paths["gemma"]}
        if (folder / "meta.json").is_file():
            old = json.loads((folder / "meta.json").read_text())
            diff = [k for k in meta if old.get(k) != meta[k]]
            if diff:
                raise UsageError(f"--cache {folder} was built for other settings ({', '.join(diff)} differ): use another "
                                 "cache folder")
            meta = old
        cache = cls(folder, meta)
        missing = [i for i in range(rank, len(records), world)
                   if not cache.file(i).exists() and not cache.file(i, ".bad").exists()]
        if rank == 0 and not (folder / "empty.safetensors").exists():
            folder.mkdir(parents=True, exist_ok=True)
            feats, mask = frozen.encode_texts([""], args.max_text_len)
            atomic_save_file({"text": feats[0, :int(mask[0].sum())].cpu().contiguous()}, folder / "empty.safetensors")
        t0, done = time.time(), 0
        for start in range(0, len(missing), args.micro_batch):
            cache.fill(missing[start:start + args.micro_batch], records, frozen, crops, args)
            done += len(missing[start:start + args.micro_batch])
            log(f"cache: {done}/{len(missing)} records of rank {rank} ({time.time() - t0:.0f}s)", end="\r")
        if rank == 0 and missing:
            print(flush=True)
        missing_total = all_sum(len(missing), args.device)
        if rank == 0 and missing_total:
            log(f"cache: wrote {missing_total} records to {folder}")
        if rank == 0:
            # widths for building the model without loading the encoders
            for i in range(len(records)):
                if cache.file(i).exists():
                    d = load_file(str(cache.file(i)))
                    meta["latent_channels"] = d["latent"].shape[0]
                    meta["text_dim"] = next(v for k, v in d.items() if k.startswith("text.")).shape[1]
                    break
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))
        barrier()
        cache.meta = json.loads((folder / "meta.json").read_text())
        cache.load_empty()
        return cache

    def fill(self, indices, records, frozen, crops, args):
        images, texts, good = [], [], []
        for i in indices:
            self.file(i).parent.mkdir(parents=True, exist_ok=True)
            try:
                record = records[i]
                images.append(load_image(record["path"], crops))
            except Exception as e:
                atomic_write_text(self.file(i, ".bad"), describe(e))
                continue
            keys = [(lang, k) for lang in record["captions"] for k in record["captions"][lang]]
            texts.append([(self.text_key(c), caption_text(record, c)) for c in keys])
            good.append(i)
        if not good:
            return
        latents = frozen.encode_images(images)
        flat = [t for per in texts for _, t in per]
        feats, mask = frozen.encode_texts(flat, args.max_text_len)
        lens = mask.sum(1).tolist()
        k = 0
        for i, latent, per in zip(good, latents, texts):
            tensors = {"latent": latent.cpu().contiguous()}
            for key, _ in per:
                tensors[key] = feats[k, :lens[k]].cpu().contiguous()
                k += 1
            atomic_save_file(tensors, self.file(i))


# -----------------------------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints

def fsync_path(path):
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_file(tensors, path, metadata=None):
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    fsync_path(tmp)
    os.replace(tmp, path)


def atomic_torch_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    fsync_path(tmp)
    os.replace(tmp, path)


def cpu_state(tensors):
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def rng_state(device):
    """This process's generators as plain Python values (lists of ints), which pickle through all_gather_object
    and load with torch.load(weights_only=True)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state().tolist(),
             "numpy": [np_state[0], np_state[1].tolist(), *(int(x) if i != 2 else float(x)
                                                         for i, x in enumerate(np_state[2:]))]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state, device):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


def save_checkpoint(out, step, model, ema, opt, state, run_info, stats_path, keep):
    """OUT/ckpt-{step:07d}/ {model,ema}.safetensors (official key names), optimizer.pt, state.pt, run.json,
    latent_stats.pt; written into a temporary folder, fsynced, renamed; then OUT/latest is replaced and all but the
    last `keep` checkpoints are removed. Rank 0 only."""
    name = f"ckpt-{step:07d}"
    final, tmp = out / name, out / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"format": "pt", "step": str(step)}
    save_file(cpu_state(model.state_dict()), str(tmp / "model.safetensors"), metadata=meta)
    save_file(cpu_state(ema), str(tmp / "ema.safetensors"), metadata=meta)
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save(state, tmp / "state.pt")
    shutil.copyfile(stats_path, tmp / "latent_stats.pt")
    (tmp / "run.json").write_text(json.dumps({**run_info, "step": step}, indent=1))
    mode = (tmp / "run.json").stat().st_mode & 0o777      # safetensors writes 0600; give all files the umask's mode
    for f in tmp.iterdir():
        os.chmod(f, mode)
        fsync_path(f)
    fsync_path(tmp)
    if final.exists():          # the same step written again (e.g. a resumed run): replace it whole
        trash = out / f".old-{name}-{os.getpid()}"
        os.replace(final, trash)
        shutil.rmtree(trash)
    os.replace(tmp, final)
    fsync_path(out)
    atomic_write_text(out / "latest", name + "\n")
    fsync_path(out)
    if keep > 0:
        for old in sorted(p for p in out.glob("ckpt-*") if p.is_dir() and p != final)[:-keep + 1 or None]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(arg, out):
    """--resume [DIR]: 'latest' -> OUT/latest; a run folder -> its latest; a checkpoint folder as is."""
    folder = Path(out if arg == "latest" else arg)
    if (folder / "latest").is_file():
        folder = folder / (folder / "latest").read_text().strip()
    elif arg == "latest":
        raise UsageError(f"--resume: nothing to resume in {out} (no 'latest' file): drop --resume to start a run")
    if not (folder / "state.pt").is_file():
        raise UsageError(f"--resume: {folder} is not a training checkpoint (no state.pt)")
    return folder


def read_run_json(folder):
    f = Path(folder) / "run.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def init_weights_file(path, prefer_ema):
    """--init-from: a checkpoint folder of ours (model.safetensors, or ema.safetensors with --init-from-ema), a run
    folder (its latest checkpoint), an official folder (consolidated[_ema].00-of-01.pth) or a weights file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UsageError(f"--init-from: {path} does not exist")
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    names = ["model.safetensors", "consolidated.00-of-01.pth"]
    if prefer_ema:
        names = ["ema.safetensors", "consolidated_ema.00-of-01.pth"] + names
    for n in names:
        if (path / n).is_file():
            return path / n
    raise UsageError(f"--init-from: no weights in {path} (expected {' or '.join(names)})")


def load_init_weights(model, file):
    """Load what fits: tensors with our names and shapes; mismatched or unknown ones are dropped with a warning
    (upstream's --init_from: strict=False after dropping mis-shaped keys)."""
    sd = unwrap_state_dict(read_state_dict(str(file)))
    own = model.state_dict()
    fits = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fits:
        raise UsageError(f"--init-from {file}: no tensor matches the model (is it a NextDiT checkpoint of this size?)")
    misshaped = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own and k not in fits]
    unknown = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    for what, keys in (("mis-shaped (dropped)", misshaped), ("unknown (dropped)", unknown),
                       ("missing (left at init)", missing)):
        if keys:
            log(f"warning: --init-from {file}: {len(keys)} {what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
    model.load_state_dict(fits, strict=False)
    log(f"initialised {len(fits)}/{len(own)} tensors from {file}")


# -----------------------------------------------------------------------------------------------------------------
# Distributed helpers and logging

RANK, WORLD = 0, 1
LOG_FILE = None


def log(msg, every_rank=False, end="\n"):
    if RANK == 0 or every_rank:
        prefix = f"[rank {RANK}] " if WORLD > 1 and every_rank else ""
        print(prefix + msg, end=end, file=sys.stderr if every_rank else sys.stdout, flush=True)
        if LOG_FILE is not None and end == "\n" and RANK == 0:
            with open(LOG_FILE, "a") as f:
                f.write(prefix + msg + "\n")


def barrier():
    if WORLD > 1:
        dist.barrier()


def all_sum(x, device):
    if WORLD == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return int(t.item()) if isinstance(x, int) else t.item()


def param_fingerprint(model):
    """Per-parameter sums of the raw bits (fp32 as int32, summed in int64): any differing bit shows."""
    return torch.stack([p.detach().float().contiguous().view(torch.int32).sum(dtype=torch.int64)
                        for p in model.parameters()])


def check_replicas(model, device):
    """All ranks hold bit-identical weights (DDP guarantees it; this proves it at every checkpoint)."""
    if WORLD == 1:
        return
    fp = param_fingerprint(model).to(device)
    gathered = [torch.empty_like(fp) for _ in range(WORLD)]
    dist.all_gather(gathered, fp)
    bad = [r for r in range(WORLD) if not torch.equal(gathered[r], gathered[0])]
    if bad:
        raise RuntimeError(f"model replicas diverged: ranks {bad} differ from rank 0")
    log(f"replicas identical on {WORLD} ranks")


def peak_flops(args):
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if args.device.type == "cuda":
        name = torch.cuda.get_device_name(args.device)
        for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return PEAK_TFLOPS[key] * 1e12
    return None


def train_flops(config, n_params, cap_lens, img_lens):
    """Training FLOPs of one micro-batch (forward + backward, no recomputation): 6 per parameter per token, plus
    attention, 12 * dim * S^2 per joint layer (the refiners are counted as joint layers: a slight over-count)."""
    total = 0
    for c, n in zip(cap_lens, img_lens):
        S = c + n
        total += 6 * n_params * S + 12 * (config.n_layers + config.n_refiner_layers) * config.dim * S * S
    return total


def fmt_time(s):
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# -----------------------------------------------------------------------------------------------------------------
# Arguments

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one: None means the stage or model preset decides."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train SVG-T2I's NextDiT (flow matching in DINOv3 latent space).",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--stage", type=int, default=1, help="1-4: a Table 4 preset (resolution, batch, steps, text "
                   "length, caption ratios); any preset value can be overridden below")
    g.add_argument("--model", default="2b", help="NextDiT preset: " + ", ".join(MODELS))
    g.add_argument("--model-config", default=None, help="JSON object of NextDiTConfig overrides, e.g. "
                   "'{\"n_layers\": 8}' (in_channels and cap_feat_dim always follow the frozen encoders)")
    g.add_argument("--data", default=None, help=".jsonl file of {\"path\", \"prompt\"} records (required)")
    g.add_argument("--out", default=None, help="output folder: checkpoints, logs, statistics (required)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                   help="continue exactly: from OUT's latest checkpoint, or from the given run/checkpoint folder")
    g.add_argument("--init-from", default=None, metavar="DIR", help="start from these weights (the previous "
                   "stage's run or checkpoint folder, or an official consolidated .pth); mismatched shapes are "
                   "dropped with a warning; frozen parts and statistics default to that run's")
    g.add_argument("--init-from-ema", action="store_true", help="with --init-from: take the EMA weights")
    g.add_argument("--seed", type=int, default=0, help="model init; data order, captions, t and noise per sample")
    g = p.add_argument_group("stage preset overrides (default: the --stage preset; --model tiny halves the "
                             "resolution and uses global batch 16, 100 steps)")
    g.add_argument("--resolution", type=int, default=None, help="anchor resolution: crops of about resolution^2 px")
    g.add_argument("--steps", type=int, default=None, help="total optimizer steps of this stage")
    g.add_argument("--global-batch", type=int, default=None, help="images per optimizer step, all ranks together")
    g.add_argument("--max-text-len", type=int, default=None, help="Gemma tokens per caption (multiple of 8)")
    g.add_argument("--caption-ratios", default=None, help="short,middle,long caption sampling ratios")
    g = p.add_argument_group("recipe")
    g.add_argument("--micro-batch", type=int, default=None,
                   help="images per forward pass per rank (default: the whole local batch); the global batch is "
                   "micro-batch x accumulation steps x world size")
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate, constant (default 2e-4; --model toy: 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=2.0, help="max global gradient norm")
    g.add_argument("--ema-decay", type=float, default=None,
                   help="EMA decay (default 0.9999; --model toy: 0.999; the official trainer: 0.95)")
    g.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false",
                   help="use --ema-decay from the first update (default: min(decay, (1 + n) / (10 + n)))")
    g.add_argument("--caption-dropout", type=float, default=0.1, help="probability of the empty caption (for CFG)")
    g.add_argument("--zh-ratio", type=float, default=0.2, help="probability of the Chinese caption when present")
    g.add_argument("--system-prompt", default="base", help="for records without one: " + ", ".join(SYSTEM_PROMPTS)
                   + ", or a literal")
    g = p.add_argument_group("frozen parts")
    g.add_argument("--autoencoder", default=None, help="SVG autoencoder checkpoint (its decoder is what sample.py "
                   "needs; its encoder.* keys, if any, are DINOv3)")
    g.add_argument("--dinov3", default=None, help="DINOv3 ViT-S/16+ weights (dinov3_vits16plus_pretrain_lvd1689m-*.pth)")
    g.add_argument("--gemma", default=None, help="Gemma-2-2B folder (config.json, safetensors, tokenizer.model)")
    g.add_argument("--stats", default=None, help="latent statistics (dinov3_s16p_layer_patchtoken_stats_dist.pt); "
                   "default: computed from the data into OUT/latent_stats.pt")
    g.add_argument("--stats-images", type=int, default=10000, help="images used to compute the statistics")
    g.add_argument("--cache", default=None, metavar="DIR", help="precompute DINOv3 latents and Gemma features of the "
                   "whole data set into DIR (once), then train from it")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="DiT autocast (master weights stay fp32); auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--text-dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="Gemma dtype; auto: bf16 on GPU (as upstream), fp32 on CPU")
    g.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing of the joint blocks (default: on, off for --model tiny)")
    g.add_argument("--workers", type=int, default=None, help="data loader processes per rank (default: up to 4; "
                   "0 for --model tiny)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads per rank for torch (default: torch's "
                   "choice; 1 for --model tiny)")
    g.add_argument("--save-every", type=int, default=None, help="checkpoint interval in steps (default 2000, tiny 50)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints to keep (0: all)")
    g.add_argument("--log-every", type=int, default=None, help="log interval in steps (default 10)")
    g.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for the MFU estimate "
                   "(default: known GPUs' dense bf16 peak)")
    g = p.add_argument_group("toy model (python train.py --toy: data, frozen parts, decoder, DiT, bundle, score)")
    g.add_argument("--toy", action="store_true", help="train the toy SVG-T2I on the shapes world (toy.py) on a CPU")
    g.add_argument("--toy-images", type=int, default=6000, help="training images of the shapes world")
    g.add_argument("--toy-decoder-steps", type=int, default=2000, help="decoder reconstruction steps (batch 16)")
    g.add_argument("--bundle", default=TOY_BUNDLE,
                   help="where --toy writes the finished model (the folder sample.py --toy reads)")
    # Test hooks: die by SIGKILL right after a step (to prove resume), save the averaged gradients of every step.
    p.add_argument("--kill-after-step", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dump-grads", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def finish_args(args):
    """Fill the stage preset, check the values, make paths absolute."""
    if not args.data or not args.out:
        raise UsageError("--data FILE.jsonl and --out DIR are required (or --toy for the toy model)")
    if args.stage not in STAGES:
        raise UsageError(f"--stage {args.stage}: choose 1, 2, 3 or 4 (Table 4)")
    if args.model not in MODELS:
        raise UsageError(f"--model {args.model!r}: choose one of {', '.join(MODELS)}")
    preset = dict(STAGES[args.stage], save_every=2000, log_every=10, workers=min(4, os.cpu_count() or 1),
                  checkpointing=True, threads=0, lr=2e-4, ema_decay=0.9999)
    if args.model == "tiny":
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
    if len(args.caption_ratios) != 3 or min(args.caption_ratios) < 0 or sum(args.caption_ratios) <= 0:
        raise UsageError("--caption-ratios: three non-negative numbers short,middle,long, e.g. 0.1,0.35,0.55")
    if args.resolution < 32 or args.resolution % 16:
        raise UsageError(f"--resolution {args.resolution}: use a multiple of 16 (256, 512, 1024)")
    if args.max_text_len < 8 or args.max_text_len % 8 or args.max_text_len > 592:
        raise UsageError(f"--max-text-len {args.max_text_len}: use a multiple of 8 up to 592 (the DiT's RoPE covers "
                         "600 caption positions)")
    for name in ("steps", "global_batch", "stats_images", "save_every", "log_every"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    for name in ("caption_dropout", "zh_ratio"):
        if not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must lie in [0, 1]")
    if not 0 <= args.ema_decay < 1:
        raise UsageError("--ema-decay must lie in [0, 1)")
    if args.model_config:
        try:
            args.model_config = json.loads(args.model_config) if isinstance(args.model_config, str) else args.model_config
            assert isinstance(args.model_config, dict)
        except (json.JSONDecodeError, AssertionError):
            raise UsageError("--model-config: a JSON object of NextDiTConfig fields, e.g. '{\"n_layers\": 8}'") from None
    for name in ("data", "out", "autoencoder", "dinov3", "gemma", "stats", "cache", "init_from"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    if args.resume and args.resume != "latest":
        args.resume = os.path.abspath(args.resume)
    return args


def build_config(args, latent_channels, text_dim):
    fields = {f.name for f in dataclasses.fields(NextDiTConfig)}
    over = dict(args.model_config or {})
    bad = sorted(set(over) - fields)
    if bad:
        raise UsageError(f"--model-config: unknown NextDiTConfig fields {bad}")
    try:
        return dataclasses.replace(MODELS[args.model](), **over, in_channels=latent_channels, cap_feat_dim=text_dim)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--model-config: {e}") from None


def frozen_paths(args, sources):
    """Frozen part paths, each from the command line, else from the run.json of the checkpoint we resume or
    start from (--init-from), so a stage chain keeps its encoders without repeating them."""
    paths = {k: getattr(args, k) for k in ("autoencoder", "dinov3", "gemma")}
    for src in sources:
        frozen = read_run_json(src).get("frozen", {}) if src else {}
        for k in paths:
            if not paths[k] and frozen.get(k):
                paths[k] = frozen[k]
    return paths


def stats_file(args, sources, out):
    """The latent statistics: --stats; else the copy inside the checkpoint we resume or start from (a stage chain
    must keep its normalisation), copied to OUT/latent_stats.pt; else None: to be computed there."""
    if args.stats:
        return args.stats
    mine = out / "latent_stats.pt"
    for src in sources:
        if src and (Path(src) / "latent_stats.pt").is_file():
            theirs = Path(src) / "latent_stats.pt"
            if RANK == 0 and (not mine.is_file() or mine.read_bytes() != theirs.read_bytes()):
                tmp = f"{mine}.tmp{os.getpid()}"
                shutil.copyfile(theirs, tmp)
                os.replace(tmp, mine)
            barrier()
            return str(mine)
    return str(mine) if mine.is_file() else None


# -----------------------------------------------------------------------------------------------------------------
# Training

def train(args):
    global RANK, WORLD, LOG_FILE
    RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "auto":
        args.device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    device = args.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if WORLD > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    text_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.text_dtype if args.text_dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")]

    local = args.global_batch // WORLD
    if args.global_batch % WORLD:
        raise UsageError(f"--global-batch {args.global_batch} is not divisible by the world size {WORLD}")
    args.micro_batch = args.micro_batch or local
    if args.micro_batch < 1 or local % args.micro_batch:
        raise UsageError(f"--global-batch {args.global_batch} = {WORLD} ranks x {local}, and {local} is not a multiple "
                         f"of --micro-batch {args.micro_batch}")
    accum = local // args.micro_batch

    out = Path(args.out)
    if RANK == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".tmp-*"):       # a checkpoint being written when the last run died
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    if args.resume is None and (out / "latest").is_file():
        raise UsageError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    LOG_FILE = out / "log.txt"

    resume_dir = resolve_checkpoint(args.resume, out) if args.resume else None
    init_dir = None
    if args.init_from and not resume_dir:
        init_file = init_weights_file(args.init_from, args.init_from_ema)
        init_dir = str(init_file.parent)

    records = Records(args.data, default_system=args.system_prompt)
    crops = crop_size_list(round((args.resolution / 16) ** 2))

    # Frozen parts: given, else from the run we continue, else (tiny) made here.
    sources = [str(resume_dir) if resume_dir else None, init_dir]
    paths = frozen_paths(args, sources)
    if not any(paths[k] for k in ("autoencoder", "dinov3")) or not paths["gemma"]:
        if args.model != "tiny":
            raise UsageError("missing frozen parts: pass --autoencoder (and --dinov3 if it has no encoder.* keys) and "
                             "--gemma (the Gemma-2-2B folder); see README")
        if not hasattr(svgt2i, "make_tiny_frozen"):
            raise UsageError("--model tiny without --dinov3/--autoencoder/--gemma needs svgt2i.make_tiny_frozen, "
                             "which this checkout lacks: pass the frozen parts explicitly")
        if RANK == 0:
            # the tokenizer of the tiny Gemma is trained on the captions as Gemma will see them
            sample = [records[i] for i in range(min(len(records), 10000))]
            texts = sorted({caption_text(r, (lang, k)) for r in sample for lang in r["captions"]
                            for k in r["captions"][lang]} | set(SYSTEM_PROMPTS.values()))
            made = svgt2i.make_tiny_frozen(str(out / "frozen"), texts, seed=args.seed)
            atomic_write_text(out / "frozen.json", json.dumps({k: os.path.abspath(v) for k, v in made.items()}))
        barrier()
        made = json.loads((out / "frozen.json").read_text())
        paths.update({k: made.get(k) for k in ("autoencoder", "dinov3", "gemma")})
    paths["stats"] = stats_file(args, sources, out)
    for k in ("autoencoder", "dinov3", "stats"):
        if paths[k] and not os.path.isfile(paths[k]):
            raise UsageError(f"--{k}: file not found: {paths[k]}")
    if not os.path.isdir(paths["gemma"]):
        raise UsageError(f"--gemma: folder not found: {paths['gemma']} (expected the Gemma-2-2B folder)")
    frozen = Frozen(paths, device, text_dtype)

    cache = Cache.open(args.cache, records, frozen, crops, args, RANK, WORLD) if args.cache else None
    stats_path = paths["stats"] or str(out / "latent_stats.pt")
    if not paths["stats"]:
        log(f"latent statistics: computing from {min(len(records), args.stats_images)} images into {stats_path}")
        compute_stats(records, crops, frozen, cache, args, RANK, WORLD, stats_path)
    log(f"latent statistics: {stats_path}")
    latent_channels, text_dim = frozen_widths(frozen, cache)
    stats = load_latent_stats(stats_path, channels=latent_channels)
    if cache is not None:
        frozen.free()
    if not paths["autoencoder"]:
        log("note: no --autoencoder: sampling from these checkpoints will need --autoencoder (the decoder)")

    # The model: same init on every rank (and DDP broadcasts rank 0's anyway).
    config = build_config(args, latent_channels, text_dim)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = NextDiT(config)
    model.grad_checkpointing = args.checkpointing
    # `norm_final` is in every checkpoint but unused by forward: freeze it, or DDP waits for its gradient forever.
    model.norm_final.requires_grad_(False)
    if init_dir is not None:
        load_init_weights(model, init_file)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    step, position, ema_updates, skipped = 0, 0, 0, 0    # skipped: this rank's count
    if resume_dir is not None:
        try:
            model.load_state_dict(load_file(str(resume_dir / "model.safetensors"), device=str(device)))
        except RuntimeError as e:
            raise UsageError(f"--resume {resume_dir}: the checkpoint does not fit --model {args.model} "
                             f"({str(e).splitlines()[0]}): pass the run's --model/--model-config") from None
        for k, v in load_file(str(resume_dir / "ema.safetensors"), device=str(device)).items():
            ema[k].copy_(v)
        opt.load_state_dict(torch.load(resume_dir / "optimizer.pt", map_location=device, weights_only=True))
        for group in opt.param_groups:    # the command line wins (as upstream resets lr and wd on resume)
            group.update(lr=args.lr, weight_decay=args.weight_decay, betas=ADAM_BETAS, eps=ADAM_EPS)
        state = torch.load(resume_dir / "state.pt", weights_only=True)
        step, position, ema_updates = state["step"], state["position"], state["ema_updates"]
        if state["world_size"] == WORLD:     # (nothing of the training itself depends on these generators)
            set_rng_state(state["rng"][RANK], device)
            skipped = state["skipped"][RANK]
        else:
            skipped = sum(state["skipped"]) if RANK == 0 else 0
        log(f"resumed from {resume_dir} at step {step}")

    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True) \
        if WORLD > 1 else model
    shift_len = (args.resolution // 16) ** 2
    run_info = {"frozen": {k: paths[k] for k in ("autoencoder", "dinov3", "gemma")} | {"stats": stats_path},
                "resolution": args.resolution, "stage": args.stage,
                "model": {"preset": args.model, "config": dataclasses.asdict(config)},
                "args": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}}

    remaining = max(0, args.steps - step)
    sampler = Positions(len(records), args.seed, args.resolution, position, remaining, args.global_batch, RANK, WORLD)
    loader = torch.utils.data.DataLoader(TrainSet(records, crops, args, cache), batch_size=args.micro_batch,
                                         sampler=sampler, num_workers=args.workers, collate_fn=collate,
                                         persistent_workers=False, prefetch_factor=4 if args.workers else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    peak = peak_flops(args)
    warned = set()
    log(f"NextDiT {args.model}: {n_params / 1e6:.2f}M trainable parameters, {config.in_channels} latent channels, "
        f"caption width {config.cap_feat_dim}")
    log(f"stage {args.stage}: {args.resolution}px ({len(crops)} crop sizes), shift {training_shift(shift_len):.3f}, "
        f"{args.steps} steps, global batch {args.global_batch} = {WORLD} ranks x {accum} x micro {args.micro_batch}, "
        f"max text {args.max_text_len} tokens, {precision}, {len(records)} records")

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
    # SIGTERM (sent by schedulers before preemption, forwarded by torchrun) or SIGUSR1: save, then stop.
    old_handlers = {}
    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}

    meter = Meter(device)
    data_iter = iter(loader)
    t_start = time.time()
    try:
        while step < args.steps:
            t0 = time.time()
            opt.zero_grad(set_to_none=True)
            for k in range(accum):
                items = next(data_iter)
                for it in items:
                    for i, reason in it["skipped"]:
                        skipped += 1
                        if i not in warned:
                            warned.add(i)
                            log(f"warning: skipped {records.path}:{records.lines[i]} ({reason})", every_rank=True)
                x1, feats, mask = prepare_batch(items, frozen, stats, cache, args, device, text_dtype)
                t, noise = [], []
                for it, x in zip(items, x1):
                    g = torch.Generator().manual_seed(it["noise_seed"])
                    t.append(sample_training_t(1, shift_len, generator=g))
                    noise.append(torch.randn(x.shape, generator=g).to(device))
                t = torch.cat(t).to(device)
                xt = [interpolate(n, x, ti) for n, x, ti in zip(noise, x1, t.tolist())]
                sync = ddp.no_sync() if WORLD > 1 and k < accum - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        pred = ddp(xt, t, feats, mask)
                    losses = torch.stack([F.mse_loss(p.float(), velocity_target(n, x)) for p, n, x in zip(pred, noise, x1)])
                    (losses.sum() / local).backward()
                meter.add_losses(losses.detach(), t)
                meter.flops += train_flops(config, n_params, mask.sum(1).tolist(), [x[0].numel() for x in x1])
            if args.dump_grads:     # the gradient of the global mean loss, as every rank holds it
                save_file({n: p.grad.detach().cpu().contiguous() for n, p in model.named_parameters() if p.grad is not None},
                          str(out / f"grads-{step + 1:07d}-rank{RANK}.safetensors"))
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            if torch.isfinite(grad_norm):
                opt.step()
                decay = min(args.ema_decay, (1 + ema_updates) / (10 + ema_updates)) if args.ema_warmup else args.ema_decay
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        ema[name].lerp_(p.detach().float(), 1 - decay)
                ema_updates += 1
            else:   # identical on every rank (the gradients are all-reduced), so every rank skips it
                log(f"warning: step {step + 1}: non-finite gradient norm, update skipped")
                meter.bad_steps += 1
            step += 1
            position += args.global_batch
            meter.step(float(grad_norm), time.time() - t0, args.global_batch)

            stopping = stop["signal"] is not None
            if WORLD > 1:
                stopping = all_sum(int(stopping), device) > 0
            if step % args.log_every == 0 or step == args.steps or stopping:
                meter.report(step, args, t_start, peak, skipped, out)
            if step % args.save_every == 0 or step == args.steps or stopping:
                check_replicas(model, device)
                per_rank = [(rng_state(device), skipped)]
                if WORLD > 1:
                    per_rank = [None] * WORLD
                    dist.all_gather_object(per_rank, (rng_state(device), skipped))
                if RANK == 0:
                    state = {"step": step, "position": position, "ema_updates": ema_updates, "world_size": WORLD,
                             "rng": [r for r, _ in per_rank], "skipped": [n for _, n in per_rank],
                             "seed": args.seed, "resolution": args.resolution}
                    folder = save_checkpoint(out, step, model, ema, opt, state, run_info, stats_path, args.keep)
                    log(f"saved {folder}")
                barrier()
            if args.kill_after_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            if stopping:
                log(f"stopped by signal {stop['signal']} at step {step}: continue with --resume")
                break
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if step >= args.steps:
        log(f"done: step {step}/{args.steps} ({fmt_time(time.time() - t_start)} in this process); checkpoints in {out}")
    return out


def prepare_batch(items, frozen, stats, cache, args, device, text_dtype):
    """Micro-batch items -> normalised latents (list of [C, h, w], fp32), caption features [B, L, D], mask [B, L]."""
    if cache is None:
        raw = frozen.encode_images([it["image"] for it in items])
        feats, mask = frozen.encode_texts([it["text"] for it in items], args.max_text_len)
    else:
        raw = [it["latent"].to(device) for it in items]
        L = max(it["text_feats"].shape[0] for it in items)
        feats = torch.zeros(len(items), L, items[0]["text_feats"].shape[1], dtype=text_dtype, device=device)
        mask = torch.zeros(len(items), L, dtype=torch.bool, device=device)
        for b, it in enumerate(items):
            n = it["text_feats"].shape[0]
            feats[b, :n], mask[b, :n] = it["text_feats"].to(device), True
    latents = [stats.normalize(r[None])[0] for r in raw]
    return latents, feats.to(device), mask.to(device)


class Meter:
    """Sums over a log interval; reduced over ranks when reported (rank 0 prints and appends OUT/log.jsonl)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.bins = torch.zeros(2, T_BINS, dtype=torch.float64)   # loss sums, counts
        self.flops, self.bad_steps = 0.0, 0
        self.steps, self.seconds, self.images, self.grad_norm = 0, 0.0, 0, 0.0

    def add_losses(self, losses, t):
        b = (t.detach().cpu() * T_BINS).long().clamp(0, T_BINS - 1)
        self.bins[0].index_add_(0, b, losses.cpu().double())
        self.bins[1].index_add_(0, b, torch.ones_like(b, dtype=torch.float64))

    def step(self, grad_norm, seconds, images):
        self.steps += 1
        self.seconds += seconds
        self.images += images
        self.grad_norm += grad_norm

    def report(self, step, args, t_start, peak, skipped, out):
        vec = torch.cat([self.bins.flatten(), torch.tensor([self.flops, skipped], dtype=torch.float64)])
        if WORLD > 1:
            vec = vec.to(self.device)
            dist.all_reduce(vec)
            vec = vec.cpu()
        bins = vec[:2 * T_BINS].view(2, T_BINS)
        flops, skipped = vec[-2].item(), int(vec[-1].item())
        loss = (bins[0].sum() / bins[1].sum()).item()
        by_bin = [(bins[0, i] / bins[1, i]).item() if bins[1, i] > 0 else None for i in range(T_BINS)]
        ips = self.images / self.seconds
        mfu = flops / self.seconds / (peak * WORLD) if peak else None
        eta = (args.steps - step) * self.seconds / self.steps
        rec = {"step": step, "loss": loss, "loss_by_t": by_bin, "grad_norm": self.grad_norm / self.steps,
               "images_per_s": ips, "mfu": mfu, "lr": args.lr, "skipped": skipped,
               "bad_steps": self.bad_steps, "elapsed_s": time.time() - t_start}
        if RANK == 0:
            bins_txt = " ".join("-" if v is None else f"{v:.3f}" for v in by_bin)
            log(f"step {step}/{args.steps} ({100 * step / args.steps:.1f}%) loss {loss:.4f} | by t {bins_txt} | "
                f"grad {rec['grad_norm']:.3f} | {ips:.1f} img/s | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}"
                f" | skipped {skipped} | eta {fmt_time(eta)}")
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        self.reset()


# -----------------------------------------------------------------------------------------------------------------
# The toy model: every part of SVG-T2I, tiny, trained on the shapes world of toy.py in minutes on a CPU

TOY_SAMPLING = dict(steps=25, cfg=4.0, shift=2.0, solver="euler", system_prompt="empty")


def train_toy_decoder(ae_path, images, steps, batch=16, lr=2e-3, seed=0):
    """Train the autoencoder's decoder on reconstruction (L1 + L2 in pixels) from the frozen DINOv3 features of
    `images` ([N, 3, H, W] in [-1, 1]); cosine learning rate; writes the checkpoint back in place."""
    ae = load_autoencoder(ae_path)
    with torch.no_grad():
        feats = torch.cat([ae.encode(images[i:i + 256]) for i in range(0, len(images), 256)])
    decoder = ae.decoder.train().requires_grad_(True)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        err = decoder(feats[idx]) - images[idx]
        loss = err.abs().mean() + err.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps:
            log(f"decoder step {step}/{steps}  loss {loss.item():.4f}  {fmt_time(time.time() - t0)}")
    sd = read_state_dict(ae_path)
    sd.update({"decoder." + k: v.detach().contiguous() for k, v in decoder.state_dict().items()})
    atomic_save_file({k: v.contiguous() for k, v in sd.items()}, ae_path)


def write_toy_bundle(bundle, run_dir, frozen, stats_path):
    """The finished toy model, in the layout sample.py reads: the DiT's EMA weights, the autoencoder, the latent
    statistics, the Gemma folder, and run.json with the sampling defaults. Weights are stored in fp16 (half the
    size; the loaders cast them to the model dtype)."""
    ckpt = resolve_checkpoint("latest", Path(run_dir))
    tmp = Path(str(bundle) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    half = lambda sd: {k: (v.half() if v.is_floating_point() and not k.endswith("periods") else v).contiguous()
                       for k, v in sd.items()}
    save_file(half(load_file(str(ckpt / "ema.safetensors"))), str(tmp / "ema.safetensors"))
    save_file(half(read_state_dict(frozen["autoencoder"])), str(tmp / "autoencoder.safetensors"))
    shutil.copyfile(stats_path, tmp / "latent_stats.pt")
    shutil.copytree(frozen["gemma"], tmp / "text_encoder")
    run = json.loads((ckpt / "run.json").read_text())
    info = {"frozen": {}, "resolution": TOY_SIZE, "sample": TOY_SAMPLING, "model": run["model"],
            "trained": {"step": run.get("step"), "note": "python train.py --toy"}}
    (tmp / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(bundle, ignore_errors=True)
    os.replace(tmp, bundle)


def train_toy(args):
    """python train.py --toy: the whole toy SVG-T2I, end to end, on a CPU.
    1. the shapes world (toy.py): images and captions; 2. tiny frozen parts with random weights standing in for the
    pretrained DINOv3 and Gemma-2 (a sentencepiece tokenizer trained on the toy captions); 3. the decoder trained
    on reconstruction; 4. the DiT trained by flow matching through train() itself (statistics computed from the
    data, latents and caption features cached); 5. the bundle sample.py --toy reads; 6. the prompt-following score."""
    import toy
    global LOG_FILE
    t_start = time.time()
    work = Path(os.path.abspath(args.out or "runs/toy"))
    if (work / "dit" / "latest").is_file() and not args.resume:
        raise UsageError(f"{work} already holds a toy run: pass --resume to continue it, or choose another --out")
    work.mkdir(parents=True, exist_ok=True)
    LOG_FILE = work / "log.txt"
    torch.set_num_threads(args.threads or torch.get_num_threads())

    data = work / "data" / "data.jsonl"
    if not data.is_file():
        log(f"toy data: {args.toy_images} images of {TOY_SIZE}px")
        (work / "data").mkdir(exist_ok=True)
        lines = []
        for i, (image, text) in enumerate(toy.make_dataset(args.toy_images, size=TOY_SIZE, seed=toy.TRAIN_SEED)):
            image.save(work / "data" / f"{i:06d}.png")
            lines.append(json.dumps({"path": f"{i:06d}.png", "prompt": text}))
        atomic_write_text(data, "\n".join(lines) + "\n")

    frozen_json = work / "frozen.json"
    if not frozen_json.is_file():
        log("toy frozen parts: random DINOv3 (dim 128) and Gemma-2 (hidden 64), tokenizer on the toy captions")
        made = svgt2i.make_tiny_frozen(str(work / "frozen"), list(toy.CAPTIONS) + [""], seed=args.seed,
                                       dinov3_config=DINOv3Config(dim=128, depth=2, n_heads=2, ffn_dim=256),
                                       decoder_config=DecoderConfig(z_channels=128, ch=32, num_res_blocks=0))
        paths = [json.loads(line)["path"] for line in data.read_text().splitlines()]
        images = images_to_tensor([Image.open(work / "data" / p) for p in paths])
        train_toy_decoder(made["autoencoder"], images, args.toy_decoder_steps, seed=args.seed)
        atomic_write_text(frozen_json, json.dumps(made))
    made = json.loads(frozen_json.read_text())

    # the DiT stage is an ordinary train() run of --model toy (its recipe: TOY_STAGE); the flags a user may set on
    # the toy run override that recipe
    argv = ["--model", "toy", "--data", str(data), "--out", str(work / "dit"), "--autoencoder", made["autoencoder"],
            "--gemma", made["gemma"], "--system-prompt", "empty", "--cache", str(work / "cache"), "--seed",
            str(args.seed), "--threads", str(torch.get_num_threads()), "--precision", "fp32", "--text-dtype", "fp32",
            "--keep", "2"]
    for name in ("global_batch", "steps", "lr", "ema_decay"):
        if getattr(args, name) is not None:
            argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if (work / "dit" / "latest").is_file():
        argv.append("--resume")
    dit_args = finish_args(parse_args(argv))
    train(dit_args)
    LOG_FILE = work / "log.txt"
    write_toy_bundle(Path(args.bundle), work / "dit", made, str(work / "dit" / "latent_stats.pt"))
    log(f"toy model written to {args.bundle} ({fmt_time(time.time() - t_start)} in all)")
    shipped = os.path.abspath(args.bundle) == TOY_BUNDLE
    log(f"score it: python sample.py {'--toy' if shipped else '--ckpt ' + str(args.bundle)} --score")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.toy:
            train_toy(args)
            return
        finish_args(args)
        train(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        prefix = f"[rank {RANK}] " if WORLD > 1 else ""
        print(f"{prefix}train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
