"""
SVG-T2I, the glue: the autoencoder, latent normalisation, flow matching, samplers, guidance and the
text-to-image pipeline. The four models live in their own files (dinov3.py, gemma2.py, nextdit.py,
decoder.py); this file connects them.

Conventions, written once here and used everywhere:
- Code time t in [0, 1]: t = 0 is pure noise, t = 1 is data (the official code's convention; the paper's
  Eq. 1 labels the ends the other way round).
- x_t = t * data + (1 - t) * noise, and the network predicts the velocity dx_t/dt = data - noise.
- time_shift(t, s) = t / (t + s - s * t) moves time towards the noise end for s > 1.
- Latents are [B, C, h, w] with h = H/16, w = W/16 (height first); images are [B, 3, H, W] in [-1, 1].
"""

import glob
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from decoder import Decoder, DecoderConfig, decoder_from_state_dict, residual_vit_from_state_dict
from dinov3 import IMAGENET_MEAN, IMAGENET_STD, DINOv3, DINOv3Config, dinov3_from_state_dict, load_dinov3
from gemma2 import Gemma2, Gemma2Config, Gemma2Tokenizer, load_gemma2
from nextdit import load_nextdit

# -----------------------------------------------------------------------------------------------------------
# Flow matching

def time_shift(t, shift):
    """Warp time towards the noise end: with shift s > 1 more of [0, 1] is spent at high noise."""
    return t / (t + shift - shift * t)


def interpolate(noise, data, t):
    """The straight path x_t = t * data + (1 - t) * noise; t is [B] (or a float)."""
    if torch.is_tensor(t) and t.dim() > 0:
        t = t.view(-1, *([1] * (data.dim() - 1)))
    return t * data + (1 - t) * noise


def velocity_target(noise, data):
    """What the network regresses onto: dx_t/dt along the straight path."""
    return data - noise


def training_shift(seq_len):
    """Resolution-dependent time shift used in training: exp(mu), mu linear in the image token count,
    through (256 tokens, 0.5) and (4096 tokens, 1.15). 256px -> 1.649, 512px -> 1.878, 1024px -> 3.158."""
    mu = 0.5 + (seq_len - 256) * (1.15 - 0.5) / (4096 - 256)
    return math.exp(mu)


def sample_training_t(n, seq_len, generator=None, device="cpu"):
    """Training times: logit-normal(0, 1), then shifted towards noise by training_shift(seq_len)."""
    t = torch.sigmoid(torch.randn(n, generator=generator)).to(device)
    return time_shift(t, training_shift(seq_len))


# -----------------------------------------------------------------------------------------------------------
# Samplers. `velocity(x, t)` is any function returning dx/dt at the float time t (code time, 0 = noise).

def euler_times(steps, shift):
    """The Euler grid t_i = time_shift(i / steps), i = 0..steps. (The official ODE path builds the same grid
    from its number of points, so its `--num_sampling_steps N` is our steps = N - 1.)"""
    return time_shift(torch.arange(steps + 1, dtype=torch.float64) / steps, shift)


def euler_sample(velocity, x, steps, shift=1.0, callback=None):
    """Euler ODE solver: `steps` model evaluations, at t_0 .. t_{steps-1} of euler_times; never at t = 1."""
    ts = euler_times(steps, shift).tolist()
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]) * velocity(x, ts[i])
        if callback is not None:
            callback(i + 1, steps)
    return x


def dpm_sigmas(steps, shift):
    """The official DPM-Solver grid (`time_uniform_flow`): noise levels sigma = 1 - t, uniform in
    [0.999, 0] before the shift, so the first call is at t ~ 1e-4 and the last level is exactly 0."""
    u = 0.999 * (steps - torch.arange(steps + 1, dtype=torch.float64)) / steps
    return shift * u / (1 + (shift - 1) * u)


def dpm_solver_sample(velocity, x, steps, shift=1.0, callback=None):
    """DPM-Solver++ 2M (multistep, data prediction) for the flow path, as the official `--solver dpm`.
    In noise level sigma: alpha = 1 - sigma, lambda = log(alpha / sigma), the data prediction is
    x0 = x + sigma * v. Step 1 is first order, steps 2..N-1 second order, and the last step (to sigma = 0)
    is first order, i.e. returns the data prediction. N model evaluations.
    The official solver runs this arithmetic in bf16; we run it in x's dtype (fp32 by default)."""
    sig = dpm_sigmas(steps, shift).tolist()
    lam = [math.log((1 - s) / s) if s > 0 else math.inf for s in sig]
    prev_x0, prev_lam = None, None
    for i in range(steps):
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
        prev_x0, prev_lam = x0, lam[i]
        if callback is not None:
            callback(i + 1, steps)
    return x


SAMPLERS = {"euler": euler_sample, "dpm": dpm_solver_sample}


# -----------------------------------------------------------------------------------------------------------
# Classifier-free guidance

@dataclass
class Guidance:
    """CFG settings. `scale` multiplies (cond - uncond): g = uncond + scale * (cond - uncond).
    renorm (official default 1.0): clip each sample's ||g|| to renorm * ||cond||; 0 disables it.
    trunc (official `cfg_trunc`, default 100 = never): guidance only while t < trunc, else cond only."""
    scale: float = 4.0
    renorm: float = 1.0
    trunc: float = 100.0

    @property
    def active(self):
        return self.scale != 1.0


def guided_velocity(model, cap_feats, cap_mask, guidance, dtype=None):
    """Return velocity(x, t) for the samplers. With guidance on, `cap_feats`/`cap_mask` hold the B
    conditional rows followed by the B unconditional rows, and one batched forward computes both."""
    def velocity(x, t):
        B = x.shape[0]
        xin = x.to(dtype) if dtype is not None else x
        if not guidance.active or t >= guidance.trunc:
            tt = torch.full((B,), t, device=x.device, dtype=torch.float32)
            return model(xin, tt, cap_feats[:B], cap_mask[:B]).to(x.dtype)
        tt = torch.full((2 * B,), t, device=x.device, dtype=torch.float32)
        out = model(torch.cat([xin, xin]), tt, cap_feats, cap_mask).to(x.dtype)
        cond, uncond = out.chunk(2)
        g = uncond + guidance.scale * (cond - uncond)
        if guidance.renorm > 0:
            dims = tuple(range(1, g.dim()))
            n_cond = torch.linalg.vector_norm(cond, dim=dims, keepdim=True)
            n_g = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
            g = g * torch.clamp(guidance.renorm * n_cond / (n_g + 1e-12), max=1.0)
        return g
    return velocity


# -----------------------------------------------------------------------------------------------------------
# Latent statistics: the DiT sees per-channel normalised DINOv3 features

class LatentStats:
    """Per-channel mean and std of the DINOv3 features, [C] each.
    normalize: (f - mean) / (std + 1e-8); denormalize: z * std + mean (no epsilon), as the official code.
    (Official training casts the stats to bf16 first; we keep fp32 on both sides so the two are inverses.)"""

    def __init__(self, mean, std):
        self.mean, self.std = mean.float().flatten(), std.float().flatten()

    @property
    def channels(self):
        return self.mean.numel()

    def _view(self, x):
        if x.shape[1] != self.channels:
            raise ValueError(f"latent has {x.shape[1]} channels but the statistics have {self.channels}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.mean.to(x.device).view(shape), self.std.to(x.device).view(shape)

    def normalize(self, features):
        mean, std = self._view(features)
        return ((features.float() - mean) / (std + 1e-8)).to(features.dtype)

    def denormalize(self, latents):
        mean, std = self._view(latents)
        return (latents.float() * std + mean).to(latents.dtype)


def load_latent_stats(path, channels=384, layer=-1):
    """Read the official stats file: {'mean': [L, 384], 'std': [L, 384]} (one row per ViT layer; row -1,
    the final-normed patch tokens, is the one used). For autoencoder-R's 392 channels the 8 residual
    channels get the scalar averages of the row, as the official code does."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"latent statistics file not found: {path} "
                                "(expected dinov3_s16p_layer_patchtoken_stats_dist.pt)")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read latent statistics ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or "mean" not in d or "std" not in d:
        raise ValueError(f"{path}: not a latent statistics file (expected a dict with 'mean' and 'std')")
    mean, std = d["mean"].float(), d["std"].float()
    if mean.dim() == 1:
        mean, std = mean[None], std[None]
    mean, std = mean[layer], std[layer]
    if channels < mean.numel():
        raise ValueError(f"{path}: statistics have {mean.numel()} channels, cannot serve {channels}")
    extra = channels - mean.numel()
    if extra:
        mean = torch.cat([mean, mean.mean().expand(extra)])
        std = torch.cat([std, std.mean().expand(extra)])
    return LatentStats(mean, std)


class StatsAccumulator:
    """Per-channel mean and std of features [B, C, h, w] over all tokens seen (float64 running sums)."""

    def __init__(self):
        self.n, self.sum, self.sumsq = 0, None, None

    def update(self, features):
        f = features.detach().double().transpose(0, 1).flatten(1)      # [C, B*h*w]
        if self.sum is None:
            self.sum, self.sumsq = torch.zeros(f.shape[0], dtype=torch.float64), torch.zeros(f.shape[0], dtype=torch.float64)
        self.n += f.shape[1]
        self.sum += f.sum(1).cpu()
        self.sumsq += (f * f).sum(1).cpu()

    def state(self):
        """The official file format: {'mean': [1, C], 'std': [1, C]} float32 (one row: the final layer)."""
        mean = self.sum / self.n
        var = (self.sumsq / self.n - mean ** 2).clamp_min(0) * self.n / max(self.n - 1, 1)
        return {"mean": mean.float()[None], "std": var.sqrt().float()[None]}


# -----------------------------------------------------------------------------------------------------------
# The autoencoder: frozen DINOv3 encoder (+ residual ViT for R) and the pixel decoder

def match_distribution(h, h_res):
    """Autoencoder-R: rescale the residual channels [B, 8, N] to the DINO features' scalar statistics
    (per-channel mean / unbiased std over batch and tokens, averaged over channels; detached)."""
    def stats(x):
        return x.mean(dim=(0, 2)).mean().detach(), x.std(dim=(0, 2)).mean().detach()
    mu_h, sd_h = stats(h)
    mu_r, sd_r = stats(h_res)
    return (h_res - mu_r) / (sd_r + 1e-6) * sd_h + mu_h


def check_image_size(height, width):
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} (HxW) is not a multiple of 16: use sizes divisible by 16, "
                         f"e.g. {max(16, round(height / 16) * 16)}x{max(16, round(width / 16) * 16)}")


class Autoencoder(nn.Module):
    """SVG autoencoder: images in [-1, 1] <-> DINOv3 feature latents [B, 384 (+8 for R), H/16, W/16].
    `encoder` (DINOv3) is only needed for encode(); sampling needs the decoder alone."""

    def __init__(self, decoder, encoder=None, residual=None):
        super().__init__()
        self.decoder, self.encoder, self.residual = decoder, encoder, residual
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def latent_channels(self):
        return self.decoder.config.z_channels

    @torch.no_grad()
    def encode(self, images):
        if self.encoder is None:
            raise ValueError("this autoencoder was loaded without its DINOv3 encoder: pass dinov3_path=... "
                             "(the dinov3_vits16plus_pretrain_lvd1689m-*.pth file) to load_autoencoder")
        B, _, H, W = images.shape
        check_image_size(H, W)
        dtype = next(self.encoder.parameters()).dtype
        x = ((images.float() + 1) / 2 - self.pixel_mean) / self.pixel_std      # ImageNet normalisation
        h = self.encoder(x.to(dtype)).transpose(1, 2)                          # [B, N, 384] -> [B, 384, N]
        if self.residual is not None:
            h_res = self.residual(x.to(dtype))                                  # [B, 8, N]
            h = torch.cat([h, match_distribution(h, h_res)], dim=1)
        return h.reshape(B, -1, H // 16, W // 16)                               # row-major tokens

    def decode(self, latents):
        dtype = next(self.decoder.parameters()).dtype
        return self.decoder(latents.to(dtype))

    @torch.no_grad()
    def reconstruct(self, image):
        """What the autoencoder keeps: encode a PIL image (cropped to a multiple of 16) and decode it."""
        w, h = image.size
        if w < 16 or h < 16:
            raise ValueError(f"image of {w}x{h} px is too small: the encoder needs at least 16x16")
        image = image.convert("RGB").crop((0, 0, w - w % 16, h - h % 16))
        x = images_to_tensor([image], self.pixel_mean.device)
        return tensor_to_images(self.decode(self.encode(x)))[0]


def read_state_dict(path):
    """Open a checkpoint without copying it: safetensors, or a torch file mmap'd with weights_only.
    Lightning checkpoints are unwrapped to their `state_dict`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a state dict")
    return sd


def sub_state_dict(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_autoencoder(path, dinov3_path=None, device="cpu", dtype=torch.float32, encoder=True):
    """Build the SVG autoencoder from the official Lightning checkpoint (or a safetensors file with the same
    keys). `decoder.*` -> Decoder (P or R inferred from conv_in), `extra_vit.*` -> residual ViT (R),
    `encoder.*` -> DINOv3 when present, else from `dinov3_path`. Ignored on purpose: `loss.*` (LPIPS and the
    discriminator, training only), `norm_vit.*` (built upstream but never used) and `extra_vit.head.*` (an
    unused 1000-way classifier head left over from the ViT). encoder=False skips DINOv3 (sampling only)."""
    sd = read_state_dict(path)
    dec_sd = sub_state_dict(sd, "decoder.")
    if not dec_sd:
        raise ValueError(f"{path}: no 'decoder.*' keys: not an SVG autoencoder checkpoint "
                         "(expected autoencoder/svg_autoencoder-P-stage3.ckpt or similar)")
    decoder = decoder_from_state_dict(dec_sd, device=device, dtype=dtype)
    residual = None
    res_sd = sub_state_dict(sd, "extra_vit.")
    if res_sd:
        residual = residual_vit_from_state_dict(res_sd, device=device, dtype=dtype)
    if decoder.config.z_channels > 384 and residual is None:
        raise ValueError(f"{path}: the decoder takes {decoder.config.z_channels} channels but the checkpoint "
                         "has no residual ViT ('extra_vit.*' keys)")
    dino = None
    if encoder:
        enc_sd = sub_state_dict(sd, "encoder.")
        if enc_sd:
            dino = dinov3_from_state_dict(enc_sd, device=device, dtype=dtype)
        elif dinov3_path is not None:
            dino = load_dinov3(dinov3_path, device=device, dtype=dtype)
    return Autoencoder(decoder, dino, residual).eval()


def images_to_tensor(images, device="cpu"):
    """PIL images (same size) -> [B, 3, H, W] in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).to(device) / 127.5 - 1


def tensor_to_images(x):
    """[B, 3, H, W] in [-1, 1] -> PIL images, rounded to uint8 (not truncated)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


# -----------------------------------------------------------------------------------------------------------
# Text: Gemma-2 features of system prompt + prompt

SYSTEM_PROMPTS = {
    "base": "You are an assistant designed to generate high-quality images based on user prompts. <Prompt Start> ",
    "align": "You are an assistant designed to generate high-quality images with the highest degree of "
             "image-text alignment based on textual prompts. <Prompt Start> ",
    "aesthetics": "You are an assistant designed to generate high-quality images with highest degree of "
                  "aesthetics based on user prompts. <Prompt Start> ",
    "real": "You are an assistant designed to generate superior images with the superior degree of image-text "
            "alignment based on textual prompts or user prompts. <Prompt Start> ",
    "4grid": "You are an assistant designed to generate four high-quality images with highest degree of "
             "aesthetics arranged in 2x2 grids based on user prompts. <Prompt Start> ",
    "empty": "",
}


def system_prompt_text(name_or_text):
    """A system prompt by name (base, align, aesthetics, real, 4grid, empty) or a literal string."""
    return SYSTEM_PROMPTS.get(name_or_text, name_or_text)


class TextEncoder:
    """Gemma-2 as the caption encoder: right-padded ids (BOS first) -> hidden_states[-2] [B, L, 2304]."""

    def __init__(self, tokenizer, model, max_length=512):
        self.tokenizer, self.model, self.max_length = tokenizer, model, max_length

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, texts, max_length=None, chunk=32):
        """-> features [B, L, D] and mask [B, L] (bool), L the longest text rounded up to a multiple of 8.
        Gemma runs on `chunk` texts at a time, so a long prompt list never needs one huge forward."""
        ids, mask = self.tokenizer(list(texts), max_length=max_length or self.max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        feats = torch.cat([self.model.encode(ids[i:i + chunk], mask[i:i + chunk], layer=-2)
                           for i in range(0, len(ids), chunk)])
        return feats, mask.bool()


# -----------------------------------------------------------------------------------------------------------
# Finding the weights

DOWNLOAD_HINT = ("the official weights are published with the SVG-T2I release (github.com/KlingTeam/SVG-T2I, "
                 "'pre-trained/' folder) and Gemma-2-2B at huggingface.co/google/gemma-2-2b")


def _first(folder, patterns, unique=False):
    """The first pattern that matches wins; among its matches the last in sorted order (the highest stage), or,
    with unique=True, an error if there are several."""
    for pat in patterns:
        hits = sorted(glob.glob(os.path.join(folder, pat)))
        if len(hits) > 1 and unique:
            raise ValueError(f"{folder}: several files match {pat} ({', '.join(hits)}): choose one with --dit")
        if hits:
            return hits[-1]
    return None


def checkpoint_folder(path):
    """A training run's folder (OUT/, holding `latest`) stands for its newest checkpoint; any other folder for itself."""
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            return os.path.join(path, f.read().strip())
    return path


def find_weights(ckpt_dir, gemma_dir=None, dit=None, autoencoder=None, dinov3=None, stats=None,
                 need=("dit", "autoencoder", "stats", "gemma")):
    """Locate the files of a checkpoint folder: the official `pre-trained/` layout, or one of our own
    (training checkpoints and the bundled toy model). Explicit arguments override what is found.
    Our own folders may carry `run.json` naming the frozen parts they were trained with.
    Raises a clear error for each file in `need` that is missing."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir} ({DOWNLOAD_HINT})")
    ckpt_dir = checkpoint_folder(ckpt_dir)
    run = {}
    if os.path.isfile(os.path.join(ckpt_dir, "run.json")):
        with open(os.path.join(ckpt_dir, "run.json")) as f:
            run = {k: (v if v is None or os.path.isabs(v) else os.path.join(ckpt_dir, v))
                   for k, v in json.load(f).get("frozen", {}).items()}
    found = {
        "dit": dit or _first(ckpt_dir, ["ema.safetensors", "model.safetensors", "consolidated.00-of-01.pth",
                                        "consolidated_ema.00-of-01.pth", "dit-*/consolidated.00-of-01.pth",
                                        "dit-*/consolidated_ema.00-of-01.pth"], unique=True),
        "autoencoder": autoencoder or _first(ckpt_dir, ["autoencoder.safetensors", "autoencoder/svg_autoencoder-P-*.ckpt",
                                                        "autoencoder/svg_autoencoder*.ckpt", "autoencoder/*.ckpt"])
                       or run.get("autoencoder"),
        "dinov3": dinov3 or _first(ckpt_dir, ["dinov3.safetensors", "dinov3_vits16plus_pretrain_lvd1689m-*.pth"])
                  or run.get("dinov3"),
        "stats": stats or _first(ckpt_dir, ["latent_stats.pt", "dinov3_s16p_layer_patchtoken_stats_dist.pt"])
                 or run.get("stats"),
        "gemma": gemma_dir or _first(ckpt_dir, ["text_encoder", "gemma-2-2b"]) or run.get("gemma"),
    }
    expected = {
        "dit": "dit-*/consolidated.00-of-01.pth (or ema.safetensors / model.safetensors of a training run)",
        "autoencoder": "autoencoder/svg_autoencoder-P-stage3.ckpt",
        "dinov3": "dinov3_vits16plus_pretrain_lvd1689m-*.pth (or encoder.* keys in the autoencoder checkpoint)",
        "stats": "dinov3_s16p_layer_patchtoken_stats_dist.pt",
        "gemma": "a Gemma-2-2B folder (config.json, model*.safetensors, tokenizer.model), passed as --gemma",
    }
    for key in need:
        what = expected[key]
        if found[key] is None:
            raise FileNotFoundError(f"{ckpt_dir}: no {key} weights found; expected {what} ({DOWNLOAD_HINT})")
        if not os.path.exists(found[key]):
            raise FileNotFoundError(f"{key} weights not found: {found[key]} ({DOWNLOAD_HINT})")
    return found


# -----------------------------------------------------------------------------------------------------------
# The pipeline

class SVGT2I:
    """Text-to-image: Gemma-2 caption features -> NextDiT flow in normalised DINOv3 latent space -> decoder."""

    def __init__(self, dit, autoencoder, stats, text_encoder, device="cpu", dtype=torch.bfloat16):
        self.dit, self.autoencoder, self.stats, self.text_encoder = dit, autoencoder, stats, text_encoder
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def from_pretrained(cls, ckpt_dir, gemma_dir=None, device="cpu", dtype=torch.bfloat16, with_encoder=False,
                        **overrides):
        """Load the whole pipeline. The DiT and Gemma go to `dtype`; the decoder (and DINOv3) stay fp32,
        which costs little (43M + 29M parameters) and keeps decoding exact.
        `overrides`: dit=, autoencoder=, dinov3=, stats= file paths that replace what is found."""
        files = find_weights(ckpt_dir, gemma_dir, **overrides)
        dit = load_nextdit(files["dit"], device=device, dtype=dtype).eval()
        autoencoder = load_autoencoder(files["autoencoder"], dinov3_path=files["dinov3"], device=device,
                                       dtype=torch.float32, encoder=with_encoder)
        stats = load_latent_stats(files["stats"], channels=autoencoder.latent_channels)
        if dit.config.in_channels != stats.channels:
            raise ValueError(f"the DiT works on {dit.config.in_channels} channels but the autoencoder on "
                             f"{stats.channels}: use the P autoencoder with the released DiT")
        tok_file = os.path.join(files["gemma"], "tokenizer.model")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"{tok_file} not found: the Gemma folder needs its sentencepiece tokenizer.model")
        text = TextEncoder(Gemma2Tokenizer(tok_file), load_gemma2(files["gemma"], device=device, dtype=dtype).eval())
        return cls(dit, autoencoder, stats, text, device=device, dtype=dtype)

    def encode_text(self, prompts, system_prompt="base", negative_prompt="", guidance=True):
        """Caption features for `prompts`, followed (with guidance) by one negative row per prompt.
        The default negative is "" without a system prompt, as the official sampler and as caption dropout
        in training; a non-empty negative gets the system prompt like a prompt does."""
        sp = system_prompt_text(system_prompt)
        texts = [sp + p for p in prompts]
        if guidance:
            texts += [sp + negative_prompt if negative_prompt else ""] * len(prompts)
        return self.text_encoder(texts)

    @torch.no_grad()
    def generate(self, prompts, height=1024, width=1024, steps=50, cfg_scale=4.0, shift=10.0, seed=0,
                 negative_prompt="", system_prompt="base", solver="euler", renorm=1.0, cfg_trunc=100.0,
                 batch_size=1, offload=False, progress=None):
        """Generate one image per prompt; image k starts from randn(1, C, H/16, W/16) drawn on the CPU with
        seed + k, so a seed gives the same image on any device and in any batch."""
        if isinstance(prompts, str):
            prompts = [prompts]
        check_image_size(height, width)
        if solver not in SAMPLERS:
            raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SAMPLERS)}")
        guidance = Guidance(cfg_scale, renorm, cfg_trunc)
        feats, mask = self.encode_text(prompts, system_prompt, negative_prompt, guidance.active)
        if offload:   # free accelerator memory for the DiT: Gemma's work is done
            self.text_encoder.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        feats, mask = feats.to(self.device, self.dtype), mask.to(self.device)
        n, C = len(prompts), self.dit.config.in_channels
        images = []
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            rows = idx + [n + i for i in idx] if guidance.active else idx
            noise = torch.cat([torch.randn([1, C, height // 16, width // 16],
                                           generator=torch.Generator().manual_seed(seed + k)) for k in idx])
            velocity = guided_velocity(self.dit, feats[rows], mask[rows], guidance, dtype=self.dtype)
            cb = (lambda i, N: progress(idx, i, N)) if progress else None
            z = SAMPLERS[solver](velocity, noise.to(self.device), steps, shift, callback=cb)
            images += tensor_to_images(self.autoencoder.decode(self.stats.denormalize(z)))
        return images


# -----------------------------------------------------------------------------------------------------------
# Tiny frozen parts, written in the formats the loaders read (the tiny training preset and the toy model)

def train_tokenizer(texts, model_prefix, vocab_size=512):
    """Train a small sentencepiece BPE model with Gemma's conventions: <pad> 0, <eos> 1, <bos> 2, <unk> 3,
    byte fallback, digits split, no dummy prefix, whitespace kept. Returns the .model path (the .vocab listing
    sentencepiece writes beside it is removed: nothing reads it)."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_prefix=model_prefix, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, split_digits=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", num_threads=1, minloglevel=2)
    os.remove(model_prefix + ".vocab")
    return model_prefix + ".model"


def dinov3_official_state_dict(model):
    """Our DINOv3's weights in the original .pth layout: the k-bias mask is written back out as
    `bias_mask` (1 for q and v, 0 for k), the bias itself already holding zeros there."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dim = model.config.dim
    for k in list(sd):
        if k.endswith("attn.qkv.bias"):
            mask = torch.ones(3 * dim)
            mask[dim:2 * dim] = 0
            sd[k.replace(".bias", ".bias_mask")] = mask
    return sd


def gemma2_hub_config(c):
    """A Gemma2Config as the Hub's config.json spells it."""
    return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "query_pre_attn_scalar": c.query_pre_attn_scalar, "sliding_window": c.sliding_window,
            "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
            "attn_logit_softcapping": c.attn_logit_softcapping, "hidden_activation": "gelu_pytorch_tanh",
            "hidden_act": "gelu_pytorch_tanh", "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
            "torch_dtype": "float32"}


def save_gemma2_folder(model, folder, tokenizer_file=None):
    """A Hugging Face style folder: config.json (Hub spelling), model.safetensors (`model.` keys) and
    tokenizer.model, which load_gemma2 and Gemma2Tokenizer read."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(gemma2_hub_config(model.config), f, indent=2)
    save_file({"model." + k: v.detach().float().contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    if tokenizer_file is not None:
        import shutil
        shutil.copyfile(tokenizer_file, os.path.join(folder, "tokenizer.model"))
    return folder


def make_tiny_frozen(folder, texts, seed=0, dinov3_config=None, decoder_config=None, gemma_config=None):
    """Write tiny random frozen parts into `folder`: a DINOv3 (`dinov3.pth`, original layout), an autoencoder
    (`autoencoder.safetensors`: `encoder.*` DINOv3 + `decoder.*`, random decoder) and a Gemma-2 folder
    (`text_encoder/`) with a sentencepiece tokenizer trained on `texts`. Random weights stand in for the
    pretrained ones: the point is that every loader and code path is the real one."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    dcfg = dinov3_config or DINOv3Config(dim=64, depth=2, n_heads=1, ffn_dim=128)
    dino = DINOv3(dcfg)
    dino_sd = dinov3_official_state_dict(dino)
    torch.save(dino_sd, os.path.join(folder, "dinov3.pth"))
    decoder = Decoder(decoder_config or DecoderConfig.tiny(z_channels=dcfg.dim))
    ae_sd = {**{"encoder." + k: v for k, v in dino_sd.items()},
             **{"decoder." + k: v.detach().contiguous() for k, v in decoder.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in ae_sd.items()}, os.path.join(folder, "autoencoder.safetensors"))
    tok = train_tokenizer(texts, os.path.join(folder, "tokenizer"))
    import sentencepiece as spm
    vocab = spm.SentencePieceProcessor(model_file=tok).get_piece_size()
    gcfg = gemma_config or Gemma2Config.tiny(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                             sliding_window=512)
    gemma_dir = save_gemma2_folder(Gemma2(gcfg), os.path.join(folder, "text_encoder"), tok)
    return {"autoencoder": os.path.join(folder, "autoencoder.safetensors"),
            "dinov3": os.path.join(folder, "dinov3.pth"), "gemma": gemma_dir}
