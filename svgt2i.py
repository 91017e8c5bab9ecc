"""
SVG-T2I: the method on one screen (flow matching, the Euler and DPM-Solver++ samplers, guidance),
then the parts it connects: latent statistics, the autoencoder, text encoding, and the SVGT2I
pipeline (text-to-image, editing, prompt enhancement). The four models live in their own files
(dinov3.py, gemma2.py, nextdit.py, decoder.py); reading files and checking input is the plumbing's.

Conventions, written once here and used everywhere:
- Code time t in [0, 1]: t = 0 is pure noise, t = 1 is data (the official code's convention; the
  paper's Eq. 1 labels the ends the other way round).
- x_t = t * data + (1 - t) * noise, and the network predicts the velocity dx_t/dt = data - noise.
- time_shift(t, s) = t / (t + s - s * t) moves time towards the noise end for s > 1.
- Latents are [B, C, h, w] with h = H/16, w = W/16 (height first), tokens row-major; images are
  [B, 3, H, W] in [-1, 1] between modules, uint8 only at the file boundary.
"""

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dinov3 import IMAGENET_MEAN, IMAGENET_STD
from plumbing.checks import check_generate, check_image_size


# -------------------------------------------------------------------------------------------------
# The method, training half: flow matching on the straight path from noise to data


def time_shift(t, shift):
    """Warp time towards the noise end: with shift s > 1 more of [0, 1] is spent at high noise."""
    return t / (t + shift - shift * t)


def interpolate(noise, data, t):
    """The straight path x_t = t * data + (1 - t) * noise; t is [B], a float or a 0-d tensor."""
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
    """Training times: logit-normal(0, 1), shifted towards noise by training_shift(seq_len)."""
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


class Autoencoder(nn.Module):
    """SVG autoencoder: images in [-1, 1] <-> DINOv3 feature latents [B, 384 (+8 for R), h, w].
    `encoder` (DINOv3) is only needed for encode(); sampling needs the decoder alone."""

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
        """What the autoencoder keeps: a PIL image (cut to a multiple of 16) encoded and decoded."""
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
    """A system prompt by name (a key of SYSTEM_PROMPTS) or a literal string."""
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


# -------------------------------------------------------------------------------------------------
# Editing: the init images and masks of an image-to-image run


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
    """The tokens an edit redraws, bool [H/16, W/16]: `mask` (white = redraw) fitted as its image
    is; a 16x16 block is redrawn when any of its pixels is >= 128."""
    m = np.asarray(fit_image(mask.convert("L"), height, width, Image.Resampling.NEAREST)) >= 128
    return torch.from_numpy(m.reshape(height // 16, 16, width // 16, 16).any(axis=(1, 3)))


@dataclass
class Edit:
    """An image-to-image run: the grid point it starts at, per image the init image fitted to the
    output size and its redrawn tokens (redraw None: all)."""
    start: int
    images: list
    redraw: list | None = None


def prepare_edit(images, masks, height, width, steps, strength):
    """The Edit of one init image (and mask) per prompt, or None for text-to-image."""
    if images is None:
        return None
    redraw = None if masks is None else [token_mask(m, height, width) for m in masks]
    return Edit(edit_start(steps, strength),
                [fit_image(im.convert("RGB"), height, width) for im in images], redraw)


# -------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class Sampling:
    """How an image is sampled; the defaults are the official evaluation settings. sample.py's
    flags, and a checkpoint's own run.json "sample" entry (the toy model has one), override them."""
    steps: int = 50                 # model evaluations
    cfg: float = 4.0                # guidance scale, 1 = off
    shift: float = 10.0             # time shift of the sampling grid
    solver: str = "euler"           # a key of SAMPLERS
    system_prompt: str = "base"     # a key of SYSTEM_PROMPTS, or a literal
    negative: str = ""              # negative prompt ("" = unconditional, without system prompt)
    renorm: float = 1.0             # Guidance.renorm
    cfg_trunc: float = 100.0        # Guidance.trunc


class SVGT2I:
    """Text-to-image: Gemma-2 caption features -> NextDiT flow in normalised DINOv3 latent
    space -> decoder."""

    def __init__(self, dit, autoencoder, stats, text_encoder, device="cpu", dtype=torch.bfloat16,
                 files=None):
        self.dit, self.autoencoder, self.stats = dit, autoencoder, stats
        self.text_encoder = text_encoder
        self.device, self.dtype = torch.device(device), dtype
        self.files = files or {}        # the weight files it was loaded from (from_pretrained)

    @classmethod
    def from_pretrained(cls, ckpt_dir, gemma_dir=None, device="cpu", dtype=torch.bfloat16,
                        with_encoder=False, lora=(), **overrides):
        """Load the whole pipeline: the release's `pre-trained/` folder (or a checkpoint of ours)
        and a Gemma-2 folder. The DiT and Gemma go to `dtype`; the decoder (and DINOv3, with
        with_encoder) stay fp32, which costs little (43M + 29M parameters) and keeps decoding
        exact. `lora`: (file, scale) pairs of train.py --lora, merged into the DiT's weights.
        `overrides`: dit=, autoencoder=, dinov3=, stats= paths that replace what is found."""
        from plumbing.loading import load_pipeline     # (it imports this file: imported here)
        *parts, files = load_pipeline(ckpt_dir, gemma_dir, device, dtype, with_encoder, lora,
                                      **overrides)
        return cls(*parts, device=device, dtype=dtype, files=files)

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
        Gemma-2, greedily continuing a fixed instruction (plumbing.enhancer; max_new_tokens None:
        the official 196). Condition on the result with the "align" system prompt."""
        from plumbing.enhancer import enhance_prompt
        tok, model = self.text_encoder.tokenizer, self.text_encoder.model
        if isinstance(text, str):
            return enhance_prompt(tok, model, text, max_new_tokens)
        return [enhance_prompt(tok, model, t, max_new_tokens) for t in text]

    @torch.no_grad()
    def generate(self, prompts, height=1024, width=1024, seed=0, sampling=None, batch_size=1,
                 offload=False, progress=None, init_images=None, strength=1.0, mask=None,
                 output="pil", split_cfg=False, **overrides):
        """One image per prompt. `sampling` (a Sampling) and `overrides` (its field names, e.g.
        steps=25) set the sampler. Image k starts from randn(1, C, H/16, W/16) drawn on the CPU
        with seed + k (or seed[k]), so a seed gives the same image on any device. split_cfg: cond
        and uncond as two forwards. output="latent": the final normalised latents [n, C, h, w].
        Editing: `init_images` (one, or one per prompt) are fitted to the size and encoded;
        sampling starts at grid point edit_start(steps, strength) from them noised with the seed's
        noise (strength 1: text-to-image, 0: reconstruction). `mask` (white = redraw) keeps the
        other tokens on the init latent, noised to each step's new time (sample_batch)."""
        s = replace(sampling or Sampling(), **overrides)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [seed + k for k in range(len(prompts))] if isinstance(seed, int) else list(seed)
        images, masks = check_generate(self, prompts, seeds, height, width, s, SAMPLERS, output,
                                       init_images, strength, mask)    # one per prompt, or None
        edit = prepare_edit(images, masks, height, width, s.steps, strength)
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
            callback = (lambda i, N: progress(idx, i, N)) if progress else None
            z, features = self.sample_batch(velocity, noise.to(self.device), s, callback, edit, idx)
            results += [z.cpu()] if output == "latent" else tensor_to_images(
                self.autoencoder.decode(features))
        return torch.cat(results) if output == "latent" else results

    def sample_batch(self, velocity, noise, s, callback, edit, idx):
        """One batch (images idx): the final normalised latents z and the features to decode."""
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
