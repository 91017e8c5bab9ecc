"""
Train the SVG autoencoder's pixel side, the paper's first stage: the conv decoder on frozen DINOv3
features (autoencoder-P), or the decoder plus the 8-channel residual ViT (autoencoder-R), with
L1 + LPIPS + an adaptive-weighted PatchGAN; and measure reconstructions (PSNR, SSIM, LPIPS).

    # P, stage 1 (256 px, fixed-size crops), one node of 8 GPUs, from scratch
    torchrun --nproc_per_node 8 train_autoencoder.py --stage 1 --data imagenet/train \\
        --out runs/ae1 --dinov3 pre-trained/dinov3_vits16plus_pretrain_lvd1689m-*.pth \\
        --vgg vgg16-397923af.pth --lpips vgg.pth
    # the multi-resolution stages start from the previous stage (frozen parts and loss weights too)
    torchrun --nproc_per_node 8 train_autoencoder.py --stage 2 --data data.jsonl --out runs/ae2 \\
        --init-from runs/ae1
    # fine-tune the released decoder on your own images
    torchrun --nproc_per_node 8 train_autoencoder.py --stage 3 --data my_images/ --out runs/ft \\
        --init-from pre-trained/autoencoder/svg_autoencoder-P-stage3.ckpt --dinov3 ... --vgg ...
    # autoencoder-R: the same with --ae R; continue a stopped run exactly: the same with --resume
    # reconstruction metrics (the official protocol)
    python train_autoencoder.py --eval --data imagenet/val --ckpt runs/ae1 --limit 5000

One iteration (the official step, reference decoder.md section 4.3), on one micro-batch or several:
every image is encoded by the frozen DINOv3 (and, for R, the residual ViT, whose 8 channels are
distribution-matched to DINO's statistics) and decoded; the autoencoder loss
L_nll + d_w * f * L_G (L_nll: per image, the L1 summed over pixels plus 3HW LPIPS, averaged over
the images; L_G = -mean D(x_hat); d_w the adaptive weight at decoder.conv_out.weight; f = 1 from
iteration disc_start on) drives one Adam step of the decoder (and ViT); then the PatchGAN's hinge
loss on the same, detached, pre-update reconstructions drives one Adam step of the discriminator
(also while f = 0, as upstream: its loss is then 0, Adam still counts the step). Fixed-size stages
run the micro-batch as one tensor; the multi-resolution stages run every image alone (its own
aspect bucket; BatchNorm statistics and R's matching per image).

disc_start counts iterations (one decoder update + one discriminator update). Upstream compared
Lightning's global_step, which advances by 2 per iteration with two optimisers, against
disc_start: 5000, so the released runs switched the GAN on at iteration 2500; our default is 2500,
which reproduces that (disc_start_from_lightning converts a config value). Every stage counts from
its own start, as every upstream stage was a new fit.

Where the official trainer is not followed, on purpose:
- While f = 0 the adaptive weight is not computed (upstream computes it and multiplies the term by
  0): no gradient changes; the log shows d_weight 0 until the switch.
- In the decoder's pass the discriminator's parameters take no gradient (upstream computes it and
  the D step's zero_grad throws it away): the same decoder gradient, less work, and DDP all-reduces
  D's gradient once per iteration.
- Random crops and the data order are seeded by each sample's position in the data stream, so a
  resumed run continues bit for bit. The multi-resolution stages shuffle (upstream's loader did
  not); unreadable images are skipped with a warning and counted, not silently.
- --micro-batch splits a rank's batch into several forwards (gradient accumulation); upstream has
  none. The adaptive weight, BatchNorm's statistics and R's matching are then per micro-batch, as
  they are per rank under DDP (upstream's d_w was per rank too).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from data import ImageSet, crops_for, describe, eval_crop, open_records, read_image
from decoder import (Decoder, DecoderConfig, ResidualViT, ResidualViTConfig, decoder_keymap,
                     residual_vit_keymap)
from dinov3 import dinov3_official_state_dict
from runs import (Dist, HelpFormatter, UsageError, absolute_paths, add_system_args, batch_plan,
                  check_replicas, command_line, compute_stats, data_stream, fmt_time,
                  load_fitting, open_run, restore_run_state, resume_folder, run_state,
                  save_checkpoint, stop_on_signals, truncate_log, warn_skipped, wrap_ddp)
from svgt2i import (Autoencoder, atomic_write, build, checkpoint_folder, load_autoencoder,
                    load_dinov3, read_state_dict, sub_state_dict, with_residual)

# -------------------------------------------------------------------------------------------------
# Stages (paper Table 3) and the official recipe (reference decoder.md section 4)

# stage: anchor resolution, data handling, steps, global batch. "fixed": the smaller side resized
# to the resolution, a random square crop, the micro-batch as one tensor; "buckets": the aspect
# bucket of each image around resolution^2 pixels, every image through the networks alone.
STAGES = {
    1: dict(resolution=256, crops="fixed", steps=94_000, global_batch=512),
    2: dict(resolution=512, crops="buckets", steps=78_000, global_batch=128),
    3: dict(resolution=1024, crops="buckets", steps=190_000, global_batch=32),
}
RECIPE = dict(lr=1e-4, perceptual_weight=1.0, disc_weight=0.5, disc_start=2500, save_every=2000,
              log_every=10, workers=min(4, os.cpu_count() or 1), threads=0, stats_images=10000)
ADAM_BETAS = (0.5, 0.9)    # both optimisers; no weight decay, no schedule, no EMA, fp32
# what --resume checks in a checkpoint before trusting it (latent_stats.pt is R's, written last)
CHECKPOINT_FILES = ("autoencoder.safetensors", "optimizer.pt", "state.pt", "run.json")
VGG_FILE, LIN_FILE = "vgg16-397923af.pth", "vgg.pth"
LPIPS_HINT = (f"pass --vgg {VGG_FILE} (torchvision's ImageNet VGG16) and --lpips {LIN_FILE} (the "
              "lpips package's VGG linear layers), or --init-from a training checkpoint holding "
              "loss.perceptual_loss.*, or --perceptual-weight 0 to do without LPIPS")


# -------------------------------------------------------------------------------------------------
# LPIPS (VGG16), frozen: taming's layout, torchvision's trunk indices


VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))   # (width, 3x3 convs) per stage
LPIPS_SHIFT, LPIPS_SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)


@dataclass
class LPIPSConfig:
    stages: tuple = VGG16_STAGES    # each stage's last ReLU is a tap (relu1_2 ... relu5_3)

    @classmethod
    def from_state_dict(cls, sd):
        """Stages from the trunk's conv indices (ours: net.features.{i}.*): convs of a stage are
        2 apart (conv, ReLU), a max-pool between stages makes it 3."""
        conv = re.compile(r"net\.features\.(\d+)\.weight")
        idxs = sorted(int(m[1]) for m in map(conv.fullmatch, sd) if m)
        if not idxs:
            raise ValueError("no LPIPS trunk weights (net.features.{i}.weight)")
        stages, start = [], 0
        for j in range(1, len(idxs) + 1):
            if j == len(idxs) or idxs[j] - idxs[j - 1] != 2:
                width = sd[f"net.features.{idxs[j - 1]}.weight"].shape[0]
                stages.append((width, j - start))
                start = j
        return cls(stages=tuple(stages))


class VGG16Features(nn.Module):
    """The VGG16 conv trunk under torchvision's `features.{i}` names; forward returns each stage's
    last ReLU (features 3, 8, 15, 22, 29 for VGG16). Neither the last max-pool nor the classifier
    is built."""

    def __init__(self, stages):
        super().__init__()
        layers, taps, cin = [], [], 3
        for s, (cout, n_convs) in enumerate(stages):
            if s > 0:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            for _ in range(n_convs):
                # not in-place: a tapped activation must survive the next layer
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
                cin = cout
            taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.taps = tuple(taps)

    def forward(self, x):
        outs = []
        for idx, layer in enumerate(self.features):
            x = layer(x)
            if idx in self.taps:
                outs.append(x)
        return outs


class NetLinLayer(nn.Module):
    """1x1 conv to one channel, no bias. `model.1` keeps lpips' names; slot 0 was a Dropout, which
    LPIPS only ever ran in eval mode: an Identity, so no stray .train() can switch it on."""

    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


def unit_channels(x, eps=1e-10):
    """x / (||x||_2 over channels + eps), as lpips' normalize_tensor (eps outside the root)."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS distance, VGG16 variant, between images in [-1, 1] -> [B, 1, 1, 1]: the inputs
    whitened by the fixed ScalingLayer constants, the channel-normalised features of each tap
    differenced and squared, weighted by lin{k}, averaged over space, summed over taps. Frozen
    (gradients reach the inputs only); nothing in it depends on train/eval mode."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.net = VGG16Features(config.stages)
        for k, (c, _) in enumerate(config.stages):
            self.add_module(f"lin{k}", NetLinLayer(c))
        self.requires_grad_(False)

    def forward(self, x, y):
        shift = x.new_tensor(LPIPS_SHIFT).view(1, 3, 1, 1)
        scale = x.new_tensor(LPIPS_SCALE).view(1, 3, 1, 1)
        # one trunk pass over both images: VGG has no batch-dependent layer
        feats = self.net((torch.cat([x, y]) - shift) / scale)
        total = 0.0
        for k, f in enumerate(feats):
            fx, fy = f.chunk(2)                                                  # [B, C_k, h, w]
            diff = (unit_channels(fx) - unit_channels(fy)).pow(2)
            total = total + getattr(self, f"lin{k}")(diff).mean(dim=(2, 3), keepdim=True)
        return total                                                             # [B, 1, 1, 1]


# Where LPIPS weights come from, and our names:
#   torchvision vgg16-397923af.pth   features.{i}.weight|bias   -> net.features.{i}.*
#                                    classifier.*                  dropped (not part of LPIPS)
#   lpips vgg.pth                    lin{k}.model.1.weight       -> the same name; anything else
#                                                                   in that file is dropped
#   an official training checkpoint  loss.perceptual_loss.net.slice{s}.{i}.* -> net.features.{i}.*
#                                    (taming splits `features` into slices, keeping the index)
#                                    loss.perceptual_loss.lin{k}.model.1.weight -> lin{k}...
#                                    loss.perceptual_loss.scaling_layer.shift|scale: the fixed
#                                    constants, checked and dropped; lins.*: lpips' alias, dropped
LIN_KEY = re.compile(r"lin\d+\.model\.1\.weight")
SLICE_KEY = re.compile(r"net\.slice\d+\.(\d+)\.(weight|bias)")
LPIPS_PREFIX, DISC_PREFIX = "loss.perceptual_loss.", "loss.discriminator."


def lpips_from_files(vgg_path, lin_path, device="cpu"):
    """LPIPS from torchvision's VGG16 file and lpips' vgg.pth (legacy pickles are fine)."""
    vgg, lin = read_state_dict(vgg_path), read_state_dict(lin_path)
    sd = {("net." + k if k.startswith("features.") else k): v for k, v in vgg.items()
          if not k.startswith("classifier.")}
    sd.update({k: v for k, v in lin.items() if LIN_KEY.fullmatch(k)})
    return _build_lpips(sd, f"{vgg_path} + {lin_path}", "", device)


def lpips_from_checkpoint(sd, source, device="cpu"):
    """LPIPS from the loss.perceptual_loss.* keys of an official (or our) training checkpoint."""
    sub, ours = sub_state_dict(sd, LPIPS_PREFIX), {}
    for k, v in sub.items():
        m = SLICE_KEY.fullmatch(k)
        if m:
            ours[f"net.features.{m[1]}.{m[2]}"] = v
        elif k.startswith("scaling_layer."):
            expect = LPIPS_SHIFT if k.endswith("shift") else LPIPS_SCALE
            if not torch.allclose(v.float().flatten(), torch.tensor(expect)):
                raise ValueError(f"{source}: {LPIPS_PREFIX}{k} = {v.flatten().tolist()}, not "
                                 f"LPIPS' constants {expect}")
        elif not k.startswith("lins."):
            ours[k] = v
    return _build_lpips(ours, source, LPIPS_PREFIX, device)


def _build_lpips(sd, source, prefix, device):
    try:
        config = LPIPSConfig.from_state_dict(sd)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{source}: not LPIPS VGG16 weights ({e})") from None
    return build(LPIPS, config, sd, source, prefix, device).requires_grad_(False)


def lpips_official_state_dict(lpips):
    """Ours -> the official loss.perceptual_loss.* layout (without the prefix), constants included,
    so our checkpoints can be fine-tuned again like the official ones."""
    stage_of, i, out = {}, 0, {}
    for s, (_, n) in enumerate(lpips.config.stages):
        i += s > 0                                     # the max-pool before every stage but one
        for _ in range(n):
            stage_of[i] = s + 1
            i += 2                                     # conv, ReLU
    for k, v in lpips.state_dict().items():
        if k.startswith("net.features."):
            idx, p = k.split(".")[2:]
            k = f"net.slice{stage_of[int(idx)]}.{idx}.{p}"
        out[k] = v
    out["scaling_layer.shift"] = torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1)
    out["scaling_layer.scale"] = torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1)
    return out


# -------------------------------------------------------------------------------------------------
# The PatchGAN discriminator (taming's NLayerDiscriminator, BatchNorm), trained


@dataclass
class DiscriminatorConfig:
    in_channels: int = 3
    ndf: int = 64                   # first layer's width; doubles per layer, at most 8 x ndf
    n_layers: int = 3               # BatchNorm layers

    @classmethod
    def from_state_dict(cls, sd):
        """From the shapes of main.* (2,765,633 parameters for the default)."""
        if "main.0.weight" not in sd:
            raise ValueError("no discriminator weights (main.0.weight)")
        ndf, cin = sd["main.0.weight"].shape[:2]
        n_layers = sum(1 for k in sd if re.fullmatch(r"main\.\d+\.running_mean", k))
        return cls(in_channels=cin, ndf=ndf, n_layers=n_layers)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: conv 4x4/2 + LeakyReLU(0.2), then n_layers blocks conv (no bias) + BatchNorm +
    LeakyReLU (stride 2 but the last, stride 1), then conv to one logit per patch. Keys
    main.{0,2,3,5,6,8,9,11}.* as upstream's loss.discriminator.*; 256^2 -> [B, 1, 30, 30]."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        layers = [nn.Conv2d(c.in_channels, c.ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, c.n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < c.n_layers else 1
            layers += [nn.Conv2d(c.ndf * prev, c.ndf * mult, 4, stride=stride, padding=1,
                                 bias=False),
                       nn.BatchNorm2d(c.ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(c.ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)

    @torch.no_grad()
    def reset_parameters(self):
        """The official init (taming's weights_init): conv weights N(0, 0.02), conv biases at
        PyTorch's default, BatchNorm weights N(1, 0.02) and biases 0."""
        for m in self.main:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
        return self

    def forward(self, x):
        return self.main(x)


def discriminator_from_checkpoint(sd, source, device="cpu"):
    """The discriminator of a training checkpoint (loss.discriminator.*, running statistics
    included), in its own memory (it is trained further), in train mode."""
    sub = {k: v.clone() for k, v in sub_state_dict(sd, DISC_PREFIX).items()}
    try:
        config = DiscriminatorConfig.from_state_dict(sub)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{source}: {e}") from None
    return build(NLayerDiscriminator, config, sub, source, DISC_PREFIX, device).train()


# -------------------------------------------------------------------------------------------------
# The loss terms (reference decoder.md section 4.4). Images come as lists of groups: tensors
# [b, 3, H, W] in [-1, 1] that went through the networks together.


def reconstruction_loss(reals, recons, lpips, perceptual_weight, log=None):
    """Upstream's L_nll: sum over pixels of |x - x_hat| + w_p * LPIPS (LPIPS [b, 1, 1, 1] is
    broadcast over the pixels), divided by the number of images; per image this is
    ||x - x_hat||_1 + w_p * 3HW * LPIPS, evaluated in that closed form. `log` gets rec_loss (mean
    L1 per element), p_loss (mean LPIPS) and their image counts."""
    total, l1s, ps = 0.0, [], []
    for x, r in zip(reals, recons):
        per_image = (x - r).abs().flatten(1).sum(1)                              # [b]
        l1s.append(per_image.detach() / x[0].numel())
        if perceptual_weight > 0:
            p = lpips(x, r).flatten()                                           # [b]
            per_image = per_image + perceptual_weight * x[0].numel() * p
            ps.append(p.detach())
        total = total + per_image.sum()
    nll = total / sum(x.shape[0] for x in reals)
    if log is not None:
        log["rec_loss"] = torch.cat(l1s)
        if ps:
            log["p_loss"] = torch.cat(ps)
    return nll


def generator_adv_loss(logits_fake):
    """L_G = -mean D(x_hat), the mean over ALL logits of all groups jointly (upstream concatenates
    the flattened maps), so bigger images weigh more."""
    return -torch.cat([t.flatten() for t in logits_fake]).mean()


def hinge_d_loss(logits_real, logits_fake):
    """0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll, g_loss, last_layer, disc_weight=0.5, eps=1e-4, max_weight=1e4):
    """VQGAN's d_w = clamp(||dL_nll/dW|| / (||dL_G/dW|| + eps), 0, 1e4), detached, x disc_weight,
    W = decoder.conv_out.weight. Local: under DDP each rank has its own (as upstream)."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return torch.clamp(g_nll.norm() / (g_adv.norm() + eps), 0.0, max_weight).detach() * disc_weight


def gan_factor(iteration, disc_start):
    """f: 1 from iteration disc_start (0-based iterations) on, else 0 (taming's adopt_weight)."""
    return 1.0 if iteration >= disc_start else 0.0


def disc_start_from_lightning(global_steps):
    """Our disc_start for an official config's value: upstream's generator term switched on when
    global_step = 2 * iteration reached it. (For an odd value upstream's D term started one
    iteration before its G term; not reproduced.)"""
    return math.ceil(global_steps / 2)


def generator_loss(reals, recons, logits_fake, lpips, factor, last_layer, args):
    """L_AE = L_nll + d_w * f * L_G and its log. logits_fake None: no discriminator at all."""
    log = {}
    nll = reconstruction_loss(reals, recons, lpips, args.perceptual_weight, log)
    total, d_weight = nll, torch.zeros(())
    if logits_fake is not None:
        g_loss = generator_adv_loss(logits_fake)
        log["g_loss"] = g_loss.detach()
        if factor > 0:
            d_weight = adaptive_weight(nll, g_loss, last_layer, args.disc_weight)
            total = nll + d_weight * factor * g_loss
        log["d_weight"] = d_weight
    return total, log


def discriminator_loss(pairs, factor):
    """L_D = f * mean over groups of hinge(D(x), D(x_hat)); pairs: (logits real, logits fake) per
    group. Also while f = 0 (then 0 x the loss, with a graph: Adam still takes its step)."""
    d_loss = factor * torch.stack([hinge_d_loss(r, f) for r, f in pairs]).mean()
    log = {"disc_loss": d_loss.detach(),
           "logits_real": torch.stack([r.detach().mean() for r, _ in pairs]),
           "logits_fake": torch.stack([f.detach().mean() for _, f in pairs])}
    return d_loss, log


# -------------------------------------------------------------------------------------------------
# What is trained


class Trainable(nn.Module):
    """What the autoencoder optimiser trains, under the checkpoint's names: `decoder` and, for R,
    `extra_vit` (every parameter, its RoPE frequencies included). forward: per group, the raw
    DINOv3 features [b, 384, h, w] and (R) the ImageNet-normalised images -> reconstructions."""

    def __init__(self, decoder, extra_vit=None):
        super().__init__()
        self.decoder, self.extra_vit = decoder, extra_vit

    def latents(self, feats, pixels):
        """The decoder's input: DINO's features, for R with the matched residual channels."""
        if self.extra_vit is None:
            return feats
        B, _, h, w = feats.shape
        return with_residual(feats.flatten(2), self.extra_vit(pixels)).view(B, -1, h, w)

    def forward(self, feats, pixels):
        return [self.decoder(self.latents(f, x)) for f, x in zip(feats, pixels)]


class Critic(nn.Module):
    """The discriminator step's forward (one call, for DDP): D on every real group and, separately,
    on its detached reconstruction, so BatchNorm takes separate real and fake statistics (per
    image in the multi-resolution stages). -> [(logits real, logits fake)] per group."""

    def __init__(self, discriminator):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, reals, fakes):
        return [(self.discriminator(x), self.discriminator(r.detach()))
                for x, r in zip(reals, fakes)]


# -------------------------------------------------------------------------------------------------
# Setup: the source checkpoint, the frozen parts, the models


def source_file(path, what):
    """A checkpoint file: our run or checkpoint folder (its autoencoder.safetensors), or a file
    (the official svg_autoencoder-*.ckpt, a safetensors file with the same keys)."""
    path = Path(path)
    if path.is_dir():
        path = Path(checkpoint_folder(str(path))) / "autoencoder.safetensors"
    if not path.is_file():
        raise UsageError(f"{what}: {path} not found (expected a run or checkpoint folder of "
                         "train_autoencoder.py, or an SVG autoencoder .ckpt)")
    return path


def load_frozen(args, d, source, source_path):
    """DINOv3 (from --dinov3, else the source checkpoint's encoder.*) and LPIPS (choose_lpips)."""
    dino_path = args.dinov3 or (source_path if any(k.startswith("encoder.") for k in source)
                                else None)
    if dino_path is None:
        raise UsageError("no DINOv3 weights: pass --dinov3 "
                         "dinov3_vits16plus_pretrain_lvd1689m-*.pth (or --init-from a checkpoint "
                         "holding encoder.*)")
    dino = load_dinov3(dino_path, device=d.device)
    encoder = Autoencoder(None, dino).to(d.device).eval()
    return encoder, choose_lpips(args, source, source_path, d.device), str(dino_path)


def choose_lpips(args, source, source_path, device):
    """LPIPS from --vgg and --lpips, else from `source`'s loss.perceptual_loss.*; None with
    --perceptual-weight 0; else an error naming the files."""
    if args.perceptual_weight == 0:
        return None
    if args.vgg or args.lpips:
        if not (args.vgg and args.lpips):
            raise UsageError(f"LPIPS needs both files: --vgg {VGG_FILE} and --lpips {LIN_FILE}")
        return lpips_from_files(args.vgg, args.lpips, device)
    if any(k.startswith(LPIPS_PREFIX) for k in source):
        return lpips_from_checkpoint(source, str(source_path), device)
    raise UsageError(f"no LPIPS weights{f' in {source_path}' if source_path else ''}: {LPIPS_HINT}")


def model_configs(args, source, dino_dim, resuming):
    """The decoder's and (R) the residual ViT's configs: the source checkpoint's shapes where it
    has them, else the defaults, with --decoder-config / --residual-config on top (on --resume the
    checkpoint's shapes alone); z_channels follows DINOv3's width (+ the residual channels)."""
    dec = sub_state_dict(source, "decoder.")
    over = {} if resuming else args.decoder_config
    dcfg = dataclasses.replace(DecoderConfig.from_state_dict(dec) if dec else DecoderConfig(),
                               **over)
    rcfg = None
    if args.ae == "R":
        vit = sub_state_dict(source, "extra_vit.")
        over = {} if resuming else args.residual_config
        rcfg = dataclasses.replace(ResidualViTConfig.from_state_dict(residual_vit_keymap(vit))
                                   if vit else ResidualViTConfig(), **over)
    dcfg = dataclasses.replace(dcfg, z_channels=dino_dim + (rcfg.out_channels if rcfg else 0))
    return dcfg, rcfg


def build_models(args, d, source, source_name, dcfg, rcfg, resuming):
    """The trainable part (seeded init, then what fits of --init-from) and the discriminator
    (the source's, else a fresh one; none when --disc-weight is 0)."""
    torch.manual_seed(args.seed)
    with torch.device(d.device):
        vit = ResidualViT(rcfg).reset_parameters() if rcfg else None
        model = Trainable(Decoder(dcfg), vit)
    theirs = {"decoder." + k: v for k, v in decoder_keymap(sub_state_dict(source, "decoder."))
              .items()} if any(k.startswith("decoder.") for k in source) else {}
    if rcfg and any(k.startswith("extra_vit.") for k in source):
        theirs.update({"extra_vit." + k: v for k, v in residual_vit_keymap(source).items()})
    if resuming:
        try:
            model.load_state_dict(theirs, strict=True)
        except RuntimeError as e:
            raise UsageError(f"--resume {source_name}: the checkpoint does not fit --ae {args.ae} "
                             f"({str(e).splitlines()[1].strip()})") from None
    elif source:
        load_fitting(model, theirs, f"--init-from {source_name}", d)
    disc = None
    if args.disc_weight > 0:
        if any(k.startswith(DISC_PREFIX) for k in source):
            disc = discriminator_from_checkpoint(source, source_name, d.device)
            d.log(f"discriminator from {source_name}")
        else:
            with torch.device(d.device):
                disc = NLayerDiscriminator(DiscriminatorConfig()).reset_parameters()
    return model.train(), disc


def optimizers(args, model, disc):
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=ADAM_BETAS)
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=ADAM_BETAS) if disc else None
    return opt, opt_d


# -------------------------------------------------------------------------------------------------
# Checkpoints: the autoencoder in the official key layout, written atomically, resumed exactly


def autoencoder_state_dict(encoder, model, disc, lpips):
    """encoder.* (DINOv3, original layout), decoder.*, extra_vit.* (R), loss.discriminator.*,
    loss.perceptual_loss.* (official layout): what load_autoencoder reads and what --init-from
    fine-tunes again."""
    sd = {"encoder." + k: v for k, v in dinov3_official_state_dict(encoder.encoder).items()}
    sd.update(model.state_dict())
    if disc is not None:
        sd.update({DISC_PREFIX + k: v for k, v in disc.state_dict().items()})
    if lpips is not None:
        sd.update({LPIPS_PREFIX + k: v for k, v in lpips_official_state_dict(lpips).items()})
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def save(d, out, nets, opts, counters, skipped, run_info, args, stats=None):
    """OUT/ckpt-{step:07d}/: autoencoder.safetensors, optimizer.pt, state.pt (counters, every
    rank's generators and skipped count), run.json, and for R latent_stats.pt (when computed)."""
    encoder, model, disc, lpips = nets
    check_replicas(model, d)
    if disc is not None:
        check_replicas(disc, d)
    state = run_state(d, counters, skipped, seed=args.seed)
    if not d.main:
        return d.barrier()
    step = counters["step"]

    def write(folder):
        save_file(autoencoder_state_dict(encoder, model, disc, lpips),
                  str(folder / "autoencoder.safetensors"), metadata={"format": "pt"})
        torch.save({"ae": opts[0].state_dict(),
                    "disc": opts[1].state_dict() if opts[1] else None}, folder / "optimizer.pt")
        torch.save(state, folder / "state.pt")
        if stats is not None:
            torch.save(stats, folder / "latent_stats.pt")
        (folder / "run.json").write_text(json.dumps({**run_info, "step": step}, indent=1))
    d.log(f"saved {save_checkpoint(out, step, write, args.keep)}")
    d.barrier()


def resume_state(folder, opts, disc, d):
    """Optimisers, the discriminator's running statistics and the run state of a checkpoint (the
    weights were loaded with the models). Returns (step, position, this rank's skipped count)."""
    opt_state = torch.load(folder / "optimizer.pt", map_location=d.device, weights_only=True)
    opts[0].load_state_dict(opt_state["ae"])
    if opts[1] is not None:
        if opt_state["disc"] is None:
            raise UsageError(f"--resume {folder}: that run had no discriminator (--disc-weight 0)")
        opts[1].load_state_dict(opt_state["disc"])
    state, skipped = restore_run_state(folder, d)
    return state["step"], state["position"], skipped


def residual_stats(d, args, records, nets, path):
    """Autoencoder-R's latent statistics (384 + 8 channels; the official file format) of the
    data's bucket crops, each image encoded alone, by runs.compute_stats."""
    encoder, model = nets[0], nets[1]
    ae = Autoencoder(model.decoder, encoder.encoder, model.extra_vit)   # encode: no_grad

    def encode_images(images):
        return [ae.encode(im[None].to(d.device))[0].float() for im in images]
    n = min(len(records), args.stats_images)
    d.log(f"latent statistics of autoencoder-R: {n} images into {path}")
    compute_stats(d, records, range(n), crops_for(args.resolution), encode_images, None, 16, path)
    return torch.load(path, weights_only=True)


# -------------------------------------------------------------------------------------------------
# Reconstruction metrics (the official evaluate_tokenizer.py protocol)


def quantize(x):
    """Upstream's PNG values: clamp(127.5 x + 128, 0, 255), truncated to uint8 (which, with the
    +128, rounds 127.5 (x + 1) to the nearest integer)."""
    return (127.5 * x + 128).clamp(0, 255)


def psnr(a, b):
    """Per image PSNR [B] in dB between uint8 images, over all values; an exact match (MSE 0)
    counts as MSE 1e-10 (100 + 48 dB)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 20 * torch.log10(255.0 / mse.clamp_min(1e-10).sqrt())


def ssim(x, y, sigma=1.5):
    """Per image SSIM [B] of images in [-1, 1], as torchmetrics 1.8.2 (the official evaluation's
    StructuralSimilarityIndexMeasure(data_range=(-1, 1))): both clamped to [-1, 1], L = 2,
    C1 = (0.01 L)^2, C2 = (0.03 L)^2; an 11x11 Gaussian window (sigma 1.5) per channel on images
    reflect-padded by 5 px; variances clamped at 0; the whole map averaged (no border cut)."""
    x, y = x.clamp(-1, 1), y.clamp(-1, 1)
    C, c1, c2 = x.shape[1], (0.01 * 2) ** 2, (0.03 * 2) ** 2
    t = torch.arange(11, dtype=x.dtype, device=x.device) - 5
    g = torch.exp(-(t / sigma) ** 2 / 2)
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(C, 1, 11, 11)
    pad = lambda z: F.pad(z, (5, 5, 5, 5), mode="reflect")
    B = x.shape[0]
    moments = F.conv2d(torch.cat([pad(x), pad(y), pad(x * x), pad(y * y), pad(x * y)]), window,
                       groups=C).split(B)                       # 5 x [B, C, H, W]
    mx, my = moments[0], moments[1]
    vx = (moments[2] - mx ** 2).clamp_min(0)
    vy = (moments[3] - my ** 2).clamp_min(0)
    cov = moments[4] - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def reconstruction_metrics(ae, lpips, x):
    """(PSNR, SSIM, LPIPS or None) per image of a batch x [B, 3, 256, 256] in [-1, 1]: PSNR between
    the uint8 quantised reconstruction and input; SSIM and LPIPS, as upstream, between the input
    and q / 255 * 2 - 1 (the quantised value before truncation, i.e. x_hat + 1/255 clamped)."""
    q = quantize(ae.decode(ae.encode(x)).float())
    shown = q / 255 * 2 - 1
    p = psnr(q.to(torch.uint8), quantize(x).to(torch.uint8))
    lp = lpips(x, shown).flatten() if lpips is not None else None
    return p, ssim(shown, x), lp


def evaluate(args):
    """--eval: the reconstruction metrics of --ckpt over --data, printed; recorded in the run.json
    of a checkpoint folder of ours, under "eval" (keyed by data and limit)."""
    d = Dist.start(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = source_file(args.ckpt, "--ckpt")
    ae = load_autoencoder(path, dinov3_path=args.dinov3, device=d.device)
    if ae.encoder is None:
        raise UsageError(f"--ckpt {path} holds no encoder.*: pass --dinov3")
    lpips = choose_lpips(args, read_state_dict(path), path, d.device)
    records = open_records(args.data)
    n = min(len(records), args.limit or len(records))
    sums, t0 = torch.zeros(5, dtype=torch.float64), time.time()   # images, psnr, ssim, lpips, bad
    batch = 1 if ae.residual is not None else args.eval_batch   # R's matching: per image
    mine = list(range(d.rank, n, d.world))
    for start in range(0, len(mine), batch):
        images = []
        for i in mine[start:start + batch]:
            try:
                images.append(eval_crop(read_image(records[i]["path"]), args.eval_resolution))
            except Exception as e:
                d.warn(f"warning: eval skips {records.where(i)} ({describe(e)})")
                sums[4] += 1
        if images:
            p, s, lp = reconstruction_metrics(ae, lpips, torch.stack(images).to(d.device))
            sums[:4] += torch.tensor([len(images), p.sum(), s.sum(),
                                      lp.sum() if lp is not None else 0.0], dtype=torch.float64)
        d.log(f"eval: {min(start + batch, len(mine))}/{len(mine)} images of rank {d.rank}",
              end="\r")
    sums = d.all_reduce(sums)
    if sums[0] == 0:
        raise UsageError(f"--eval: none of {n} images in {args.data} could be read")
    result = {"psnr": sums[1].item() / sums[0].item(), "ssim": sums[2].item() / sums[0].item(),
              "lpips": sums[3].item() / sums[0].item() if lpips is not None else None,
              "images": int(sums[0]), "skipped": int(sums[4]), "resolution": args.eval_resolution,
              "data": os.path.abspath(args.data), "limit": args.limit}
    lp = "n/a (--perceptual-weight 0)" if lpips is None else f"{result['lpips']:.4f}"
    d.log(f"\n{path}: PSNR {result['psnr']:.2f} dB | SSIM {result['ssim']:.4f} | LPIPS {lp} | "
          f"{result['images']} images ({result['skipped']} unreadable) | "
          f"{fmt_time(time.time() - t0)}")
    if d.main:
        record_eval(path.parent / "run.json", result)
    return result


def record_eval(run_json, result):
    """Add the metrics to a checkpoint's run.json (ours only: official files have none)."""
    if not run_json.is_file():
        return
    run = json.loads(run_json.read_text())
    key = f"{result['data']}@{result['resolution']}" + (f":{result['limit']}" if result["limit"]
                                                        else "")
    run.setdefault("eval", {})[key] = {**result, "stage": run.get("stage"), "step": run.get("step")}
    text = json.dumps(run, indent=1)
    atomic_write(run_json, lambda tmp: tmp.write_text(text))


# -------------------------------------------------------------------------------------------------
# Progress


class Meter:
    """Sums of the logged terms over a log interval, reduced over ranks when reported (rank 0
    prints one line and appends OUT/log.jsonl)."""

    NAMES = ("rec_loss", "p_loss", "g_loss", "d_weight", "disc_loss", "logits_real",
             "logits_fake")

    def __init__(self, d, args, out):
        self.d, self.args, self.out, self.t_start = d, args, out, time.time()
        self.reset()

    def reset(self):
        self.sums = torch.zeros(2, len(self.NAMES), dtype=torch.float64)    # sums, counts
        self.steps, self.seconds, self.grad_norm = 0, 0.0, 0.0

    def add(self, log):
        for j, name in enumerate(self.NAMES):
            if name in log:
                v = log[name].detach().double().flatten().cpu()
                self.sums[0, j] += v.sum()
                self.sums[1, j] += v.numel()

    def step(self, grad_norm, seconds):
        self.steps, self.seconds = self.steps + 1, self.seconds + seconds
        self.grad_norm += grad_norm

    def report(self, step, skipped, factor):
        args, d = self.args, self.d
        vec = d.all_reduce(torch.cat([self.sums.flatten(), torch.tensor([float(skipped)],
                                                                        dtype=torch.float64)]))
        sums = vec[:-1].view(2, -1)
        mean = {n: (sums[0, j] / sums[1, j]).item() if sums[1, j] > 0 else None
                for j, n in enumerate(self.NAMES)}
        ips = self.steps * args.global_batch / self.seconds
        eta = (args.steps - step) * self.seconds / self.steps
        rec = {"step": step, **mean, "gan": factor > 0, "grad_norm": self.grad_norm / self.steps,
               "images_per_s": ips, "skipped": int(vec[-1]),
               "elapsed_s": time.time() - self.t_start}
        f = lambda n, fmt=".4f": "-" if mean[n] is None else format(mean[n], fmt)
        d.record(self.out, f"step {step}/{args.steps} ({100 * step / args.steps:.1f}%) | L1 "
                 f"{f('rec_loss')} LPIPS {f('p_loss')} | G {f('g_loss', '.3f')} d_w "
                 f"{f('d_weight', '.3g')} D {f('disc_loss', '.3f')} (real {f('logits_real', '.2f')}"
                 f" fake {f('logits_fake', '.2f')}) GAN {'on' if factor > 0 else 'off'} | grad "
                 f"{rec['grad_norm']:.3g} | {ips:.1f} img/s | skipped {rec['skipped']} | eta "
                 f"{fmt_time(eta)}", rec)
        self.reset()


# -------------------------------------------------------------------------------------------------
# Training


def groups_of(items, crops, device):
    """A micro-batch as the groups that go through the networks together: one tensor
    [m, 3, S, S] (fixed-size stages) or one [1, 3, h_i, w_i] per image (multi-resolution)."""
    images = [it["image"] for it in items]
    if crops == "fixed":
        return [torch.stack(images).to(device)]
    return [im[None].to(device) for im in images]


def setup(args, d):
    """Folders, the source checkpoint (--resume, else --init-from), frozen parts, models,
    optimisers, the run state."""
    out = open_run(args.out, args.resume, d)
    resume_dir = (resume_folder(args.resume, out, CHECKPOINT_FILES, d.warn) if args.resume
                  else None)
    source_path = (resume_dir / "autoencoder.safetensors" if resume_dir else
                   source_file(args.init_from, "--init-from") if args.init_from else None)
    source = read_state_dict(source_path) if source_path else {}
    if source and not any(k.startswith("decoder.") for k in source):
        raise UsageError(f"--init-from {source_path}: no decoder.* weights (not an SVG "
                         "autoencoder checkpoint)")
    encoder, lpips, dino_path = load_frozen(args, d, source, source_path)
    dcfg, rcfg = model_configs(args, source, encoder.encoder.config.dim, resume_dir is not None)
    model, disc = build_models(args, d, source, str(source_path), dcfg, rcfg,
                               resume_dir is not None)
    opts = optimizers(args, model, disc)
    step, position, skipped = 0, 0, 0
    if resume_dir is not None:
        step, position, skipped = resume_state(resume_dir, opts, disc, d)
        if d.main:      # the steps after the checkpoint will be logged again
            truncate_log(out / "log.jsonl", step)
    run_info = {"ae": args.ae, "stage": args.stage, "resolution": args.resolution,
                "crops": args.crops, "sources": {"dinov3": dino_path,
                                                 "init_from": args.init_from},
                "decoder": dataclasses.asdict(dcfg),
                "residual_vit": dataclasses.asdict(rcfg) if rcfg else None,
                "discriminator": dataclasses.asdict(disc.config) if disc else None,
                "lpips": dataclasses.asdict(lpips.config) if lpips else None,
                "args": {k: (str(v) if isinstance(v, torch.device) else v)
                         for k, v in vars(args).items()}}
    return out, (encoder, model, disc, lpips), opts, (step, position, skipped), run_info


def train(args):
    # Setup distributed
    d = Dist.start(args.device)
    args.device = d.device
    if args.threads:
        torch.set_num_threads(args.threads)
    local, accum = batch_plan(args, d)

    # Frozen parts, models, optimisers, the run state (resumed, or started from --init-from)
    records = open_records(args.data)
    out, nets, opts, (step, position, skipped), run_info = setup(args, d)
    encoder, model, disc, lpips = nets
    ddp_model = wrap_ddp(model, d)
    critic = wrap_ddp(Critic(disc), d) if disc is not None else None
    last_layer = model.decoder.conv_out.weight
    count = lambda m: f"{sum(p.numel() for p in m.parameters()):,} parameters"
    d.log(f"autoencoder-{args.ae}: {count(model)} trained ({model.decoder.config.z_channels} "
          f"latent channels); discriminator: {'none' if disc is None else count(disc)}; LPIPS: "
          f"{'none' if lpips is None else 'on'}")
    d.log(f"stage {args.stage}: {args.resolution}px {args.crops}, {args.steps} steps, global batch "
          f"{args.global_batch} = {d.world} ranks x {accum} x micro {args.micro_batch}, lr "
          f"{args.lr}, GAN from iteration {args.disc_start}, {len(records)} images")

    # Data: this rank's slice of the global positions still to come
    dataset = ImageSet(records, args.crops, args.resolution, args.seed)
    batches = data_stream(args, d, dataset, position, max(0, args.steps - step))

    # Loop
    meter, warned = Meter(d, args, out), (set(), set())
    with stop_on_signals() as stop:
        while step < args.steps:
            t0 = time.time()
            factor = gan_factor(step, args.disc_start)       # `step` = this iteration's index
            micro = [next(batches) for _ in range(accum)]
            skipped += warn_skipped([it for items in micro for it in items], records, warned, d)
            kept = autoencoder_step(micro, nets, ddp_model, opts[0], factor, last_layer, local,
                                    args, d, meter)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       args.grad_clip or math.inf)
            opts[0].step()
            if critic is not None:
                discriminator_step(kept, critic, opts[1], factor, local, d, meter)
            step += 1
            position += args.global_batch
            meter.step(float(grad_norm), time.time() - t0)

            # Log, save, stop
            reason = stop()
            stopping = d.all_sum(int(reason is not None)) > 0
            if step % args.log_every == 0 or step == args.steps or stopping:
                meter.report(step, skipped, factor)
            if step % args.save_every == 0 or step == args.steps or stopping:
                stats = None
                if args.ae == "R" and step == args.steps and args.stats_images > 0:
                    stats = residual_stats(d, args, records, nets, out / "latent_stats.pt")
                save(d, out, nets, opts, {"step": step, "position": position}, skipped,
                     run_info, args, stats)
            if stopping:
                d.log(f"stopped by {reason or 'another rank'} at step {step}: continue with "
                      "--resume")
                break
    if step >= args.steps:
        d.log(f"done: step {step}/{args.steps} ({fmt_time(time.time() - meter.t_start)} in this "
              f"process); checkpoints in {out}")
    return out


def autoencoder_step(micro, nets, ddp_model, opt, factor, last_layer, local, args, d, meter):
    """The decoder's (and ViT's) gradient of one step, accumulated over the micro-batches (DDP
    all-reduces at the last); returns each micro-batch's (images, detached reconstructions) for
    the discriminator's step."""
    encoder, model, disc, lpips = nets
    opt.zero_grad(set_to_none=True)
    if disc is not None:
        disc.requires_grad_(False)           # D takes no gradient in this pass (module docstring)
    kept = []
    for k, items in enumerate(micro):
        reals = groups_of(items, args.crops, d.device)
        with torch.no_grad():
            feats = [encoder.encode(x) for x in reals]
            pixels = [encoder.pixels(x) if args.ae == "R" else None for x in reals]
        last = k == len(micro) - 1
        sync = ddp_model.no_sync() if d.world > 1 and not last else contextlib.nullcontext()
        with sync:
            recons = ddp_model(feats, pixels)
            logits = None
            if disc is not None:
                with torch.set_grad_enabled(factor > 0):
                    logits = [disc(r) for r in recons]
            total, log = generator_loss(reals, recons, logits, lpips, factor, last_layer, args)
            (total * len(items) / local).backward()
        meter.add(log)
        kept.append((reals, [r.detach() for r in recons], len(items)))
    if disc is not None:
        disc.requires_grad_(True)
    return kept


def discriminator_step(kept, critic, opt, factor, local, d, meter):
    """One Adam step of the discriminator on the kept images and pre-update reconstructions."""
    opt.zero_grad(set_to_none=True)
    for k, (reals, fakes, n) in enumerate(kept):
        last = k == len(kept) - 1
        sync = critic.no_sync() if d.world > 1 and not last else contextlib.nullcontext()
        with sync:
            d_loss, log = discriminator_loss(critic(reals, fakes), factor)
            (d_loss * n / local).backward()
        meter.add(log)
    opt.step()


# -------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the SVG autoencoder's decoder (P) or decoder + "
                                            "residual ViT (R); --eval: reconstruction metrics.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--ae", choices=["P", "R"], default="P",
                   help="P: the decoder on DINOv3's 384 channels; R: + the residual ViT's 8")
    g.add_argument("--stage", type=int, default=1,
                   help="1-3: a Table 3 preset (resolution, data handling, steps, batch)")
    g.add_argument("--data", default=None,
                   help="a folder of images (searched recursively) or a .jsonl of {\"path\"}")
    g.add_argument("--out", default=None, help="output folder: checkpoints and logs")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                   help="continue exactly: from OUT's latest checkpoint, or the given folder")
    g.add_argument("--init-from", default=None, metavar="PATH",
                   help="start from a previous stage (run or checkpoint folder) or an official "
                        "svg_autoencoder-*.ckpt: its decoder (and ViT), discriminator, LPIPS and "
                        "DINOv3 where it has them")
    g.add_argument("--seed", type=int, default=0, help="init, data order and crops")
    g = p.add_argument_group("stage preset overrides")
    g.add_argument("--resolution", type=int, default=None, help="anchor resolution (px)")
    g.add_argument("--crops", choices=["fixed", "buckets"], default=None,
                   help="fixed: smallest side resized + random square crop, batched; buckets: "
                        "aspect buckets, one image per forward")
    g.add_argument("--steps", type=int, default=None, help="iterations of this stage")
    g.add_argument("--global-batch", type=int, default=None,
                   help="images per iteration, all ranks together")
    g = p.add_argument_group("recipe")
    g.add_argument("--micro-batch", type=int, default=None,
                   help="images per forward pass per rank (default: the whole local batch)")
    g.add_argument("--lr", type=float, default=None, help="Adam lr of both optimisers (1e-4)")
    g.add_argument("--perceptual-weight", type=float, default=None,
                   help="LPIPS weight w_p (1.0); 0: no LPIPS (no VGG files needed)")
    g.add_argument("--disc-weight", type=float, default=None,
                   help="times the adaptive weight (0.5); 0: no GAN and no discriminator")
    g.add_argument("--disc-start", type=int, default=None,
                   help="iteration (0-based) at which the GAN term starts (2500 = the official "
                        "disc_start: 5000 in Lightning steps)")
    g.add_argument("--grad-clip", type=float, default=0.0,
                   help="max gradient norm of the autoencoder (0: none, as upstream)")
    g.add_argument("--decoder-config", default=None,
                   help="JSON object of DecoderConfig overrides, e.g. '{\"ch\": 64}' (z_channels "
                        "follows the encoders)")
    g.add_argument("--residual-config", default=None,
                   help="--ae R: JSON object of ResidualViTConfig overrides")
    g = p.add_argument_group("frozen parts")
    g.add_argument("--dinov3", default=None,
                   help="DINOv3 ViT-S/16+ weights (default: the --init-from/--resume "
                        "checkpoint's encoder.*)")
    g.add_argument("--vgg", default=None, help=f"LPIPS trunk: torchvision's {VGG_FILE}")
    g.add_argument("--lpips", default=None, help=f"LPIPS linear layers: lpips' {LIN_FILE}")
    g.add_argument("--stats-images", type=int, default=None,
                   help="--ae R: images for the latent statistics written with the last "
                        "checkpoint (10000; 0: none)")
    g = p.add_argument_group("reconstruction metrics")
    g.add_argument("--eval", action="store_true",
                   help="print PSNR, SSIM and LPIPS of --ckpt on --data (resize 256, centre "
                        "crop 256, quantised reconstructions)")
    g.add_argument("--ckpt", default=None, help="--eval: a run or checkpoint folder, or a file")
    g.add_argument("--limit", type=int, default=None, help="--eval: the first N images only")
    g.add_argument("--eval-resolution", type=int, default=256, help="--eval: the crop size")
    g.add_argument("--eval-batch", type=int, default=16, help="--eval: images per forward")
    add_system_args(p)
    return p.parse_args(argv)


def json_object(text, what):
    if text is None:
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise UsageError(f"--{what}: a JSON object of fields, e.g. '{{\"ch\": 64}}'")
    return obj


def finish_args(args):
    """Fill the stage preset, check the values, make paths absolute."""
    if args.eval:
        if not args.data or not args.ckpt:
            raise UsageError("--eval needs --data (a folder or .jsonl of images) and --ckpt")
    elif not args.data or not args.out:
        raise UsageError("--data (a folder of images or a .jsonl) and --out DIR are required")
    if args.stage not in STAGES:
        raise UsageError(f"--stage {args.stage}: choose 1, 2 or 3 (Table 3)")
    for k, v in dict(STAGES[args.stage], **RECIPE).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.resolution < 16 or args.resolution % 16:
        raise UsageError(f"--resolution {args.resolution}: use a multiple of 16 (256, 512, 1024)")
    for name in ("steps", "global_batch", "save_every", "log_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    for name in ("perceptual_weight", "disc_weight", "disc_start", "stats_images", "lr"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be positive")
    args.decoder_config = json_object(args.decoder_config, "decoder-config")
    args.residual_config = json_object(args.residual_config, "residual-config")
    for cls, over, what in ((DecoderConfig, args.decoder_config, "decoder-config"),
                            (ResidualViTConfig, args.residual_config, "residual-config")):
        allowed = {f.name for f in dataclasses.fields(cls)} - {"z_channels"}
        bad = sorted(set(over) - allowed)
        if bad:
            raise UsageError(f"--{what}: unknown or fixed {cls.__name__} fields {bad}")
    return absolute_paths(args, ("data", "out", "init_from", "dinov3", "vgg", "lpips", "ckpt"))


def main(argv=None):
    args = parse_args(argv)
    with command_line("train_autoencoder.py"):
        args = finish_args(args)
        evaluate(args) if args.eval else train(args)


if __name__ == "__main__":
    main()
