"""
Train the SVG autoencoder's pixel side, the paper's first stage: the conv decoder on frozen DINOv3
features (autoencoder-P), or the decoder plus the 8-channel residual ViT (autoencoder-R), with
L1 + LPIPS + an adaptive-weighted PatchGAN; and measure reconstructions (PSNR, SSIM, LPIPS).

    # P, stage 1 (256 px, fixed-size crops), one node of 8 GPUs, from scratch
    torchrun --nproc_per_node 8 train_autoencoder.py --stage 1 --data imagenet/train \\
        --out runs/ae1 --dinov3 pre-trained/dinov3_vits16plus_pretrain_lvd1689m-*.pth \\
        --vgg vgg16-397923af.pth --lpips vgg.pth
    # the multi-resolution stages start from the previous stage (frozen parts and loss weights
    # too), as a fine-tuning of the released svg_autoencoder-P-stage3.ckpt does; R: --ae R
    torchrun --nproc_per_node 8 train_autoencoder.py --stage 2 --data data.jsonl --out runs/ae2 \\
        --init-from runs/ae1               # continue a stopped run exactly: the same + --resume
    python train_autoencoder.py --eval --data imagenet/val --ckpt runs/ae1 --limit 5000  # metrics

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
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import ImageSet, crops_for, open_records
from decoder import Decoder, ResidualViT
from plumbing import cli, loading, release, runs
from svgt2i import Autoencoder, with_residual

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
ADAM_BETAS = (0.5, 0.9)    # both optimisers (--betas); no weight decay, no EMA, fp32
# the terms a log line and a log.jsonl record average over their interval
LOGGED = ("rec_loss", "p_loss", "g_loss", "d_weight", "disc_loss", "logits_real", "logits_fake")


# -------------------------------------------------------------------------------------------------
# LPIPS (VGG16), frozen: taming's layout, torchvision's trunk indices (files: plumbing.loading)


VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))   # (width, 3x3 convs) per stage
LPIPS_SHIFT, LPIPS_SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)


@dataclass
class LPIPSConfig:
    """The trunk's stages (a checkpoint's, from its shapes: plumbing.loading.lpips_config)."""
    stages: tuple = VGG16_STAGES    # each stage's last ReLU is a tap (relu1_2 ... relu5_3)


class VGG16Features(nn.Module):
    """The VGG16 conv trunk under torchvision's `features.{i}` names (no last max-pool, no
    classifier); forward returns each stage's last ReLU (features 3, 8, 15, 22, 29 for VGG16)."""

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
            outs += [x] if idx in self.taps else []
        return outs


class NetLinLayer(nn.Module):
    """1x1 conv to one channel, no bias. `model.1` keeps lpips' names; slot 0 was a Dropout, which
    LPIPS only ever ran in eval mode: an Identity, so no stray .train() can switch it on."""

    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


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
        shift, scale = (x.new_tensor(v).view(1, 3, 1, 1) for v in (LPIPS_SHIFT, LPIPS_SCALE))
        # one trunk pass over both images: VGG has no batch-dependent layer
        feats = self.net((torch.cat([x, y]) - shift) / scale)
        # lpips' normalize_tensor: x / (||x||_2 over channels + eps), eps outside the root
        unit = lambda f: f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        total = 0.0
        for k, f in enumerate(feats):
            fx, fy = f.chunk(2)                                                  # [B, C_k, h, w]
            diff = (unit(fx) - unit(fy)).pow(2)
            total = total + getattr(self, f"lin{k}")(diff).mean(dim=(2, 3), keepdim=True)
        return total                                                             # [B, 1, 1, 1]


# -------------------------------------------------------------------------------------------------
# The PatchGAN discriminator (taming's NLayerDiscriminator, BatchNorm), trained


@dataclass
class DiscriminatorConfig:
    """The PatchGAN's sizes (a checkpoint's: plumbing.loading.discriminator_config)."""
    in_channels: int = 3
    ndf: int = 64                   # first layer's width; doubles per layer, at most 8 x ndf
    n_layers: int = 3               # BatchNorm layers: 2,765,633 parameters with the defaults


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
            layers += [nn.Conv2d(c.ndf * prev, c.ndf * mult, 4, stride, padding=1, bias=False),
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


# -------------------------------------------------------------------------------------------------
# The loss terms (reference decoder.md section 4.4). Images come as lists of groups: tensors
# [b, 3, H, W] in [-1, 1] that went through the networks together.


def reconstruction_loss(reals, recons, lpips, perceptual_weight, log=None, l2_weight=0.0):
    """Upstream's L_nll: sum over pixels of |x - x_hat| + w_p * LPIPS (LPIPS [b, 1, 1, 1] is
    broadcast over the pixels), divided by the number of images; per image this is
    ||x - x_hat||_1 + w_p * 3HW * LPIPS, evaluated in that closed form. --l2-weight adds
    w_2 ||x - x_hat||_2^2 per image (not in the paper). `log` gets rec_loss (mean L1 per element),
    p_loss (mean LPIPS) and their image counts."""
    total, l1s, ps = 0.0, [], []
    for x, r in zip(reals, recons):
        per_image = (x - r).abs().flatten(1).sum(1)                              # [b]
        l1s.append(per_image.detach() / x[0].numel())
        if l2_weight > 0:
            per_image = per_image + l2_weight * (x - r).square().flatten(1).sum(1)
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
    """f: 1 from iteration disc_start (0-based; one decoder + one discriminator update) on, else 0
    (taming's adopt_weight). Upstream compared Lightning's global_step, 2 per iteration with two
    optimisers, against disc_start: 5000, so the released runs switched the GAN on at iteration
    2500, our default (a config's value v is ceil(v / 2) here). Each stage counts from 0."""
    return 1.0 if iteration >= disc_start else 0.0


def generator_loss(reals, recons, logits_fake, lpips, factor, last_layer, args):
    """L_AE = L_nll + d_w * f * L_G and its log. logits_fake None: no discriminator at all."""
    log = {}
    nll = reconstruction_loss(reals, recons, lpips, args.perceptual_weight, log, args.l2_weight)
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
# Training: what is trained, the discriminator's two passes, the networks of a run, the loop


class TrainedAutoencoder(nn.Module):
    """What the autoencoder's optimiser trains, under the checkpoint's names: `decoder` and, for R,
    `extra_vit` (its RoPE frequencies included). forward: per group, the raw DINOv3 features
    [b, 384, h, w] and (R) the ImageNet-normalised images -> reconstructions."""

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


class RealFakeDiscriminator(nn.Module):
    """The discriminator step's forward (one call, for DDP): D on every real group and, separately,
    on its detached reconstruction, so BatchNorm takes separate real and fake statistics (per
    image in the multi-resolution stages). -> [(logits real, logits fake)] per group."""

    def __init__(self, discriminator):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, reals, fakes):
        return [(self.discriminator(x), self.discriminator(r.detach()))
                for x, r in zip(reals, fakes)]


@dataclass
class Networks:
    """A run's networks (disc None: no GAN; lpips None: no perceptual term)."""
    encoder: Autoencoder            # the frozen DINOv3, as an Autoencoder: encode, pixels
    trained: TrainedAutoencoder
    disc: NLayerDiscriminator | None
    lpips: LPIPS | None


def build_networks(args, dist, source, source_path, resuming):
    """The frozen parts (plumbing.loading.autoencoder_frozen); the trained part, seeded, then the
    source's weights (all on --resume, else what fits); the discriminator, the source's or a fresh
    one (none at --disc-weight 0). Returns the Networks and the DINOv3 file."""
    encoder, lpips, dino_path = loading.autoencoder_frozen(args, source, source_path, dist.device)
    # the source's shapes, the flags' overrides on top (not on --resume)
    dcfg, rcfg = loading.autoencoder_configs(source, args.ae == "R", encoder.encoder.config.dim,
                                             {} if resuming else args.decoder_config,
                                             {} if resuming else args.residual_config)
    torch.manual_seed(args.seed)
    with torch.device(dist.device):
        vit = ResidualViT(rcfg).reset_parameters() if rcfg else None
        model = TrainedAutoencoder(Decoder(dcfg), vit)
    weights, name = loading.trained_weights(source, rcfg is not None), str(source_path)
    if resuming:
        runs.load_exactly(model, weights, f"--resume {name}: the checkpoint does not fit --ae "
                                          f"{args.ae}")
    elif source:
        runs.load_fitting(model, weights, f"--init-from {name}", dist)
    disc = None
    if args.disc_weight > 0 and any(k.startswith(loading.DISC_PREFIX) for k in source):
        disc = loading.discriminator_from_checkpoint(source, name, dist.device)
        dist.log(f"discriminator from {name}")
    elif args.disc_weight > 0:
        with torch.device(dist.device):
            disc = NLayerDiscriminator(DiscriminatorConfig()).reset_parameters()
    return Networks(encoder, model.train(), disc, lpips), dino_path


def train(args):
    """A training run (the module docstring says what one iteration does); returns OUT."""
    # Setup distributed
    dist = runs.Dist.start(args.device)
    args.device = dist.device
    if args.threads:
        torch.set_num_threads(args.threads)
    per_rank, accum = runs.batch_plan(args, dist)
    records = open_records(args.data)

    # Setup the run folder and the checkpoint the run starts from: --resume's, else --init-from's
    out = runs.open_run(args.out, args.resume, dist)
    resume_dir = runs.checkpoint_to_resume(args.resume, out, release.AUTOENCODER_CHECKPOINT_FILES,
                                           dist.warn) if args.resume else None
    source, source_path = loading.autoencoder_source(resume_dir, args.init_from)

    # Setup the networks and their optimisers
    nets, dino_path = build_networks(args, dist, source, source_path, resume_dir is not None)
    model, disc = nets.trained, nets.disc
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=args.betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=args.betas) if disc else None

    # Setup the run state: new, or resumed (counters, optimisers, every rank's generators)
    step = position = skipped = 0       # skipped: this rank's unreadable images
    if resume_dir:
        loading.read_autoencoder_optimizers(resume_dir, opt, opt_d, dist.device)
        state, skipped = runs.restore_state(resume_dir, dist, out / "log.jsonl")
        step, position = state["step"], state["position"]
    run_info = loading.autoencoder_run_record(args, dino_path, model, disc, nets.lpips)
    ddp_model = runs.wrap_ddp(model, dist)
    ddp_disc = runs.wrap_ddp(RealFakeDiscriminator(disc), dist) if disc is not None else None
    count = lambda m: f"{sum(p.numel() for p in m.parameters()):,} parameters"
    dist.log(f"autoencoder-{args.ae}: {count(model)} trained ({model.decoder.config.z_channels} "
             f"latent channels); discriminator: {'none' if disc is None else count(disc)}; "
             f"LPIPS: {'none' if nets.lpips is None else 'on'}")
    dist.log(f"stage {args.stage}: {args.resolution}px {args.crops}, {args.steps} steps, global "
             f"batch {args.global_batch} = {dist.world} ranks x {accum} x micro "
             f"{args.micro_batch}, lr {args.lr} ({args.lr_schedule}), "
             f"{'no GAN' if disc is None else f'GAN from iteration {args.disc_start}'}, "
             f"{len(records)} images")

    # Setup the data: this rank's slice of the global positions still to come
    dataset = ImageSet(records, args.crops, args.resolution, args.seed)
    batches = runs.data_stream(args, dist, dataset, position, max(0, args.steps - step))

    # Training loop: an iteration is one step of the autoencoder, then one of the discriminator
    meter, warned = runs.Meter(dist, LOGGED, args.steps, args.global_batch), (set(), set())
    with runs.stop_on_signals() as stop:
        while step < args.steps:
            t0 = time.time()
            factor = gan_factor(step, args.disc_start)       # `step` = this iteration's index
            micro = [next(batches) for _ in range(accum)]
            skipped += runs.warn_skipped([it for m in micro for it in m], records, warned, dist)

            # The autoencoder's step: its gradient over the micro-batches, clipped, one Adam step
            for group in [g for o in (opt, opt_d) if o is not None for g in o.param_groups]:
                group.update(lr=lr_at(step, args), betas=args.betas)   # (a resumed run's too)
            opt.zero_grad(set_to_none=True)
            real_and_fake = autoencoder_backward(micro, nets, ddp_model, factor, per_rank, args,
                                                 dist, meter)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       args.grad_clip or math.inf)   # 0: off
            runs.check_finite(step + 1, {"gradient norm": float(grad_norm)})   # (else: stop)
            opt.step()

            # The discriminator's step, on the same images and their pre-update reconstructions
            if ddp_disc is not None:
                opt_d.zero_grad(set_to_none=True)
                discriminator_backward(real_and_fake, ddp_disc, factor, per_rank, dist, meter)
                d_norm = torch.nn.utils.get_total_norm([p.grad for p in disc.parameters()
                                                        if p.grad is not None])
                runs.check_finite(step + 1, {"discriminator's gradient norm": float(d_norm)})
                opt_d.step()
            step += 1
            position += args.global_batch
            meter.step(float(grad_norm), time.time() - t0)

            # Log, save, stop (on a signal: save, and go on later with --resume)
            counters = {"step": step, "position": position}
            if runs.end_of_step(dist, args, step, stop,
                                lambda: report(dist, meter, out, args, step, skipped, factor),
                                lambda: save(dist, args, out, records, nets, (opt, opt_d),
                                             counters, skipped, run_info)):
                break
    runs.end_of_run(dist, step, args, meter.t_start, out)
    return out


def lr_at(step, args):
    """The lr of iteration `step` (0-based): constant (the paper's), or --lr-schedule cosine's
    half cosine from --lr down to 0 at --steps."""
    if args.lr_schedule == "constant":
        return args.lr
    return 0.5 * args.lr * (1 + math.cos(math.pi * step / args.steps))


def autoencoder_backward(micro, nets, ddp_model, factor, per_rank, args, dist, meter):
    """The decoder's (and ViT's) gradient of one step over the micro-batches (DDP all-reduces at
    the last); returns, per micro-batch, (images, detached reconstructions, image count)."""
    if nets.disc is not None:
        nets.disc.requires_grad_(False)     # D takes no gradient in this pass (module docstring)
    real_and_fake = []
    for k, items in enumerate(micro):
        # the groups: the micro-batch as one tensor [m, 3, S, S] (fixed), or each image (buckets)
        images = [it["image"] for it in items]
        reals = ([torch.stack(images).to(dist.device)] if args.crops == "fixed" else
                 [im[None].to(dist.device) for im in images])
        with torch.no_grad():
            feats = [nets.encoder.encode(x) for x in reals]
            pixels = [nets.encoder.pixels(x) if args.ae == "R" else None for x in reals]
        with ddp_model.no_sync() if dist.world > 1 and k < len(micro) - 1 else nullcontext():
            recons = ddp_model(feats, pixels)
            with torch.set_grad_enabled(factor > 0):            # (no discriminator: no L_G)
                logits = [nets.disc(r) for r in recons] if nets.disc is not None else None
            total, log = generator_loss(reals, recons, logits, nets.lpips, factor,
                                        nets.trained.decoder.conv_out.weight, args)
            (total * len(items) / per_rank).backward()
        meter.add(**log)
        real_and_fake.append((reals, [r.detach() for r in recons], len(items)))
    if nets.disc is not None:
        nets.disc.requires_grad_(True)
    return real_and_fake


def discriminator_backward(real_and_fake, ddp_disc, factor, per_rank, dist, meter):
    """The discriminator's gradient of one step, on the images and pre-update reconstructions of
    every micro-batch (DDP all-reduces at the last)."""
    last = len(real_and_fake) - 1
    for k, (reals, fakes, n) in enumerate(real_and_fake):
        with ddp_disc.no_sync() if dist.world > 1 and k < last else nullcontext():
            d_loss, log = discriminator_loss(ddp_disc(reals, fakes), factor)
            (d_loss * n / per_rank).backward()
        meter.add(**log)


def report(dist, meter, out, args, step, skipped, factor):
    """The interval's means (every rank reduces them): one line, one log.jsonl record (rank 0)."""
    r = meter.report(step, skipped)
    rec = {"step": step, **{n: r[n] for n in LOGGED}, "gan": factor > 0,
           **{k: r[k] for k in ("grad_norm", "images_per_s", "skipped", "elapsed_s")}}
    f = lambda n, fmt=".4f": "-" if r[n] is None else format(r[n], fmt)
    dist.record(out, f"step {step}/{args.steps} ({100 * step / args.steps:.1f}%) | L1 "
                f"{f('rec_loss')} LPIPS {f('p_loss')} | G {f('g_loss', '.3f')} d_w "
                f"{f('d_weight', '.3g')} D {f('disc_loss', '.3f')} (real {f('logits_real', '.2f')}"
                f" fake {f('logits_fake', '.2f')}) GAN {'on' if factor > 0 else 'off'} | grad "
                f"{r['grad_norm']:.3g} | {r['images_per_s']:.1f} img/s | skipped {r['skipped']} | "
                f"eta {runs.fmt_time(r['eta_s'])}", rec)


def save(dist, args, out, records, nets, opts, counters, skipped, run_info):
    """OUT/ckpt-{step:07d}/ (plumbing.runs.write_checkpoint): autoencoder.safetensors in the
    official layout, optimizer.pt, state.pt, run.json; for R at the last step latent_stats.pt."""
    stats = None
    if args.ae == "R" and counters["step"] == args.steps and args.stats_images > 0:
        stats = residual_stats(dist, args, records, nets, out / "latent_stats.pt")
    for net in [m for m in (nets.trained, nets.disc) if m is not None]:
        runs.check_replicas(net, dist)

    def write_weights(folder):                  # autoencoder.safetensors, optimizer.pt: rank 0
        if dist.main:
            loading.write_autoencoder_checkpoint(folder, nets.encoder.encoder, nets.trained,
                                                 nets.disc, nets.lpips, *opts)
    runs.write_checkpoint(dist, out, args.keep, counters, skipped, run_info, write_weights, stats,
                          seed=args.seed)


def residual_stats(dist, args, records, nets, path):
    """Autoencoder-R's latent statistics (384 + 8 channels; the official file format) of the
    data's bucket crops, each image encoded alone (plumbing.runs.compute_stats), into `path`."""
    ae = Autoencoder(nets.trained.decoder, nets.encoder.encoder, nets.trained.extra_vit)
    encode = lambda images: [ae.encode(im[None].to(dist.device))[0].float() for im in images]
    n = min(len(records), args.stats_images)
    dist.log(f"latent statistics of autoencoder-R: {n} images into {path}")
    runs.compute_stats(dist, records, range(n), crops_for(args.resolution), encode, None, 16, path)
    return path


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
    """--eval: reconstruction_metrics of --ckpt over --data (the loop: plumbing.runs)."""
    return runs.evaluate_autoencoder(args, reconstruction_metrics)


# -------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the SVG autoencoder's decoder (P) or decoder + "
                                "residual ViT (R); --eval: reconstruction metrics.",
                                formatter_class=cli.HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--ae", choices=["P", "R"], default="P",
                   help="P: the decoder on DINOv3's 384 channels; R: + the residual ViT's 8")
    g.add_argument("--stage", type=int, default=1,
                   help="1-3: a Table 3 preset (resolution, data handling, steps, batch)")
    g.add_argument("--data",
                   help='a folder of images (searched recursively) or a .jsonl of {"path"}')
    g.add_argument("--out", help="output folder: checkpoints and logs")
    g.add_argument("--resume", nargs="?", const="latest", metavar="DIR",
                   help="continue exactly: from OUT's latest checkpoint, or the given folder")
    g.add_argument("--init-from", metavar="PATH",
                   help="start from a previous stage (run or checkpoint folder) or an official "
                        "svg_autoencoder-*.ckpt: its decoder (and ViT), discriminator, LPIPS and "
                        "DINOv3 where it has them")
    g.add_argument("--seed", type=int, default=0, help="init, data order and crops")
    g = p.add_argument_group("stage preset overrides")
    g.add_argument("--resolution", type=int, help="anchor resolution (px)")
    g.add_argument("--crops", choices=["fixed", "buckets"], help="fixed: smallest side resized + "
                   "random square crop, batched; buckets: aspect buckets, one image per forward")
    g.add_argument("--steps", type=int, help="iterations of this stage")
    g.add_argument("--global-batch", type=int, help="images per iteration, all ranks together")
    g = p.add_argument_group("recipe")
    g.add_argument("--micro-batch", type=int,
                   help="images per forward pass per rank (default: the whole local batch)")
    g.add_argument("--lr", type=float, help="Adam lr of both optimisers (1e-4)")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="constant (the paper's), or cosine: a half cosine from --lr to 0")
    g.add_argument("--betas", default=",".join(map(str, ADAM_BETAS)),
                   help="Adam's beta1,beta2 of both optimisers")
    g.add_argument("--l2-weight", type=float, default=0.0, help="weight of a squared-error term "
                   "summed over each image's pixels, as the L1 is (0: none, as the paper)")
    g.add_argument("--perceptual-weight", type=float,
                   help="LPIPS weight w_p (1.0); 0: no LPIPS (no VGG files needed)")
    g.add_argument("--disc-weight", type=float,
                   help="times the adaptive weight (0.5); 0: no GAN and no discriminator")
    g.add_argument("--disc-start", type=int, help="iteration (0-based) at which the GAN term "
                   "starts (2500 = the official disc_start: 5000 in Lightning steps)")
    g.add_argument("--grad-clip", type=float, default=0.0,
                   help="max gradient norm of the autoencoder (0: none, as upstream)")
    g.add_argument("--decoder-config", help="JSON object of DecoderConfig overrides, e.g. "
                   "'{\"ch\": 64}' (z_channels follows the encoders)")
    g.add_argument("--residual-config", help="--ae R: JSON object of ResidualViTConfig overrides")
    g = p.add_argument_group("frozen parts")
    g.add_argument("--dinov3", help="DINOv3 ViT-S/16+ weights (default: the --init-from/--resume "
                   "checkpoint's encoder.*)")
    g.add_argument("--vgg", help=f"LPIPS trunk: torchvision's {release.VGG_FILE}")
    g.add_argument("--lpips", help=f"LPIPS linear layers: lpips' {release.LIN_FILE}")
    g.add_argument("--stats-images", type=int, help="--ae R: images for the latent statistics "
                   "written with the last checkpoint (10000; 0: none)")
    g = p.add_argument_group("reconstruction metrics")
    g.add_argument("--eval", action="store_true", help="print PSNR, SSIM and LPIPS of --ckpt on "
                   "--data (resize 256, centre crop 256, quantised reconstructions)")
    g.add_argument("--ckpt", help="--eval: a run or checkpoint folder, or a file")
    g.add_argument("--limit", type=int, help="--eval: the first N images only")
    g.add_argument("--eval-resolution", type=int, default=256, help="--eval: the crop size")
    g.add_argument("--eval-batch", type=int, default=16, help="--eval: images per forward")
    cli.add_system_args(p)
    return p.parse_args(argv)


def finish_args(args):
    """The stage's preset and the recipe fill the flags left unset; then plumbing's checks."""
    return cli.check_autoencoder_args(args, STAGES, RECIPE)


def main(argv=None):
    """The command line (toy.py calls it with its own argument list): train, or --eval."""
    args = parse_args(argv)
    with cli.command_line("train_autoencoder.py"):
        args = finish_args(args)
        return evaluate(args) if args.eval else train(args)


if __name__ == "__main__":
    main()
