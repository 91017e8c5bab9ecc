"""
A DiT run's frozen parts: the encoders (DINOv3 for the latents, Gemma-2 for the captions), loaded
on first use; where their files come from (the flags, the run.json of the checkpoint a run
continues or starts from, the release beside the command, or, for --model tiny, tiny random ones
made in the run); the latent statistics (given, carried over from that checkpoint, or computed
from the data); the feature cache (--cache); and what each checkpoint's run.json records of them.

    frozen, cache, stats, text_dim = setup_frozen(args, dist, out, records, crops, sources,
                                                  text_dtype)
    x = frozen.encode_images(images); feats, mask = frozen.encode_texts(texts, max_length)

You need not read this to learn SVG-T2I.
"""

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from data import caption_texts
from plumbing import UsageError
from plumbing.cache import Cache
from plumbing.files import atomic_write
from plumbing.loading import (load_autoencoder, load_dinov3, load_gemma2, load_latent_stats,
                              load_tokenizer)
from plumbing.release import (FROZEN, GEMMA_DIRS, RELEASE_DIRS, recorded_but_gone,
                              recorded_parts, release_files)
from plumbing.runs import Progress, compute_stats
from plumbing.sharding import shard
from plumbing.tiny import make_tiny_frozen
from svgt2i import SYSTEM_PROMPTS, Autoencoder, TextEncoder


class FrozenEncoders:
    """DINOv3 and Gemma-2, frozen, each loaded on first use (a run that reads a complete feature
    cache never loads them). `paths`: {"autoencoder", "dinov3", "gemma", "stats"}."""

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
        """Gemma-2 and its tokenizer as the caption encoder (svgt2i.TextEncoder)."""
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
        """Captions -> Gemma features [B, L, D] and mask [B, L]."""
        return self.text(texts, max_length=max_length)

    def widths(self, cache=None):
        """(latent channels, caption feature width), from the cache when it knows them."""
        if cache is not None and cache.meta.get("latent_channels"):
            return cache.meta["latent_channels"], cache.meta["text_dim"]
        return self.encoder.encoder.config.dim, self.text.model.config.hidden_size

    def free(self):
        """Drop both encoders (a run that trains from the cache needs neither)."""
        self._encoder = self._text = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def setup_frozen(args, dist, out, records, crops, sources, text_dtype):
    """The frozen encoders (frozen_paths), the feature cache (--cache) and the latent statistics
    (computed into OUT/latent_stats.pt when neither given nor carried over). Returns
    (FrozenEncoders, the Cache or None, svgt2i.LatentStats, the caption feature width): the widths
    are read before the encoders are freed, so a run from the cache never loads them."""
    paths = frozen_paths(args, dist, out, records, sources)
    frozen = FrozenEncoders(paths, dist.device, text_dtype,
                            dist.mesh if args.shard_text_encoder else None)
    cache = open_cache(args, dist, records, crops, frozen) if args.cache else None
    if not paths["stats"]:
        paths["stats"] = str(out / "latent_stats.pt")
        n = min(len(records), args.stats_images)
        dist.log(f"latent statistics: computing from {n} images into {paths['stats']}")
        compute_stats(dist, records, range(n), crops, frozen.encode_images, cache,
                      args.micro_batch, paths["stats"])
    dist.log(f"latent statistics: {paths['stats']}")
    latent_channels, text_dim = frozen.widths(cache)
    stats = load_latent_stats(paths["stats"], channels=latent_channels)
    if cache is not None:
        frozen.free()
    if not paths["autoencoder"]:
        dist.log("note: no --autoencoder: sampling from these checkpoints will need --autoencoder "
                 "(the decoder)")
    return frozen, cache, stats, text_dim


def frozen_paths(args, dist, out, records, sources):
    """{"autoencoder", "dinov3", "gemma", "stats"}: each frozen part from its flag, else from the
    run.json of a checkpoint in `sources` (the one resumed, the one --init-from names), so a stage
    chain keeps its encoders, else from the release beside the command; --model tiny without them
    makes tiny random ones (tiny_frozen). Then the latent statistics (stats_file). `args` is not
    changed."""
    sources = [str(s) for s in sources if s]
    paths = {k: getattr(args, k) for k in FROZEN}
    for source in sources:
        recorded = recorded_parts(source)
        for k in FROZEN:
            if not paths[k] and k in recorded:
                if not os.path.exists(recorded[k]):
                    raise recorded_but_gone(source, k, recorded[k])
                paths[k] = recorded[k]
    stats = args.stats
    if args.model != "tiny" and not all(paths.values()):     # the release beside the command
        release = release_files()
        paths = {k: paths[k] or release.get(k) for k in FROZEN}
        stats = stats or release.get("stats")
    if not (paths["autoencoder"] or paths["dinov3"]) or not paths["gemma"]:
        if args.model != "tiny":
            raise UsageError("missing frozen parts: pass --autoencoder (and --dinov3 if it has "
                             "no encoder.* keys) and --gemma (the Gemma-2-2B folder), or run from "
                             "the folder holding the release (looked in "
                             f"./{', ./'.join(RELEASE_DIRS)} and ./{', ./'.join(GEMMA_DIRS)}); "
                             "see README")
        paths.update(tiny_frozen(args.seed, dist, out, records))
    paths["stats"] = stats_file(stats, dist, sources, out)
    for k in ("autoencoder", "dinov3", "stats"):
        if paths[k] and not os.path.isfile(paths[k]):
            raise UsageError(f"--{k}: file not found: {paths[k]}")
    if not os.path.isdir(paths["gemma"]):
        raise UsageError(f"--gemma: folder not found: {paths['gemma']} (expected the Gemma-2-2B "
                         "folder)")
    return paths


def tiny_frozen(seed, dist, out, records):
    """--model tiny without frozen parts: tiny random ones (plumbing.tiny.make_tiny_frozen), made
    once by rank 0 in OUT/frozen and listed in OUT/frozen.json relative to OUT (the run may move);
    the tiny Gemma's tokenizer is trained on the captions as Gemma will see them."""
    if dist.main and not (out / "frozen.json").is_file():
        sample = [records[i] for i in range(min(len(records), 10000))]
        texts = {t for r in sample for _, t in caption_texts(r)} | set(SYSTEM_PROMPTS.values())
        made = make_tiny_frozen(str(out / "frozen"), sorted(texts), seed=seed)
        made = {k: os.path.relpath(v, out) for k, v in made.items()}
        atomic_write(out / "frozen.json", lambda tmp: tmp.write_text(json.dumps(made)))
    dist.barrier()
    made = json.loads((out / "frozen.json").read_text())
    return {k: str(out / made[k]) for k in FROZEN if made.get(k)}


def stats_file(given, dist, sources, out):
    """The latent statistics: `given` (--stats, or the release's); else the copy inside the
    checkpoint we resume or start from (a stage chain must keep its normalisation), copied to
    OUT/latent_stats.pt; else None: to be computed there."""
    if given:
        return given
    mine = out / "latent_stats.pt"
    for source in sources:
        theirs = Path(source) / "latent_stats.pt"
        if theirs.is_file():
            if dist.main and (not mine.is_file() or mine.read_bytes() != theirs.read_bytes()):
                atomic_write(mine, lambda tmp: shutil.copyfile(theirs, tmp))
            dist.barrier()
            return str(mine)
    return str(mine) if mine.is_file() else None


def open_cache(args, dist, records, crops, frozen):
    """--cache DIR: the DINOv3 latents and Gemma features of every record, computed once
    (ranks share the work) and then read instead of the images (plumbing.cache.Cache)."""
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
    missing = cache.missing(range(dist.rank, len(records), dist.world))
    if dist.main:
        cache.write_empty(frozen.encode_texts, args.max_text_len)
    progress = Progress(f"cache: rank {dist.rank} records", len(missing), stream=sys.stdout)
    for start in range(0, len(missing), args.micro_batch):
        chunk = missing[start:start + args.micro_batch]
        cache.fill(chunk, records, crops, frozen.encode_images, frozen.encode_texts,
                   args.max_text_len)
        if dist.main:
            progress(start + len(chunk))
    written = dist.all_sum(len(missing))
    if written:
        dist.log(f"cache: wrote {written} records to {args.cache}")
    dist.barrier()
    if dist.main:
        cache.finish(len(records))
    dist.barrier()
    return cache.load()


def relative_to_run(path, out):
    """How run.json records a frozen part: relative to the checkpoint folder when it lies inside
    the run (so a moved or copied run still finds it), absolute otherwise."""
    path = os.path.abspath(path)
    inside = os.path.commonpath([path, os.path.abspath(out)]) == os.path.abspath(out)
    return os.path.join("..", os.path.relpath(path, out)) if inside else path


def dit_run_record(args, paths, config):
    """What each checkpoint's run.json records (besides its step): the frozen parts and the
    statistics (relative_to_run), the resolution and stage, the model, every argument."""
    frozen = {k: paths[k] and relative_to_run(paths[k], args.out) for k in FROZEN + ("stats",)}
    return {"frozen": frozen,
            "resolution": args.resolution, "stage": args.stage,
            "model": {"preset": args.model, "config": dataclasses.asdict(config)},
            "args": {k: (str(v) if isinstance(v, torch.device) else v)
                     for k, v in vars(args).items()}}
