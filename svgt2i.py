"""
SVG-T2I, the glue: the method (flow matching, the samplers, guidance), the text-to-image pipeline,
and the parts it connects: latent statistics, the autoencoder, text encoding, and one way to read a
file. The four models live in their own files (dinov3.py, gemma2.py, nextdit.py, decoder.py), each
with its key map.

Conventions, written once here and used everywhere:
- Code time t in [0, 1]: t = 0 is pure noise, t = 1 is data (the official code's convention; the
  paper's Eq. 1 labels the ends the other way round).
- x_t = t * data + (1 - t) * noise, and the network predicts the velocity dx_t/dt = data - noise.
- time_shift(t, s) = t / (t + s - s * t) moves time towards the noise end for s > 1.
- Latents are [B, C, h, w] with h = H/16, w = W/16 (height first), tokens row-major; images are
  [B, 3, H, W] in [-1, 1] between modules, uint8 only at the file boundary.
"""

import glob
import json
import math
import os
import shutil
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from decoder import (Decoder, DecoderConfig, ResidualViT, ResidualViTConfig, decoder_keymap,
                     residual_vit_keymap)
from dinov3 import IMAGENET_MEAN, IMAGENET_STD, DINOv3, dinov3_keymap
from gemma2 import Gemma2, Gemma2Config, Gemma2Tokenizer, gemma2_keymap
from nextdit import NextDiT, NextDiTConfig, nextdit_keymap

# -------------------------------------------------------------------------------------------------
# The method, training half: flow matching on the straight path from noise to data


def time_shift(t, shift):
    """Warp time towards the noise end: with shift s > 1 more of [0, 1] is spent at high noise."""
    return t / (t + shift - shift * t)


def interpolate(noise, data, t):
    """The straight path x_t = t * data + (1 - t) * noise; t is [B]
    (or a float, or a 0-d tensor)."""
    if torch.is_tensor(t) and t.dim() > 0:
        t = t.view(-1, *([1] * (data.dim() - 1)))
    return t * data + (1 - t) * noise


def velocity_target(noise, data):
    """What the network regresses onto: dx_t/dt along the straight path."""
    return data - noise


def training_shift(seq_len):
    """Resolution-dependent time shift used in training: exp(mu), mu linear in the image token
    count, through (256 tokens, 0.5) and (4096 tokens, 1.15). 256px -> 1.649, 512px -> 1.878,
    1024px -> 3.158."""
    mu = 0.5 + (seq_len - 256) * (1.15 - 0.5) / (4096 - 256)
    return math.exp(mu)


def sample_training_t(n, seq_len, generator=None, device="cpu"):
    """Training times: logit-normal(0, 1), then shifted towards noise by
    training_shift(seq_len)."""
    t = torch.sigmoid(torch.randn(n, generator=generator)).to(device)
    return time_shift(t, training_shift(seq_len))


def flow_matching_loss(model, x1, noise, t, cap_feats, cap_mask):
    """The training objective, per sample: mean squared error between the model's velocity at
    x_t = t x1 + (1 - t) noise and the target x1 - noise. x1 and noise are [B, C, h, w] or lists of
    [C, h_i, w_i] (one aspect bucket per sample), t is [B]. Returns the B losses in fp32; the
    training loss is their mean over the batch."""
    xt = [interpolate(n, x, ti) for n, x, ti in zip(noise, x1, t)]          # B x [C, h_i, w_i]
    pred = model(xt, t, cap_feats, cap_mask)                                # B x [C, h_i, w_i]
    losses = [F.mse_loss(p.float(), velocity_target(n, x)) for p, n, x in zip(pred, noise, x1)]
    return torch.stack(losses)                                              # [B]


# -------------------------------------------------------------------------------------------------
# The method, sampling half. `velocity(x, t)` is any function returning dx/dt at the
# float code time t.


def euler_times(steps, shift):
    """The Euler grid t_i = time_shift(i / steps), i = 0..steps.
    (The official ODE path builds the same grid from its number of points, so its
    `--num_sampling_steps N` is our steps = N - 1.)"""
    return time_shift(torch.arange(steps + 1, dtype=torch.float64) / steps, shift)


def euler_sample(velocity, x, steps, shift=1.0, callback=None, start=0, impose=None):
    """Euler ODE solver: `steps` model evaluations, at t_0 .. t_{steps-1} of euler_times;
    never at t = 1. Editing: start=i runs only the steps from grid point i on (x is then the
    state at t_i), and impose(x, t) is applied after each step, at the step's new time t."""
    ts = euler_times(steps, shift).tolist()
    for i in range(start, steps):
        x = x + (ts[i + 1] - ts[i]) * velocity(x, ts[i])
        if impose is not None:
            x = impose(x, ts[i + 1])
        if callback is not None:
            callback(i + 1, steps)
    return x


def dpm_sigmas(steps, shift):
    """The official DPM-Solver grid (`time_uniform_flow`): noise levels sigma = 1 - t, uniform in
    [0.999, 0] before the shift, so the first call is at t ~ 1e-4 and the last level
    is exactly 0."""
    u = 0.999 * (steps - torch.arange(steps + 1, dtype=torch.float64)) / steps
    return shift * u / (1 + (shift - 1) * u)


def dpm_solver_sample(velocity, x, steps, shift=1.0, callback=None, start=0, impose=None):
    """DPM-Solver++ 2M (multistep, data prediction) for the flow path, as the official
    `--solver dpm`. In noise level sigma: alpha = 1 - sigma, lambda = log(alpha / sigma), the data
    prediction is x0 = x + sigma * v. Step 1 is first order, steps 2..N-1 second order, and the
    last step (to sigma = 0) is first order, i.e. returns the data prediction. N model evaluations.
    The official solver runs this arithmetic in bf16; we run it in x's dtype (fp32 by default).
    Editing: start=i begins at grid point i with a fresh multistep history (its first step is
    first order, as step 1 is), and impose(x, t) is applied after each step at code time
    t = 1 - sigma of the step's end."""
    sig = dpm_sigmas(steps, shift).tolist()
    lam = [math.log((1 - s) / s) if s > 0 else math.inf for s in sig]
    prev_x0, prev_lam = None, None
    for i in range(start, steps):
        s, s_next = sig[i], sig[i + 1]
        x0 = x + s * velocity(x, 1 - s)                 # data prediction at sigma_i
        if s_next == 0:                                 # last step: lower order final, phi = -1
            x = x0
        else:
            h = lam[i + 1] - lam[i]
            phi = math.expm1(-h)
            x = (s_next / s) * x - (1 - s_next) * phi * x0
            if prev_x0 is not None:                     # second-order multistep correction
                r0 = (lam[i] - prev_lam) / h
                d1 = (x0 - prev_x0) / r0
                x = x - 0.5 * (1 - s_next) * phi * d1
        if impose is not None:
            x = impose(x, 1 - s_next)
        prev_x0, prev_lam = x0, lam[i]
        if callback is not None:
            callback(i + 1, steps)
    return x


SAMPLERS = {"euler": euler_sample, "dpm": dpm_solver_sample}


def sampler_times(solver, steps, shift):
    """The code times of a solver's grid points i = 0..steps, float64: euler_times, or
    1 - dpm_sigmas for DPM (whose point 0, t ~ 1e-4, text-to-image treats as pure noise)."""
    return euler_times(steps, shift) if solver == "euler" else 1 - dpm_sigmas(steps, shift)


def edit_start(steps, strength):
    """The grid point an edit starts at: the last round(strength * steps) steps (halves round up)
    are run, so strength 1 starts at point 0 (text-to-image) and 0 runs no step."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) \
            or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    return steps - math.floor(strength * steps + 0.5)


# -------------------------------------------------------------------------------------------------
# Classifier-free guidance


@dataclass
class Guidance:
    """CFG settings. `scale` multiplies (cond - uncond): g = uncond + scale * (cond - uncond).
    renorm (official default 1.0): clip each sample's ||g|| to renorm * ||cond||; 0 disables it.
    trunc (official `cfg_trunc`, default 100 = never): guidance only while t < trunc,
    else cond only."""
    scale: float = 4.0
    renorm: float = 1.0
    trunc: float = 100.0

    @property
    def active(self):
        return self.scale != 1.0


def guided_velocity(model, cap_feats, cap_mask, guidance, dtype=None, split=False):
    """Return velocity(x, t) for the samplers. With guidance on, `cap_feats`/`cap_mask` hold the B
    conditional rows followed by the B unconditional rows, and one batched forward computes both;
    split=True runs them as two forwards instead, each padded only within itself, so with one
    image per batch neither needs an attention mask (the shorter negative caption is otherwise
    padded and masked). Same result up to rounding; which is faster is for a GPU to say
    (bench/bench_gpu.py). What does not change between steps (the refined captions, RoPE tables,
    masks: NextDiT.context) is computed once per row range."""
    contexts = {}

    def forward(x, t, rows):
        # x [b - a, C, h, w] in the model's dtype, for caption rows a..b-1
        a, b = rows
        key = (rows, tuple(x.shape[2:]))
        if key not in contexts:
            contexts[key] = model.context(cap_feats[a:b], cap_mask[a:b],
                                          [tuple(x.shape[2:])] * (b - a))
        tt = torch.full((b - a,), t, device=x.device, dtype=torch.float32)
        return model(x, tt, context=contexts[key])

    def velocity(x, t):
        B = x.shape[0]
        xin = x.to(dtype) if dtype is not None else x
        if not guidance.active or t >= guidance.trunc:
            return forward(xin, t, (0, B)).to(x.dtype)
        if split:
            cond, uncond = forward(xin, t, (0, B)), forward(xin, t, (B, 2 * B))
            cond, uncond = cond.to(x.dtype), uncond.to(x.dtype)
        else:
            out = forward(torch.cat([xin, xin]), t, (0, 2 * B))               # [2B, C, h, w]
            cond, uncond = out.to(x.dtype).chunk(2)
        g = uncond + guidance.scale * (cond - uncond)
        if guidance.renorm > 0:
            dims = tuple(range(1, g.dim()))
            n_cond = torch.linalg.vector_norm(cond, dim=dims, keepdim=True)
            n_g = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
            g = g * torch.clamp(guidance.renorm * n_cond / (n_g + 1e-12), max=1.0)
        return g
    return velocity


# -------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class Sampling:
    """How an image is sampled; the defaults are the official evaluation settings. sample.py's
    flags, and a checkpoint's own run.json "sample" entry (the toy model has one),
    override them."""
    steps: int = 50                 # model evaluations
    cfg: float = 4.0                # guidance scale, 1 = off
    shift: float = 10.0             # time shift of the sampling grid
    solver: str = "euler"           # a key of SAMPLERS
    system_prompt: str = "base"     # a key of SYSTEM_PROMPTS, or a literal
    negative: str = ""              # negative prompt ("" = unconditional, without system prompt)
    renorm: float = 1.0             # Guidance.renorm
    cfg_trunc: float = 100.0        # Guidance.trunc

    @classmethod
    def names(cls):
        return [f.name for f in fields(cls)]


class SVGT2I:
    """Text-to-image: Gemma-2 caption features -> NextDiT flow in normalised DINOv3 latent
    space -> decoder."""

    def __init__(self, dit, autoencoder, stats, text_encoder, device="cpu", dtype=torch.bfloat16):
        self.dit, self.autoencoder, self.stats = dit, autoencoder, stats
        self.text_encoder = text_encoder
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def from_pretrained(cls, ckpt_dir, gemma_dir=None, device="cpu", dtype=torch.bfloat16,
                        with_encoder=False, **overrides):
        """Load the whole pipeline. The DiT and Gemma go to `dtype`; the decoder (and DINOv3) stay
        fp32, which costs little (43M + 29M parameters) and keeps decoding exact.
        `overrides`: dit=, autoencoder=, dinov3=, stats= file paths that replace what is found."""
        files = find_weights(ckpt_dir, gemma_dir, **overrides)
        dit = load_nextdit(files["dit"], device=device, dtype=dtype)
        autoencoder = load_autoencoder(files["autoencoder"], dinov3_path=files["dinov3"],
                                       device=device, dtype=torch.float32, encoder=with_encoder)
        if with_encoder and autoencoder.encoder is None:
            raise FileNotFoundError(f"{ckpt_dir}: no DINOv3 weights found (needed to encode "
                                    "images); expected dinov3_vits16plus_pretrain_lvd1689m-*.pth "
                                    "or encoder.* keys in the autoencoder checkpoint "
                                    f"({DOWNLOAD_HINT})")
        stats = load_latent_stats(files["stats"], channels=autoencoder.latent_channels)
        if dit.config.in_channels != stats.channels:
            raise ValueError(f"the DiT works on {dit.config.in_channels} channels but the "
                             f"autoencoder on {stats.channels}: use the P autoencoder with the "
                             "released DiT")
        text = TextEncoder(load_tokenizer(files["gemma"]),
                           load_gemma2(files["gemma"], device=device, dtype=dtype))
        return cls(dit, autoencoder, stats, text, device=device, dtype=dtype)

    def encode_text(self, prompts, system_prompt="base", negative_prompt="", guidance=True):
        """Caption features for `prompts`, followed (with guidance) by one negative row per prompt.
        The default negative is "" without a system prompt, as the official sampler and as caption
        dropout in training; a non-empty negative gets the system prompt like a prompt does."""
        sp = system_prompt_text(system_prompt)
        texts = [sp + p for p in prompts]
        if guidance:
            texts += [sp + negative_prompt if negative_prompt else ""] * len(prompts)
        return self.text_encoder(texts)

    def compile(self, **kwargs):
        """torch.compile the DiT, block by block (NextDiT.compile_blocks). Returns self."""
        self.dit.compile_blocks(**kwargs)
        return self

    def enhance_prompt(self, text, max_new_tokens=None):
        """The official prompt enhancer: `text` (a str, or a list) rewritten by the pipeline's own
        Gemma-2 (enhance_prompt; max_new_tokens None: the official 196). Condition on the result
        with the ENHANCE_SYSTEM_PROMPT."""
        tok, model = self.text_encoder.tokenizer, self.text_encoder.model
        max_new_tokens = max_new_tokens or ENHANCE_MAX_NEW_TOKENS
        if isinstance(text, str):
            return enhance_prompt(tok, model, text, max_new_tokens)
        return [enhance_prompt(tok, model, t, max_new_tokens) for t in text]

    @torch.no_grad()
    def generate(self, prompts, height=1024, width=1024, seed=0, sampling=None, batch_size=1,
                 offload=False, progress=None, init_images=None, strength=1.0, mask=None,
                 output="pil", split_cfg=False, **overrides):
        """Generate one image per prompt. `sampling` (a Sampling) and `overrides`
        (its field names, e.g. steps=25, cfg=2.0) set the sampler. Image k starts from
        randn(1, C, H/16, W/16) drawn on the CPU with seed + k (or seed[k], given a list), so a
        seed gives the same image on any device and in any batch. split_cfg: cond and uncond as two
        forwards (guided_velocity's split).

        Editing: `init_images` (a PIL image, or one per prompt) are fitted to height x width,
        encoded by DINOv3 and normalised; sampling starts at grid point edit_start(steps,
        strength) from them noised with the seed's noise to that point's time (at point 0: the
        noise itself). strength 1 is text-to-image bit for bit, 0 the autoencoder's
        reconstruction. `mask` (PIL, the size of its init image; white = redraw, token_mask)
        keeps the other tokens: after each step they are reset to the init latent noised to the
        step's new time, so they end exactly at it. output="latent" returns the final normalised
        latents [n, C, H/16, W/16] instead of images."""
        s = replace(sampling or Sampling(), **overrides)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [seed + k for k in range(len(prompts))] if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        check_image_size(height, width)
        if s.solver not in SAMPLERS:
            raise ValueError(f"unknown solver {s.solver!r}: choose one of {', '.join(SAMPLERS)}")
        if output not in ("pil", "latent"):
            raise ValueError(f"output must be 'pil' or 'latent', got {output!r}")
        edit = prepare_edit(len(prompts), height, width, s.steps, init_images, strength, mask)
        if edit is not None and self.autoencoder.encoder is None:
            raise ValueError("image-to-image needs the DINOv3 encoder: load the pipeline with "
                             "SVGT2I.from_pretrained(..., with_encoder=True)")
        guidance = Guidance(s.cfg, s.renorm, s.cfg_trunc)
        feats, cap_mask = self.encode_text(prompts, s.system_prompt, s.negative, guidance.active)
        if offload:   # free accelerator memory for the DiT: Gemma's work is done
            self.text_encoder.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        feats, cap_mask = feats.to(self.device, self.dtype), cap_mask.to(self.device)
        n, C = len(prompts), self.dit.config.in_channels
        results = []
        for first in range(0, n, batch_size):
            idx = list(range(first, min(first + batch_size, n)))
            rows = idx + [n + i for i in idx] if guidance.active else idx
            noise = torch.cat([torch.randn([1, C, height // 16, width // 16],
                                           generator=torch.Generator().manual_seed(seeds[k]))
                               for k in idx])                          # [b, C, H/16, W/16]
            velocity = guided_velocity(self.dit, feats[rows], cap_mask[rows], guidance,
                                       dtype=self.dtype, split=split_cfg)
            cb = (lambda i, N: progress(idx, i, N)) if progress else None
            z, features = self._sample(velocity, noise.to(self.device), s, cb, edit, idx)
            results += [z.cpu()] if output == "latent" else tensor_to_images(
                self.autoencoder.decode(features))
        return torch.cat(results) if output == "latent" else results

    def _sample(self, velocity, noise, s, callback, edit, idx):
        """One batch: the final normalised latents z and the DINOv3 features to decode."""
        sampler = SAMPLERS[s.solver]
        if edit is None:
            z = sampler(velocity, noise, s.steps, s.shift, callback=callback)
            return z, self.stats.denormalize(z)
        pixels = images_to_tensor([edit.images[k] for k in idx], noise.device)
        f = self.autoencoder.encode(pixels)                               # [b, C, H/16, W/16]
        x1 = self.stats.normalize(f).to(noise.dtype)
        if edit.start == s.steps:   # no step left: the features as encoded (no stats round trip)
            return x1, f
        t0 = sampler_times(s.solver, s.steps, s.shift)[edit.start].item()
        x = noise if edit.start == 0 else interpolate(noise, x1, t0)
        impose = None
        if edit.redraw is not None:     # the kept tokens: the init latent, noised to each new t
            redraw = torch.stack([edit.redraw[k] for k in idx])[:, None].to(noise.device)
            impose = lambda x, t: torch.where(redraw, x, interpolate(noise, x1, t))  # noqa: E731
        z = sampler(velocity, x, s.steps, s.shift, callback=callback, start=edit.start,
                    impose=impose)
        return z, self.stats.denormalize(z)


# -------------------------------------------------------------------------------------------------
# Latent statistics: the DiT sees per-channel normalised DINOv3 features


class LatentStats:
    """Per-channel mean and std of the DINOv3 features, [C] each.
    normalize: (f - mean) / (std + 1e-8); denormalize: z * std + mean (no epsilon), as the official
    code. (Official training casts the stats to bf16 first; we keep fp32 on both sides so the two
    are inverses.)"""

    def __init__(self, mean, std):
        self.mean, self.std = mean.float().flatten(), std.float().flatten()

    @property
    def channels(self):
        return self.mean.numel()

    def _view(self, x):
        if x.shape[1] != self.channels:
            raise ValueError(f"latent has {x.shape[1]} channels but the statistics have "
                             f"{self.channels}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.mean.to(x.device).view(shape), self.std.to(x.device).view(shape)

    def normalize(self, features):
        mean, std = self._view(features)
        return ((features.float() - mean) / (std + 1e-8)).to(features.dtype)

    def denormalize(self, latents):
        mean, std = self._view(latents)
        return (latents.float() * std + mean).to(latents.dtype)


def load_latent_stats(path, channels=384, layer=-1):
    """Read the official stats file: {'mean': [L, 384], 'std': [L, 384]}
    (one row per ViT layer; row -1, the final-normed patch tokens, is the one used). For
    autoencoder-R's 392 channels the 8 residual channels get the scalar averages of the row, as the
    official code does."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"latent statistics file not found: {path} "
                                "(expected dinov3_s16p_layer_patchtoken_stats_dist.pt)")
    d = _read_torch(path)
    if not isinstance(d, dict) or not all(torch.is_tensor(d.get(k)) for k in ("mean", "std")):
        raise ValueError(f"{path}: not a latent statistics file (expected a dict with 'mean' and "
                         "'std')")
    mean, std = d["mean"].float(), d["std"].float()
    if mean.dim() == 1:
        mean, std = mean[None], std[None]
    mean, std = mean[layer], std[layer]
    if channels < mean.numel():
        raise ValueError(f"{path}: statistics have {mean.numel()} channels, cannot serve "
                         f"{channels}")
    extra = channels - mean.numel()
    if extra:
        mean = torch.cat([mean, mean.mean().expand(extra)])
        std = torch.cat([std, std.mean().expand(extra)])
    return LatentStats(mean, std)


class StatsAccumulator:
    """Per-channel mean and std of features [B, C, h, w] over all tokens seen
    (float64 running sums)."""

    def __init__(self):
        self.n, self.sum, self.sumsq = 0, None, None

    def update(self, features):
        f = features.detach().double().transpose(0, 1).flatten(1)      # [C, B*h*w]
        if self.sum is None:
            self.sum = torch.zeros(f.shape[0], dtype=torch.float64)
            self.sumsq = torch.zeros(f.shape[0], dtype=torch.float64)
        self.n += f.shape[1]
        self.sum += f.sum(1).cpu()
        self.sumsq += (f * f).sum(1).cpu()

    def state(self):
        """The official file format: {'mean': [1, C], 'std': [1, C]} float32
        (one row: the final layer)."""
        mean = self.sum / self.n
        var = (self.sumsq / self.n - mean ** 2).clamp_min(0) * self.n / max(self.n - 1, 1)
        return {"mean": mean.float()[None], "std": var.sqrt().float()[None]}


# -------------------------------------------------------------------------------------------------
# The autoencoder: frozen DINOv3 encoder (+ residual ViT for R) and the pixel decoder


def match_distribution(h, h_res):
    """Autoencoder-R: rescale the residual channels [B, 8, N] to the DINO features' scalar
    statistics (per-channel mean / unbiased std over batch and tokens, averaged over
    channels; detached)."""
    def stats(x):
        return x.mean(dim=(0, 2)).mean().detach(), x.std(dim=(0, 2)).mean().detach()
    mu_h, sd_h = stats(h)
    mu_r, sd_r = stats(h_res)
    return (h_res - mu_r) / (sd_r + 1e-6) * sd_h + mu_h


def with_residual(h, h_res):
    """Autoencoder-R's latent tokens: DINO [B, 384, N] and the matched residual [B, 8, N] ->
    [B, 392, N]."""
    return torch.cat([h, match_distribution(h, h_res)], dim=1)


def check_image_size(height, width):
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} (HxW) is not a multiple of 16: use sizes "
                         "divisible by 16, e.g. "
                         f"{max(16, round(height / 16) * 16)}x{max(16, round(width / 16) * 16)}")


class Autoencoder(nn.Module):
    """SVG autoencoder: images in [-1, 1] <-> DINOv3 feature latents
    [B, 384 (+8 for R), H/16, W/16]. `encoder` (DINOv3) is only needed for encode(); sampling needs
    the decoder alone."""

    def __init__(self, decoder, encoder=None, residual=None):
        super().__init__()
        self.decoder, self.encoder, self.residual = decoder, encoder, residual
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    @property
    def latent_channels(self):
        return self.decoder.config.z_channels

    @torch.no_grad()
    def encode(self, images):
        if self.encoder is None:
            raise ValueError("this autoencoder was loaded without its DINOv3 encoder: pass "
                             "dinov3_path=... (the dinov3_vits16plus_pretrain_lvd1689m-*.pth "
                             "file) to load_autoencoder")
        B, _, H, W = images.shape
        check_image_size(H, W)
        dtype = next(self.encoder.parameters()).dtype
        x = self.pixels(images)
        h = self.encoder(x.to(dtype)).transpose(1, 2)                       # [B, 384, N]
        if self.residual is not None:
            h = with_residual(h, self.residual(x.to(dtype)))                # [B, 392, N]
        return h.reshape(B, -1, H // 16, W // 16)                               # row-major tokens

    def pixels(self, images):
        """What the encoders see: [-1, 1] images ImageNet-normalised (fp32)."""
        return ((images.float() + 1) / 2 - self.pixel_mean) / self.pixel_std

    def decode(self, latents):
        dtype = next(self.decoder.parameters()).dtype
        return self.decoder(latents.to(dtype))

    @torch.no_grad()
    def reconstruct(self, image):
        """What the autoencoder keeps: encode a PIL image (cropped to a multiple of 16)
        and decode it."""
        w, h = image.size
        if w < 16 or h < 16:
            raise ValueError(f"image of {w}x{h} px is too small: the encoder needs at least 16x16")
        image = image.convert("RGB").crop((0, 0, w - w % 16, h - h % 16))
        x = images_to_tensor([image], self.pixel_mean.device)
        return tensor_to_images(self.decode(self.encode(x)))[0]


def images_to_tensor(images, device="cpu"):
    """PIL images (same size) -> [B, 3, H, W] in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).to(device) / 127.5 - 1


def tensor_to_images(x):
    """[B, 3, H, W] in [-1, 1] -> PIL images, rounded to uint8 (not truncated)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


# -------------------------------------------------------------------------------------------------
# Images: every image file is read as training reads it (to_rgb); the init images and masks of
# an image-to-image run

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm")


def to_rgb(image):
    """8-bit RGB. Transparency is composited on white (upstream does this for RGBA and converts
    P/L). One-channel images of more than 8 bits are scaled from the range their data is in (PIL's
    own conversion clips them at 255, so a 16-bit scan turns white): 'I;16*' from 0..65535, 'I'
    from 0..65535 (0..255 if no value exceeds 255), 'F' from 0..1 (0..255 if a value exceeds 1).
    CMYK, YCbCr, 1-bit, grey and palette images go through PIL's conversion."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        a = np.asarray(image).astype(np.float64)
        top = a.max(initial=0)
        if image.mode == "F":
            scale = 1.0 if top <= 1 else 255.0
        else:
            scale = 255.0 if image.mode == "I" and top <= 255 else 65535.0
        grey = np.clip(np.round(a * (255.0 / scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def read_image(path, mode="RGB"):
    """An image file as a PIL image: 8-bit RGB by to_rgb (as training reads it), or another
    `mode` by PIL's conversion (masks: "L"); a missing or unreadable file is a one-line error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im) if mode == "RGB" else im.convert(mode)
    except (OSError, SyntaxError) as e:         # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not an image ({_first_line(e)})") from None


def read_images(folder):
    """The images of a folder (by suffix: IMAGE_SUFFIXES), sorted by name: [(path, RGB image)]."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                   if name.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise ValueError(f"{folder}: no images in it ({', '.join(IMAGE_SUFFIXES)})")
    return [(p, read_image(p)) for p in paths]


def pair_edits(prompts, images):
    """Prompts and init images, one each: one prompt edits every image, one image is edited by
    every prompt, or they pair in order."""
    if len(prompts) == 1:
        prompts = prompts * len(images)
    elif len(images) == 1:
        images = images * len(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} init images: give one "
                         "prompt, one image, or as many prompts as images")
    return prompts, images


def fit_image(image, height, width, resample=Image.Resampling.BICUBIC):
    """Scale `image` to cover width x height, aspect kept, and crop the middle; an image of that
    size already is returned as it is."""
    w, h = image.size
    if (w, h) == (width, height):
        return image
    scale = max(width / w, height / h)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.resize(size, resample).crop((left, top, left + width, top + height))


def token_mask(mask, height, width):
    """The tokens an edit redraws, bool [H/16, W/16]: `mask` (PIL; white = redraw, black = keep)
    fitted as its image is (nearest pixel), and a 16x16 block is redrawn when any of its pixels
    is >= 128, so everything painted white is redrawn."""
    m = np.asarray(fit_image(mask.convert("L"), height, width, Image.Resampling.NEAREST)) >= 128
    return torch.from_numpy(m.reshape(height // 16, 16, width // 16, 16).any(axis=(1, 3)))


@dataclass
class Edit:
    """An image-to-image run: the grid point it starts at, and per image the init image fitted
    to the output size and its redrawn tokens (redraw None: all)."""
    start: int
    images: list
    redraw: list | None = None


def _one_per_prompt(items, n, what):
    items = [items] if isinstance(items, Image.Image) else list(items)
    if not items or not all(isinstance(i, Image.Image) for i in items):
        raise ValueError(f"{what} must be a PIL image or a list of them")
    if len(items) not in (1, n):
        raise ValueError(f"{len(items)} {what} for {n} prompts: give one, or one per prompt")
    return items * n if len(items) == 1 else items


def prepare_edit(n, height, width, steps, init_images=None, strength=1.0, mask=None):
    """The Edit of SVGT2I.generate's arguments for n prompts, or None for text-to-image. A mask
    must be the size of its init image."""
    if init_images is None:
        if mask is not None or strength != 1:
            raise ValueError("strength and mask are for image-to-image: pass init_images too")
        return None
    start = edit_start(steps, strength)
    images = _one_per_prompt(init_images, n, "init_images")
    redraw = None
    if mask is not None:
        masks = _one_per_prompt(mask, n, "masks")
        for im, m in zip(images, masks):
            if m.size != im.size:
                raise ValueError(f"the mask is {m.size[0]}x{m.size[1]} px but its init image "
                                 f"{im.size[0]}x{im.size[1]}: they must be the same size")
        redraw = [token_mask(m, height, width) for m in masks]
    return Edit(start, [fit_image(im.convert("RGB"), height, width) for im in images], redraw)


# -------------------------------------------------------------------------------------------------
# Text: Gemma-2 features of system prompt + prompt

SYSTEM_PROMPTS = {
    "base": "You are an assistant designed to generate high-quality images based on user prompts. "
            "<Prompt Start> ",
    "align": "You are an assistant designed to generate high-quality images with the highest "
             "degree of image-text alignment based on textual prompts. <Prompt Start> ",
    "aesthetics": "You are an assistant designed to generate high-quality images with highest "
                  "degree of aesthetics based on user prompts. <Prompt Start> ",
    "real": "You are an assistant designed to generate superior images with the superior degree "
            "of image-text alignment based on textual prompts or user prompts. <Prompt Start> ",
    "4grid": "You are an assistant designed to generate four high-quality images with highest "
             "degree of aesthetics arranged in 2x2 grids based on user prompts. <Prompt Start> ",
    "empty": "",
}


def system_prompt_text(name_or_text):
    """A system prompt by name (base, align, aesthetics, real, 4grid, empty) or a
    literal string."""
    return SYSTEM_PROMPTS.get(name_or_text, name_or_text)


class TextEncoder:
    """Gemma-2 as the caption encoder: right-padded ids (BOS first) -> hidden_states[-2]
    [B, L, 2304]."""

    def __init__(self, tokenizer, model, max_length=512):
        self.tokenizer, self.model, self.max_length = tokenizer, model, max_length

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, texts, max_length=None, chunk=32):
        """-> features [B, L, D] and mask [B, L] (bool), L the longest text rounded up to a
        multiple of 8. Gemma runs on `chunk` texts at a time, so a long prompt list never needs one
        huge forward."""
        ids, mask = self.tokenizer(list(texts), max_length=max_length or self.max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        feats = torch.cat([self.model.encode(ids[i:i + chunk], mask[i:i + chunk], layer=-2)
                           for i in range(0, len(ids), chunk)])
        return feats, mask.bool()


# The official prompt enhancer (the sampler's --system_type enhance: generate_enhanced_prompt in
# KlingTeam/SVG-T2I svg_t2i/sample_svg_t2i.py, l.24-118, and its call, l.382-395): the text
# encoder, as a causal LM, continues a fixed instruction; the new text is cleaned up, and the DiT
# is conditioned on the "align" system prompt + the result (svg_generate.py pairs it with "base").

# The instruction, verbatim: data the output depends on. enhance_instruction ends it with the
# user prompt and "Enhanced description:" (no space after it: the model writes one).
ENHANCE_INSTRUCTION = (
    "You are an assistant that rewrites image generation prompts.\n"
    "Given a user prompt, rewrite it into a more detailed and concrete visual description.\n"
    "You MUST strictly preserve:\n"
    "- the main subject(s) and their roles;\n"
    "- the number of each entity (do not change counts like 'one', 'two', 'three');\n"
    "- explicit attributes (e.g. colors, sizes, poses) that appear in the user prompt;\n"
    "- explicit spatial relationships (left/right, front/behind, on top of, in the background, "
    "etc.);\n"
    "- explicit style or format constraints (e.g. '3D render', 'line art', 'pixel art', "
    "'photograph').\n"
    "You may only add a few plausible visual details (textures, lighting, background context) "
    "that do NOT contradict any part of the original prompt.\n"
    "Avoid repeating the same subject or action multiple times; keep the description concise.\n"
    "Do not remove or alter any constraints given in the user prompt.\n"
    "Do NOT mention the words 'User Prompt' or 'Enhanced Prompt' in your answer.\n"
    "Output only the enhanced description as one or two sentences.\n\n")
ENHANCE_MAX_NEW_TOKENS = 196
ENHANCE_SYSTEM_PROMPT = "align"  # sample_svg_t2i.py's choice for --system_type enhance


def enhance_instruction(prompt):
    """The text the model continues: the instruction, the user prompt as is, the answer cue."""
    return ENHANCE_INSTRUCTION + "User prompt: " + prompt + "\nEnhanced description:"


def postprocess_enhanced(decoded, prompt):
    """The official clean-up of the decoded new text, in its order: strip; if there is a "\n",
    the first non-empty line; a label before a ':' in the first 40 characters that names
    "enhanced", "description" or "prompt" is dropped; comma clauses stripped, empty ones and
    repeats (ignoring case) dropped, at most 4 kept, joined by ", "; at most 256 characters, cut
    back to the last space; strip. An empty result falls back to `prompt`."""
    text = decoded.strip()
    if "\n" in text:   # then every line break str.splitlines knows separates lines
        text = next((line.strip() for line in text.splitlines() if line.strip()), text)
    if ":" in text[:40]:
        head, tail = text.split(":", 1)
        if any(w in head.lower() for w in ("enhanced", "description", "prompt")):
            text = tail.strip()
    kept, seen = [], set()
    for clause in (c.strip() for c in text.split(",")):
        if clause and clause.lower() not in seen and len(kept) < 4:
            kept.append(clause)
            seen.add(clause.lower())
    text = ", ".join(kept) if kept else text       # only commas and spaces: left as it was
    if len(text) > 256:
        text = text[:256]
        text = text.rsplit(" ", 1)[0] if " " in text else text
    return text.strip() or prompt


def enhance_prompt(tokenizer, model, text, max_new_tokens=ENHANCE_MAX_NEW_TOKENS):
    """Rewrite one prompt with Gemma-2 (a Gemma2Tokenizer and gemma2.Gemma2) as the official
    sampler does: BOS + the instruction, no chat template, no padding; greedy decoding with
    the model's attention (SVG-T2I's transformers 4.57 runs SDPA without the attention cap, our
    default) until <eos> (id 1: the official call's eos_token_id replaces the model's stop
    list) or max_new_tokens; the new tokens decoded without special tokens, then cleaned up."""
    device = model.embed_tokens.weight.device
    ids = torch.tensor([[tokenizer.BOS] + tokenizer.encode(enhance_instruction(text))],
                       device=device)
    new = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.EOS)
    return postprocess_enhanced(tokenizer.decode(new[0], skip_special_tokens=True), text)


def load_tokenizer(gemma_dir):
    tok_file = os.path.join(gemma_dir, "tokenizer.model")
    if not os.path.isfile(tok_file):
        raise FileNotFoundError(f"{tok_file} not found: the Gemma folder needs its sentencepiece "
                                "tokenizer.model")
    return Gemma2Tokenizer(tok_file)


# -------------------------------------------------------------------------------------------------
# Devices, and finding the weights


def pick_device(name="auto", index=0):
    """--device: auto (cuda:index when a GPU is visible, else cpu), cpu, cuda, cuda:N or mps.
    Anything else, or a device this machine lacks, is a one-line ValueError."""
    if name == "auto":
        return torch.device(f"cuda:{index}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") \
            from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            build = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
            raise ValueError(f"--device {name}: no CUDA GPU is visible here{build}: use --device "
                             "cpu")
        i = index if device.index is None else device.index
        if i >= n:
            raise ValueError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 to "
                             f"cuda:{n - 1}")
        return torch.device("cuda", i)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: Apple's MPS is not available here: use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: {device.type} devices are not supported: use auto, "
                         "cpu, cuda, cuda:N or mps")
    return device


# Where the release is looked for when no folder is named: the official layout beside the command.
RELEASE_DIRS, GEMMA_DIRS = ("pre-trained",), ("gemma-2-2b", "pre-trained/gemma-2-2b")


def default_folder(candidates):
    """The first of `candidates` (relative to the working directory) that is a folder, or None."""
    return next((c for c in candidates if os.path.isdir(c)), None)

DOWNLOAD_HINT = ("the official weights are published with the SVG-T2I release "
                 "(github.com/KlingTeam/SVG-T2I, 'pre-trained/' folder) and Gemma-2-2B at "
                 "huggingface.co/google/gemma-2-2b")


def _first(folder, patterns, unique=False):
    """The first pattern that matches wins; among its matches the last in sorted order
    (the highest stage), or, with unique=True, an error if there are several."""
    for pat in patterns:
        hits = sorted(glob.glob(os.path.join(folder, pat)))
        if len(hits) > 1 and unique:
            raise ValueError(f"{folder}: several files match {pat} ({', '.join(hits)}): choose "
                             "one with --dit")
        if hits:
            return hits[-1]
    return None


def checkpoint_folder(path):
    """A training run's folder (OUT/, holding `latest`) stands for its newest checkpoint; any other
    folder for itself."""
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            return os.path.join(path, f.read().strip())
    return path


def recorded_frozen(folder):
    """The frozen parts a checkpoint of ours was trained with, as its run.json records them
    ({"autoencoder": path, ...}; a relative path is relative to the checkpoint, so a run that is
    moved whole still finds what lies inside it); {} without a run.json."""
    f = os.path.join(folder, "run.json")
    if not os.path.isfile(f):
        return {}
    try:
        with open(f) as fh:
            frozen = json.load(fh).get("frozen", {})
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{f}: not a valid run.json ({type(e).__name__}: {e})") from None
    return {k: os.path.normpath(os.path.join(folder, v)) for k, v in frozen.items()
            if isinstance(v, str) and v}


def recorded_but_gone(folder, key, path):
    """The error for a frozen part that run.json records but that no longer exists."""
    return FileNotFoundError(f"{os.path.join(folder, 'run.json')} records the {key} at {path}, "
                             f"which does not exist (was the run moved?): pass --{key}")


def find_weights(ckpt_dir, gemma_dir=None, dit=None, autoencoder=None, dinov3=None, stats=None,
                 need=("dit", "autoencoder", "stats", "gemma")):
    """Locate the files of a checkpoint folder: the official `pre-trained/` layout, or one of our
    own (training checkpoints and the bundled toy model). Explicit arguments override what is
    found. Our own folders may carry `run.json` naming the frozen parts they were trained with.
    Raises a clear error for each file in `need` that is missing."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir} ({DOWNLOAD_HINT})")
    ckpt_dir = checkpoint_folder(ckpt_dir)
    run = recorded_frozen(ckpt_dir)
    # the EMA weights first, as the official sampler's --ema intends
    dits = ["ema.safetensors", "model.safetensors", "consolidated_ema.00-of-01.pth",
            "consolidated.00-of-01.pth", "dit-*/consolidated_ema.00-of-01.pth",
            "dit-*/consolidated.00-of-01.pth"]
    autoencoders = ["autoencoder.safetensors", "autoencoder/svg_autoencoder-P-*.ckpt",
                    "autoencoder/svg_autoencoder*.ckpt", "autoencoder/*.ckpt"]
    dinov3s = ["dinov3.safetensors", "dinov3_vits16plus_pretrain_lvd1689m-*.pth"]
    stats_files = ["latent_stats.pt", "dinov3_s16p_layer_patchtoken_stats_dist.pt"]
    found = {
        "dit": dit or _first(ckpt_dir, dits, unique=True),
        "autoencoder": autoencoder or _first(ckpt_dir, autoencoders) or run.get("autoencoder"),
        "dinov3": dinov3 or _first(ckpt_dir, dinov3s) or run.get("dinov3"),
        "stats": stats or _first(ckpt_dir, stats_files) or run.get("stats"),
        "gemma": gemma_dir or _first(ckpt_dir, ["text_encoder", "gemma-2-2b"]) or run.get("gemma"),
    }
    expected = {
        "dit": "dit-*/consolidated.00-of-01.pth (or ema.safetensors / model.safetensors of a "
               "training run)",
        "autoencoder": "autoencoder/svg_autoencoder-P-stage3.ckpt",
        "dinov3": "dinov3_vits16plus_pretrain_lvd1689m-*.pth (or encoder.* keys in the "
                  "autoencoder checkpoint)",
        "stats": "dinov3_s16p_layer_patchtoken_stats_dist.pt",
        "gemma": "a Gemma-2-2B folder (config.json, model*.safetensors, tokenizer.model), passed "
                 "as --gemma",
    }
    for key, path in found.items():
        gone = path is not None and not os.path.exists(path)
        # a gone record of a part this command does not need (e.g. DINOv3 when the autoencoder
        # holds encoder.*) is as if absent
        if gone and key not in need and path == run.get(key):
            found[key] = None
            continue
        if path is None and key in need:
            raise FileNotFoundError(f"{ckpt_dir}: no {key} weights found; expected "
                                    f"{expected[key]} ({DOWNLOAD_HINT})")
        if gone and key in need:
            if path == run.get(key):
                raise recorded_but_gone(ckpt_dir, key, path)
            raise FileNotFoundError(f"{key} weights not found: {path} ({DOWNLOAD_HINT})")
    return found


# -------------------------------------------------------------------------------------------------
# Loading: one reader for every file, one strict build for every model. Each loader is read -> key
# map (in the model's own file) -> build; the model is made on the meta device and each tensor is
# cast straight into its target dtype, so loading never holds two copies of the weights.


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _read_torch(path):
    """torch.load, memory-mapped and weights_only; a legacy (non-zip) file is read whole."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        error = e
    if "_use_new_zipfile_serialization" in str(error):  # not a zip: legacy torch.save, or not torch
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            error = e
    refused = [line.strip() for line in str(error).splitlines() if "Unsupported global" in line]
    if refused:   # a checkpoint that pickles Python objects next to its tensors: never run those
        raise ValueError(f"{path} holds Python objects besides tensors "
                         f"({refused[0].split('. ')[0]}); if you trust the file, re-save only its "
                         "weights: torch.save(torch.load(path, weights_only=False)['state_dict'], "
                         "'weights.pth')") from None
    zip_error = str(error).split(". ")[0] if "PytorchStreamReader" in str(error) else ""
    detail = f" ({zip_error})" if zip_error else ""
    raise ValueError(f"{path}: cannot read checkpoint: not a torch checkpoint, or corrupt or "
                     f"truncated{detail}") from None


def _read_safetensors(path):
    from safetensors.torch import load_file
    try:
        return load_file(path)          # memory-mapped: tensors stay in the page cache until cast
    except Exception as e:
        raise ValueError(f"{path}: cannot read checkpoint: not a safetensors file, or corrupt or "
                         f"truncated ({_first_line(e)})") from None


def _read_hf_folder(folder):
    """A Hugging Face folder: model.safetensors, or the shards its
    model.safetensors.index.json lists."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.isfile(index):
        single = os.path.join(folder, "model.safetensors")
        if not os.path.isfile(single):
            raise FileNotFoundError(f"{folder}: no model.safetensors.index.json or "
                                    "model.safetensors (expected a Hugging Face checkpoint "
                                    "folder)")
        return _read_safetensors(single)
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__}: "
                         f"{e})") from None
    absent = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if absent:
        raise FileNotFoundError(f"{folder}: shards listed in model.safetensors.index.json are "
                                f"missing: {absent}")
    sd = {}
    for shard in shards:
        part = _read_safetensors(os.path.join(folder, shard))
        listed = sorted(k for k, s in weight_map.items() if s == shard and k not in part)
        if listed:
            raise ValueError(f"{os.path.join(folder, shard)}: keys listed for it in "
                             f"model.safetensors.index.json are absent: {listed[:8]} "
                             f"({len(listed)})")
        sd.update(part)
    return sd


def read_state_dict(path):
    """The one file reader: {name: tensor} of a checkpoint, without copying it. A .safetensors
    file, a torch file (.pth, .pt, .ckpt: memory-mapped, weights_only) or a Hugging Face folder
    (model.safetensors or its sharded index). The trainers' {"model": ...} / {"ema": ...} ("model"
    first: what the official sampler's --direct_ckpt path loads) and Lightning's
    {"state_dict": ...} are unwrapped. Every failure is one line naming the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_hf_folder(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = _read_safetensors(path) if path.endswith(".safetensors") else _read_torch(path)
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in ("model", "ema", "state_dict")
                      if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{path}: {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor: "
                         "not a weights file (a state dict of tensors)")
    return obj


def _listing(names, n=8):
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def build(model_class, config, sd, source, prefix="", device="cpu", dtype=torch.float32,
          keep_fp32=(), missing=()):
    """The one strict load: `model_class(config)` on the meta device, `sd` (our names) checked
    against it (one line lists every missing, unexpected and mis-shaped key under the file's names,
    `prefix` added; `missing` adds keys a key map could not find), then each tensor is cast to
    `dtype` (None: as stored; names in keep_fp32 stay fp32) on `device` and assigned. Returns the
    model in eval mode."""
    with torch.device("meta"):
        model = model_class(config)
    expected = model.state_dict()
    missing = [prefix + k for k in missing] + [prefix + k for k in expected if k not in sd]
    unexpected = [prefix + k for k in sd if k not in expected]
    misshaped = [f"{prefix}{k} {list(v.shape)} vs {list(expected[k].shape)}" for k, v in sd.items()
                 if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or misshaped:
        problems = (("missing", missing), ("unexpected", unexpected),
                    ("wrong shape (file vs model)", misshaped))
        listed = "; ".join(f"{what}: {_listing(names)}" for what, names in problems if names)
        raise ValueError(f"{source}: {model_class.__name__} weights do not match: {listed}")

    def cast(k, v):
        if not v.is_floating_point() or dtype is None:
            return v.to(device)
        return v.to(device=device, dtype=torch.float32 if k in keep_fp32 else dtype)
    model.load_state_dict({k: cast(k, v) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def sub_state_dict(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def dinov3_from_state_dict(sd, device="cpu", dtype=torch.float32, hf_config=None,
                           source="state dict", prefix=""):
    config, sd, missing = dinov3_keymap(sd, hf_config, source)
    model = build(DINOv3, config, sd, source, prefix, device, dtype,
                  keep_fp32=("rope_embed.periods",), missing=missing)
    return model.requires_grad_(False)


def load_dinov3(path, device="cpu", dtype=torch.float32):
    """Load DINOv3 from any official layout: the original `.pth`; an HF `model.safetensors` file
    (a config.json of model_type dinov3_vit next to it is used) or a folder holding both; or an SVG
    autoencoder Lightning `.ckpt` (its `encoder.*` keys). Frozen: eval mode, requires_grad off;
    RoPE periods stay fp32."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DINOv3 checkpoint not found: {path}")
    hf_config = None
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path} is a folder without model.safetensors: pass the "
                                    "DINOv3 .pth file, or a Hugging Face DINOv3 folder "
                                    "(config.json + model.safetensors)")
        if (path / "config.json").is_file():
            hf_config = _read_json(path / "config.json")
            if not isinstance(hf_config, dict):
                raise ValueError(f"{path / 'config.json'} is not a Hugging Face config (a JSON "
                                 "object)")
        path = path / "model.safetensors"
    elif path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
        # next to a file passed directly, a config.json is used only if it describes a DINOv3 ViT
        cfg = _read_json(path.parent / "config.json")
        is_dinov3 = isinstance(cfg, dict) and cfg.get("model_type") == "dinov3_vit"
        hf_config = cfg if is_dinov3 else None
    sd = read_state_dict(path)
    own_keys = any(k.startswith(("cls_token", "blocks.", "embeddings.")) for k in sd)
    if any(k.startswith("encoder.") for k in sd) and not own_keys:
        return dinov3_from_state_dict(sub_state_dict(sd, "encoder."), device, dtype,
                                      source=f"{path} (encoder.*)", prefix="encoder.")
    if any(k.startswith(("decoder.", "loss.")) for k in sd):
        raise ValueError(f"{path} is a Lightning checkpoint without `encoder.*` keys, so it holds "
                         "no DINOv3 weights: pass the DINOv3 .pth or an SVG autoencoder "
                         "checkpoint")
    return dinov3_from_state_dict(sd, device, dtype, hf_config, source=str(path))


def load_gemma2(folder, device="cpu", dtype=torch.bfloat16, attn_softcap=False):
    """Load a Hugging Face Gemma-2 folder (config.json + sharded or single safetensors) as a frozen
    Gemma2. attn_softcap: see Gemma2Config.attn_softcap (default off, matching the features the
    SVG-T2I DiT was trained on)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Gemma-2 folder not found: {folder} (expected config.json + "
                                "model*.safetensors)")
    config = Gemma2Config.from_json(folder, attn_softcap=attn_softcap)
    sd = gemma2_keymap(read_state_dict(folder))
    return build(Gemma2, config, sd, folder, "model.", device, dtype).requires_grad_(False)


# In a checkpoint folder the official trainer writes both: the EMA weights are preferred (what the
# official sampler's --ema asks for, though its code then loads the other file).
NEXTDIT_FILES = ("consolidated_ema.00-of-01.pth", "consolidated.00-of-01.pth")


def nextdit_from_state_dict(sd, device="cpu", dtype=torch.bfloat16, source="NextDiT checkpoint"):
    sd = nextdit_keymap(sd)
    return build(NextDiT, NextDiTConfig.from_state_dict(sd), sd, source, device=device,
                 dtype=dtype)


def load_nextdit(path, device="cpu", dtype=torch.bfloat16):
    """Load a NextDiT from a checkpoint file or folder: the official
    consolidated(_ema).00-of-01.pth (a flat state dict, or wrapped under "model"/"ema";
    FSDP/checkpoint/DDP/compile key prefixes allowed) or one of our .safetensors. Weights in
    `dtype` (None: as stored); eval mode."""
    path = Path(path)
    if path.is_dir():
        names = [n for n in NEXTDIT_FILES if (path / n).is_file()]
        names = names or sorted(p.name for p in path.glob("*.safetensors"))
        if not names or (len(names) > 1 and names[0] not in NEXTDIT_FILES):
            raise FileNotFoundError(f"no NextDiT checkpoint in {path}: expected "
                                    f"{' or '.join(NEXTDIT_FILES)} or exactly one *.safetensors "
                                    f"file (found {sorted(os.listdir(path))[:10]})")
        path = path / names[0]
    elif not path.is_file():
        raise FileNotFoundError(f"NextDiT checkpoint {path} does not exist")
    return nextdit_from_state_dict(read_state_dict(path), device, dtype, source=str(path))


def decoder_from_state_dict(sd, device="cpu", dtype=torch.float32, source="state dict"):
    """The pixel decoder from an autoencoder state dict (`decoder.*`) or a bare decoder state dict;
    P or R and all sizes come from the shapes."""
    sd = decoder_keymap(sd)       # errors name the keys as the official checkpoint does: decoder.*
    return build(Decoder, DecoderConfig.from_state_dict(sd), sd, source, "decoder.", device, dtype)


def residual_vit_from_state_dict(sd, device="cpu", dtype=torch.float32, source="state dict"):
    """Autoencoder-R's residual ViT from `extra_vit.*` (or a bare state dict). Its learned RoPE
    `freqs` stay fp32 whatever `dtype` is: angles reach ~60 rad, which bf16 cannot hold to better
    than a quarter turn."""
    sd = residual_vit_keymap(sd)  # errors name the keys as the official checkpoint: extra_vit.*
    return build(ResidualViT, ResidualViTConfig.from_state_dict(sd), sd, source, "extra_vit.",
                 device, dtype, keep_fp32=("freqs",))


def load_decoder(path, device="cpu", dtype=torch.float32):
    """The pixel decoder alone, from an autoencoder checkpoint or a decoder state dict file."""
    return decoder_from_state_dict(read_state_dict(path), device, dtype, source=os.fspath(path))


def load_autoencoder(path, dinov3_path=None, device="cpu", dtype=torch.float32, encoder=True):
    """Build the SVG autoencoder from the official Lightning checkpoint
    (or a safetensors file with the same keys). `decoder.*` -> Decoder
    (P or R inferred from conv_in), `extra_vit.*` -> residual ViT (R), `encoder.*` -> DINOv3 when
    present, else from `dinov3_path`. Ignored on purpose: `loss.*`
    (LPIPS and the discriminator, training only), `norm_vit.*` (built upstream but never used) and
    `extra_vit.head.*` (an unused 1000-way classifier head left over from the ViT). encoder=False
    skips DINOv3 (sampling only)."""
    path = os.fspath(path)
    sd = read_state_dict(path)
    if not any(k.startswith("decoder.") for k in sd):
        raise ValueError(f"{path}: no 'decoder.*' keys: not an SVG autoencoder checkpoint "
                         "(expected autoencoder/svg_autoencoder-P-stage3.ckpt or similar)")
    decoder = decoder_from_state_dict(sub_state_dict(sd, "decoder."), device, dtype, source=path)
    residual = None
    if any(k.startswith("extra_vit.") for k in sd):
        residual = residual_vit_from_state_dict(sub_state_dict(sd, "extra_vit."), device, dtype,
                                                source=path)
    if decoder.config.z_channels > 384 and residual is None:
        raise ValueError(f"{path}: the decoder takes {decoder.config.z_channels} channels but the "
                         "checkpoint has no residual ViT ('extra_vit.*' keys)")
    dino = None
    if encoder and any(k.startswith("encoder.") for k in sd):
        dino = dinov3_from_state_dict(sub_state_dict(sd, "encoder."), device, dtype, source=path,
                                      prefix="encoder.")
    elif encoder and dinov3_path is not None:
        dino = load_dinov3(dinov3_path, device=device, dtype=dtype)
    return Autoencoder(decoder, dino, residual).eval()


# -------------------------------------------------------------------------------------------------
# Writing: one atomic writer, for files and folders

_UMASK = os.umask(0)      # the only way to read the umask is to set it: put it straight back
os.umask(_UMASK)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_write(path, write):
    """Write `path`, a file or a folder, so that it is whole or absent even if the process dies
    midway: write(tmp) writes it under a temporary name in the same folder (same suffix), which is
    fsynced and then renamed over `path`. Files get the umask's mode (safetensors writes 0600).
    Returns `path`."""
    path = Path(path)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
    _remove(tmp)
    try:
        write(tmp)
        for f in ([*tmp.iterdir(), tmp] if tmp.is_dir() else [tmp]):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_UMASK)
            _fsync(f)
        if path.is_dir():       # a folder cannot be renamed over another: move the old one away
            old = path.with_name(f".old{os.getpid()}-{path.name}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        _remove(tmp)
    return path
