"""Speed and peak memory of one autoencoder-P training step of stage 1 (256x256, fixed-size crops), full size.

    python bench/bench_ae_step.py [--batch 2] [--size 256] [--steps 2] [--device cpu|cuda] [--threads N]

Every part at its real size with random weights: DINOv3 ViT-S/16+ (frozen), the 43M decoder (trained), LPIPS VGG16
(frozen), the PatchGAN (trained). One step is train_autoencoder.py's own: the decoder's pass with the GAN on (so the
adaptive weight's two extra gradients are in it), its Adam update, the discriminator's pass and update. The first
step is a warm-up; images/s is over the timed ones. Memory: peak RssAnon (heap and activations; polled every 5 ms)
on the CPU, torch.cuda.max_memory_allocated on a GPU.
"""

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import train_autoencoder as T  # noqa: E402
from bench_decode_memory import PeakPoller, rss_anon_bytes  # noqa: E402
from decoder import Decoder, DecoderConfig  # noqa: E402
from dinov3 import DINOv3, DINOv3Config  # noqa: E402
from plumbing.runs import Dist, Meter  # noqa: E402
from svgt2i import Autoencoder  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    args = T.finish_args(T.parse_args(["--data", "-", "--out", "-", "--resolution", str(a.size),
                                       "--global-batch", str(a.batch), "--disc-start", "0"]))
    dist = Dist(device=device)
    torch.manual_seed(0)
    with torch.device(device):
        encoder = Autoencoder(None, DINOv3(DINOv3Config.vits16plus()).requires_grad_(False)).eval()
        model = T.TrainedAutoencoder(Decoder(DecoderConfig.autoencoder_p()))
        disc = T.NLayerDiscriminator(T.DiscriminatorConfig()).reset_parameters()
        lpips = T.LPIPS(T.LPIPSConfig()).eval()
    nets = T.Networks(encoder, model, disc, lpips)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=T.ADAM_BETAS)
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=T.ADAM_BETAS)
    meter = Meter(dist, T.LOGGED, args.steps, args.global_batch)
    items = [{"image": torch.rand(3, a.size, a.size) * 2 - 1} for _ in range(a.batch)]

    def step():         # train_autoencoder.train's iteration, on one micro-batch
        opt.zero_grad(set_to_none=True)
        real_and_fake = T.autoencoder_backward([items], nets, model, 1.0, a.batch, args, dist, meter)
        opt.step()
        opt_d.zero_grad(set_to_none=True)
        T.discriminator_backward(real_and_fake, T.RealFakeDiscriminator(disc), 1.0, a.batch, dist,
                                 meter)
        opt_d.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    base = rss_anon_bytes()
    t0 = time.perf_counter()
    step()
    warm = time.perf_counter() - t0
    with PeakPoller() as poll:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        dt = (time.perf_counter() - t0) / a.steps
    GB = 1024 ** 3
    count = lambda m: sum(p.numel() for p in m.parameters())
    print(f"autoencoder-P stage-1 step, {a.size}x{a.size}, batch {a.batch}, fp32, {device}, "
          f"{torch.get_num_threads()} threads: decoder {count(model):,} params, DINOv3 "
          f"{count(encoder):,}, LPIPS {count(lpips):,}, discriminator {count(disc):,}")
    print(f"warm-up step {warm:.1f} s; {dt:.1f} s per step = {a.batch / dt:.3f} images/s")
    if device.type == "cuda":
        print(f"peak GPU memory (max_memory_allocated) {torch.cuda.max_memory_allocated() / GB:.2f} GB")
    else:
        print(f"peak RssAnon {poll.peak / GB:.2f} GB (before the first step {base / GB:.2f} GB)")


if __name__ == "__main__":
    main()
