"""train_autoencoder.py: every loss term against hand-derived values, LPIPS and the PatchGAN in the official layouts,
and whole tiny runs on the CPU: L1 falls, a killed run resumes bit for bit, two DDP processes match one, R's
distribution matching, the output loads everywhere the project reads an autoencoder, the reconstruction metrics."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from plumbing import files, loading
import data
import sample
import svgt2i
import train
import train_autoencoder as T
from decoder import DecoderConfig, ResidualViT, ResidualViTConfig
from tiny_autoencoder import write_lightning_ckpt
from tiny_dinov3 import random_official_state_dict, write_official_pth
from train_harness import instruments
from train_helpers import DINO, adam_reach, write_dataset, write_tiny_gemma

ROOT = Path(__file__).resolve().parents[1]
TINY_DECODER = DecoderConfig(z_channels=DINO.dim, ch=32, num_res_blocks=0)
TINY_VIT = ResidualViTConfig(dim=64, depth=1, num_heads=1, mlp_hidden=64)
TINY_VGG = ((4, 2), (4, 2), (8, 3), (8, 3), (8, 3))      # VGG16's layer indices, tiny widths
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
OFFICIAL_DISC = (                                         # upstream's loss.discriminator.* (reference 4.4)
    [("main.0.weight", (64, 3, 4, 4)), ("main.0.bias", (64,)), ("main.2.weight", (128, 64, 4, 4))]
    + [(f"main.3.{n}", () if n == "num_batches_tracked" else (128,)) for n in BN]
    + [("main.5.weight", (256, 128, 4, 4))]
    + [(f"main.6.{n}", () if n == "num_batches_tracked" else (256,)) for n in BN]
    + [("main.8.weight", (512, 256, 4, 4))]
    + [(f"main.9.{n}", () if n == "num_batches_tracked" else (512,)) for n in BN]
    + [("main.11.weight", (1, 512, 4, 4)), ("main.11.bias", (1,))])
TV_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
            (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]


pytestmark = pytest.mark.usefixtures("one_thread")     # conftest.py: tiny runs, one intra-op thread


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("ae"))


def make_world(root):
    """Eight images of three aspect ratios, a tiny DINOv3 (.pth) and tiny official Lightning checkpoints (P and R,
    with loss.* at tiny widths) sharing that DINOv3."""
    jsonl, _ = write_dataset(root / "data", n=8, sizes=((128, 128), (192, 80), (80, 192)))
    dino_sd = random_official_state_dict(DINO, 0)
    write_official_pth(root / "dinov3.pth", config=DINO, state_dict=dino_sd)
    p = write_lightning_ckpt(root / "svg_autoencoder-P-stage3.ckpt", "P", encoder_sd=dino_sd, seed=1,
                             decoder_config=TINY_DECODER)
    r = write_lightning_ckpt(root / "svg_autoencoder-R-stage3.ckpt", "R", encoder_sd=dino_sd, seed=2,
                             residual_config=TINY_VIT,
                             decoder_config=DecoderConfig(z_channels=DINO.dim + 8, ch=32, num_res_blocks=0))
    fresh_d = root / "without_discriminator.ckpt"     # the same, minus loss.discriminator.*: a fresh, full-size D
    torch.save({"state_dict": {k: v for k, v in p["state_dict"].items() if not k.startswith(loading.DISC_PREFIX)}},
               fresh_d)
    return {"root": root, "data": jsonl, "folder": str(root / "data"), "dinov3": str(root / "dinov3.pth"),
            "P": p, "R": r, "P_fresh_d": str(fresh_d)}


def args_for(w, out, *extra, steps=4, batch=4, init=None):
    """A tiny P run at 32 px from the official-layout checkpoint (decoder, discriminator, LPIPS, DINOv3 from it)."""
    return ["--data", w["data"], "--out", str(out), "--init-from", init or w["P"]["path"], "--resolution", "32",
            "--steps", str(steps), "--global-batch", str(batch), "--log-every", "1", "--workers", "0",
            "--lr", "1e-3", *extra]


def log_records(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def ckpt(out, step):
    return Path(out) / f"ckpt-{step:07d}"


def run_cli(args, torchrun=None, instrument=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = ([str(ROOT / "tests" / "train_harness.py"), "--trainer", "train_autoencoder", *instrument, "--"]
              if instrument else [str(ROOT / "train_autoencoder.py")])
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                              if torchrun else []) + script + list(args)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def imgs(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------------------
# LPIPS

def official_lpips_sd(tv, lin):
    """torchvision-layout trunk + lpips-layout lins -> taming's loss.perceptual_loss.* (global index per slice)."""
    _, trunk_stages = conv_layout(tv)
    sd = {"loss.perceptual_loss.scaling_layer.shift": torch.tensor(T.LPIPS_SHIFT).view(1, 3, 1, 1),
          "loss.perceptual_loss.scaling_layer.scale": torch.tensor(T.LPIPS_SCALE).view(1, 3, 1, 1)}
    for k, v in tv.items():
        if k.startswith("features."):
            i, p = k.split(".")[1:]
            sd[f"loss.perceptual_loss.net.slice{trunk_stages[int(i)]}.{i}.{p}"] = v
    sd.update({"loss.perceptual_loss." + k: v for k, v in lin.items()})
    return sd


def conv_layout(tv):
    idxs = sorted({int(k.split(".")[1]) for k in tv if k.startswith("features.")})
    stage, stages = 1, {}
    for a, b in zip([None] + idxs, idxs):
        stage += a is not None and b - a != 2
        stages[b] = stage
    return idxs, stages


def random_lpips_files(stages, seed=0):
    """Random trunk/lin tensors keyed like torchvision's vgg16-*.pth (with a classifier) and lpips' vgg.pth."""
    g = torch.Generator().manual_seed(seed)
    tv, lin, cin, pos = {}, {}, 3, 0
    for s, (cout, n) in enumerate(stages):
        pos += s > 0
        for _ in range(n):
            tv[f"features.{pos}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.3
            tv[f"features.{pos}.bias"] = torch.randn(cout, generator=g) * 0.1
            cin, pos = cout, pos + 2
        lin[f"lin{s}.model.1.weight"] = torch.rand(1, cout, 1, 1, generator=g)
    tv["classifier.0.weight"], tv["classifier.0.bias"] = torch.randn(5, 7, generator=g), torch.randn(5, generator=g)
    return tv, lin


@pytest.fixture(scope="module")
def tiny_lpips(world):
    return loading.lpips_from_checkpoint(files.read_state_dict(world["P"]["path"]), "tiny")


def test_lpips_is_zero_on_equal_images_symmetric_and_positive(tiny_lpips):
    x, y = imgs(3, 3, 32, 32, seed=1), imgs(3, 3, 32, 32, seed=2)
    assert tiny_lpips.config.stages == ((2, 2), (4, 2), (8, 3), (16, 3), (16, 3))    # inferred from the shapes
    assert tiny_lpips(x, x).shape == (3, 1, 1, 1) and torch.all(tiny_lpips(x, x) == 0)
    torch.testing.assert_close(tiny_lpips(x, y), tiny_lpips(y, x), rtol=1e-6, atol=0)
    assert torch.all(tiny_lpips(x, y) > 0)
    torch.testing.assert_close(tiny_lpips(x[1:2], y[1:2]), tiny_lpips(x, y)[1:2], rtol=1e-6, atol=1e-9)
    yg = y.clone().requires_grad_(True)
    tiny_lpips(x, yg).sum().backward()
    assert yg.grad.abs().sum() > 0 and all(p.grad is None and not p.requires_grad for p in tiny_lpips.parameters())


def test_lpips_two_layers_by_hand():
    """One channel per layer, each conv picking the centre of its input: unit-normalising gives 1 where the ReLU is
    on and 0 where it is off, so LPIPS = sum_k w_k * (fraction of positions where exactly one image is on)."""
    pick = lambda cin: torch.zeros(1, cin, 3, 3).index_put_((torch.tensor(0), torch.tensor(0), torch.tensor(1),
                                                             torch.tensor(1)), torch.tensor(1.0))
    p = "loss.perceptual_loss."
    sd = {p + "net.slice1.0.weight": pick(3), p + "net.slice1.0.bias": torch.zeros(1),
          p + "net.slice2.3.weight": pick(1), p + "net.slice2.3.bias": torch.zeros(1),
          p + "lin0.model.1.weight": torch.full((1, 1, 1, 1), 2.0), p + "lin1.model.1.weight": torch.full((1, 1, 1, 1), 3.0)}
    m = loading.lpips_from_checkpoint(sd, "by hand")
    assert m.config.stages == ((1, 1), (1, 1))
    x = torch.full((1, 3, 4, 4), 0.5)        # channel 0 whitened: (0.5 + 0.03) / 0.458 > 0 everywhere
    y = x.clone()
    y[0, 0, :2, :2] = -0.5                   # a whole 2x2 pooling block off: off at layer 2 as well
    y[0, 0, 3, 3] = -0.5                     # one pixel of another block: that block's max stays on
    assert m(x, y).item() == pytest.approx(2.0 * 5 / 16 + 3.0 * 1 / 4, abs=1e-6)     # = 1.375


def test_lpips_matches_its_definition(tmp_path):
    """Two stages of random width-5/6 convs against the definition in explicit tensor math."""
    tv, lin = random_lpips_files(((5, 1), (6, 1)), seed=7)
    torch.save(tv, tmp_path / "tv.pth")
    torch.save(lin, tmp_path / "lin.pth")
    m = loading.lpips_from_files(tmp_path / "tv.pth", tmp_path / "lin.pth")
    x, y = imgs(2, 3, 8, 12, seed=8), imgs(2, 3, 8, 12, seed=9)

    def conv3(t, w, b):                                              # unfold-based 3x3 conv, padding 1
        cols = F.unfold(t, 3, padding=1)
        return (torch.einsum("ok,bkl->bol", w.flatten(1), cols) + b[None, :, None]).view(t.shape[0], -1, *t.shape[2:])

    def trunk(t):
        t = (t - torch.tensor(T.LPIPS_SHIFT).view(1, 3, 1, 1)) / torch.tensor(T.LPIPS_SCALE).view(1, 3, 1, 1)
        a1 = conv3(t, tv["features.0.weight"], tv["features.0.bias"]).clamp_min(0)
        b, c, h, w = a1.shape
        pooled = a1.view(b, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))
        return a1, conv3(pooled, tv["features.3.weight"], tv["features.3.bias"]).clamp_min(0)

    ref = 0
    for fx, fy, k in zip(trunk(x), trunk(y), range(2)):
        nx, ny = (f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for f in (fx, fy))
        ref = ref + torch.einsum("c,bchw->bhw", lin[f"lin{k}.model.1.weight"].flatten(), (nx - ny) ** 2).mean((1, 2))
    torch.testing.assert_close(m(x, y).flatten(), ref, rtol=1e-5, atol=1e-7)


def test_vgg16_trunk_has_torchvisions_layout_and_the_official_key_map_is_exact():
    with torch.device("meta"):
        m = T.LPIPS(T.LPIPSConfig())
    trunk = {k: tuple(v.shape) for k, v in m.net.state_dict().items()}
    assert trunk == {f"features.{i}.{p}": ((o, c, 3, 3) if p == "weight" else (o,)) for i, c, o in TV_CONVS
                     for p in ("weight", "bias")}
    assert m.net.taps == (3, 8, 15, 22, 29)
    assert [i for i, layer in enumerate(m.net.features) if isinstance(layer, nn.MaxPool2d)] == [4, 9, 16, 23]
    official = set(loading.lpips_official_state_dict(m))
    assert official == ({"scaling_layer.shift", "scaling_layer.scale"} | {f"lin{k}.model.1.weight" for k in range(5)}
                        | {f"net.slice{s}.{i}.{p}" for s, idxs in ((1, (0, 2)), (2, (5, 7)), (3, (10, 12, 14)),
                                                                    (4, (17, 19, 21)), (5, (24, 26, 28)))
                           for i in idxs for p in ("weight", "bias")})
    assert sum(p.numel() for p in m.parameters()) == 14_716_160    # VGG16 convs 14,714,688 + lins 1,472


def test_lpips_loads_the_same_from_every_layout(tmp_path):
    tv, lin = random_lpips_files(TINY_VGG, seed=11)
    torch.save(tv, tmp_path / "vgg16-397923af.pth", _use_new_zipfile_serialization=False)   # legacy, as the real
    torch.save({**lin, "lins.0.model.1.weight": lin["lin0.model.1.weight"]}, tmp_path / "vgg.pth")
    official = official_lpips_sd(tv, lin)
    torch.save({"state_dict": {**official, "decoder.conv_in.weight": torch.zeros(1)}, "global_step": 4},
               tmp_path / "official.ckpt")
    a = loading.lpips_from_files(tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth")
    b = loading.lpips_from_checkpoint(files.read_state_dict(tmp_path / "official.ckpt"), "official.ckpt")
    # what our checkpoints hold
    ours = {loading.LPIPS_PREFIX + k: v for k, v in loading.lpips_official_state_dict(a).items()}
    c = loading.lpips_from_checkpoint(ours, "ours")
    x, y = imgs(2, 3, 32, 48, seed=12), imgs(2, 3, 32, 48, seed=13)
    outs = [m(x, y) for m in (a, b, c)]
    assert outs[0].abs().sum() > 0 and all(torch.equal(outs[0], o) for o in outs[1:])
    bad = {**official, "loss.perceptual_loss.scaling_layer.scale": torch.ones(1, 3, 1, 1)}
    with pytest.raises(ValueError, match="not LPIPS' constants"):
        loading.lpips_from_checkpoint(bad, "bad")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        loading.lpips_from_files(tmp_path / "vgg16-397923af.pth", tmp_path / "nope.pth")
    torch.save({k: v for k, v in lin.items() if "lin2" not in k}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="lin2.model.1.weight"):
        loading.lpips_from_files(tmp_path / "vgg16-397923af.pth", tmp_path / "short.pth")


# ---------------------------------------------------------------------------------------------------------------
# The discriminator

def test_discriminator_keys_shapes_init_and_patch_map():
    torch.manual_seed(0)
    d = T.NLayerDiscriminator(T.DiscriminatorConfig()).reset_parameters()
    assert [(k, tuple(v.shape)) for k, v in d.state_dict().items()] == OFFICIAL_DISC
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    for i in (0, 2, 5, 8, 11):
        assert abs(d.main[i].weight.std().item() - 0.02) < 0.003
    for i in (3, 6, 9):
        assert abs(d.main[i].weight.mean().item() - 1.0) < 0.01 and torch.all(d.main[i].bias == 0)
    assert d.main[0].bias.abs().max() <= 1 / math.sqrt(3 * 16)     # conv biases keep PyTorch's default init
    with torch.device("meta"):
        assert T.NLayerDiscriminator(T.DiscriminatorConfig())(torch.empty(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    assert loading.discriminator_config(d.state_dict()) == T.DiscriminatorConfig()


def test_discriminator_loads_from_an_official_layout_checkpoint(world):
    sd = files.read_state_dict(world["P"]["path"])
    d = loading.discriminator_from_checkpoint(sd, "tiny")
    assert d.config == T.DiscriminatorConfig(3, 2, 3) and d.training
    for k, v in d.state_dict().items():
        assert torch.equal(v, sd["loss.discriminator." + k]), k
    assert d.main[3].num_batches_tracked.item() == 123
    d.main[0].weight.data += 1                                      # its own memory: the file's tensors untouched
    assert not torch.equal(d.main[0].weight, sd["loss.discriminator.main.0.weight"])
    broken = {k: v for k, v in sd.items() if k != "loss.discriminator.main.6.running_mean"}
    with pytest.raises(ValueError, match=r"missing: loss\.discriminator\.main\.6\.running_mean"):
        loading.discriminator_from_checkpoint(broken, "broken")


# ---------------------------------------------------------------------------------------------------------------
# The loss terms

def test_hinge_generator_and_adaptive_weight_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])   # relu(1 - r): 0 .5 2; relu(1 + f): 0 1 2
    assert T.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1))
    a, b = torch.full((1, 1, 2, 2), 1.0), torch.full((1, 1, 2, 6), -1.0)           # 4 and 12 logits: joint mean
    assert T.generator_adv_loss([a, b]).item() == pytest.approx(-(4 - 12) / 16)
    w = nn.Parameter(torch.zeros(2))
    ga, gb = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])                     # known gradients: |ga| 5, |gb| 1
    dw = T.adaptive_weight((ga * w).sum(), (gb * w).sum(), w, disc_weight=0.5)
    assert dw.item() == pytest.approx(0.5 * 5.0 / (1.0 + 1e-4), rel=1e-6) and not dw.requires_grad
    tiny = torch.tensor([0.0, 1e-9])                                                # 5 / (1e-4 + 1e-9) > 1e4: clamped
    assert T.adaptive_weight((ga * w).sum(), (tiny * w).sum(), w, 0.5).item() == pytest.approx(5000.0)
    assert T.adaptive_weight((0 * w).sum(), (gb * w).sum(), w, 0.5).item() == 0.0


def test_reconstruction_loss_sums_pixels_per_image(tiny_lpips):
    xs, rs = [imgs(1, 3, 32, 32, seed=20), imgs(1, 3, 32, 48, seed=21)], [imgs(1, 3, 32, 32, seed=22),
                                                                        imgs(1, 3, 32, 48, seed=23)]
    for wp in (1.0, 0.25):
        expected = sum((x - r).abs().sum() + wp * 3 * x.shape[2] * x.shape[3] * tiny_lpips(x, r).item()
                       for x, r in zip(xs, rs)) / 2
        assert T.reconstruction_loss(xs, rs, tiny_lpips, wp).item() == pytest.approx(expected.item(), rel=1e-6)
    xb, rb = imgs(3, 3, 32, 32, seed=24), imgs(3, 3, 32, 32, seed=25)
    brute = ((xb - rb).abs() + tiny_lpips(xb, rb)).sum() / 3                      # upstream's broadcast form
    log = {}
    got = T.reconstruction_loss([xb], [rb], tiny_lpips, 1.0, log)
    assert got.item() == pytest.approx(brute.item(), rel=1e-6)
    assert T.reconstruction_loss(list(xb.split(1)), list(rb.split(1)), tiny_lpips, 1.0).item() == \
        pytest.approx(got.item(), rel=1e-6)
    assert T.reconstruction_loss([xb], [rb], None, 0.0).item() == pytest.approx((xb - rb).abs().sum().item() / 3)
    torch.testing.assert_close(log["rec_loss"], (xb - rb).abs().mean((1, 2, 3)))
    torch.testing.assert_close(log["p_loss"], tiny_lpips(xb, rb).flatten())
    for w2 in (0.5, 3.0):                       # --l2-weight: + w2 * the squared error, summed per image
        expected = sum((x - r).abs().sum() + w2 * (x - r).square().sum() for x, r in zip(xs, rs)) / 2
        got = T.reconstruction_loss(xs, rs, None, 0.0, l2_weight=w2)
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_lr_schedules_by_hand():
    args = T.finish_args(T.parse_args(["--data", "d", "--out", "o", "--steps", "100", "--lr", "2e-3",
                                       "--lr-schedule", "cosine", "--betas", "0.9,0.999"]))
    assert args.betas == (0.9, 0.999)
    assert [T.lr_at(s, args) for s in (0, 50, 100)] == pytest.approx([2e-3, 1e-3, 0.0], abs=1e-12)
    assert T.lr_at(25, args) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)))
    args.lr_schedule = "constant"
    assert {T.lr_at(s, args) for s in range(100)} == {2e-3}


def disc_start_from_lightning(global_steps):
    """Our disc_start for an official config's value: upstream's generator term switched on when global_step =
    2 * iteration reached it. (For an odd value upstream's D term started one iteration before its G term; not
    reproduced.) Moved here from train_autoencoder.py, its only user: the rule is stated in gan_factor's docstring."""
    return math.ceil(global_steps / 2)


def test_disc_start_counts_iterations_as_the_released_runs_did():
    for d in (5000, 5001, 1):
        start = disc_start_from_lightning(d)
        for k in range(max(0, start - 3), start + 3):
            assert (T.gan_factor(k, start) > 0) == (2 * k >= d)    # upstream's G call saw global_step = 2k
    assert disc_start_from_lightning(5000) == 2500 == T.RECIPE["disc_start"]


class OneConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_out = nn.Conv2d(4, 3, 3, padding=1)


def test_one_iteration_of_both_objectives(tiny_lpips, world):
    torch.manual_seed(0)
    dec = OneConv()
    disc = loading.discriminator_from_checkpoint(files.read_state_dict(world["P"]["path"]), "tiny")
    args = T.finish_args(T.parse_args(["--data", "d", "--out", "o", "--disc-start", "10"]))
    xs = [imgs(1, 3, 32, 32, seed=30), imgs(1, 3, 32, 48, seed=31)]
    recons = [dec.conv_out(torch.randn(1, 4, 32, 32)), dec.conv_out(torch.randn(1, 4, 32, 48))]
    nll = T.reconstruction_loss(xs, recons, tiny_lpips, 1.0)
    logits = [disc(r) for r in recons]
    total, log = T.generator_loss(xs, recons, logits, tiny_lpips, 0.0, dec.conv_out.weight, args)   # GAN off
    assert torch.equal(total, nll) and log["d_weight"].item() == 0
    total, log = T.generator_loss(xs, recons, logits, tiny_lpips, 1.0, dec.conv_out.weight, args)   # GAN on
    g = T.generator_adv_loss(logits)
    dw = T.adaptive_weight(nll, g, dec.conv_out.weight, 0.5)
    assert total.item() == pytest.approx((nll + dw * g).item(), rel=1e-6) and log["d_weight"] == dw
    critic = T.RealFakeDiscriminator(disc)
    pairs = critic(xs, recons)
    d_off, _ = T.discriminator_loss(pairs, 0.0)
    assert d_off.item() == 0 and d_off.requires_grad                   # still a step for Adam
    d_on, log_d = T.discriminator_loss(pairs, 1.0)
    hinge = [T.hinge_d_loss(disc(x), disc(r.detach())) for x, r in zip(xs, recons)]
    assert d_on.item() == pytest.approx(torch.stack(hinge).mean().item(), rel=1e-5)
    d_on.backward()
    assert dec.conv_out.weight.grad is None                            # D's loss never reaches the decoder


# ---------------------------------------------------------------------------------------------------------------
# Reconstruction metrics

def test_ssim_matches_torchmetrics_and_hand_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 20, generator=g) * 2 - 1
    y = (x + 0.4 * torch.randn(2, 3, 24, 20, generator=g)).clamp(-1.2, 1.2)
    # torchmetrics 1.8.2 structural_similarity_index_measure(y, x, data_range=(-1.0, 1.0), reduction="none") (the
    # official evaluation's metric), computed once off-line: not a test dependency
    torch.testing.assert_close(T.ssim(y, x), torch.tensor([0.5410699248313904, 0.46095526218414307]),
                               rtol=1e-6, atol=1e-7)
    assert torch.allclose(T.ssim(x, x), torch.ones(2))
    a, b = torch.full((1, 3, 16, 16), 0.3), torch.full((1, 3, 16, 16), -0.2)   # constants: no variance, so
    c1 = 0.02 ** 2                                                             # SSIM = (2ab + C1) / (a² + b² + C1)
    assert T.ssim(a, b).item() == pytest.approx((2 * 0.3 * -0.2 + c1) / (0.09 + 0.04 + c1), rel=1e-4)


def test_psnr_and_quantisation_by_hand():
    a = torch.full((1, 3, 4, 4), 100, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0, :] = 110                                                                 # MSE = 4 * 100 / 48
    assert T.psnr(b, a).item() == pytest.approx(20 * math.log10(255 / math.sqrt(400 / 48)))
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5])
    assert T.quantize(x).to(torch.uint8).tolist() == [0, 0, 128, 191, 255, 255]        # round(127.5 (x + 1))


# ---------------------------------------------------------------------------------------------------------------
# Whole runs

def test_l1_falls_on_tiny_data(world, tmp_path):
    out = tmp_path / "run"
    T.main(["--data", world["folder"], "--out", str(out), "--dinov3", world["dinov3"], "--resolution", "32",
            "--perceptual-weight", "0", "--disc-weight", "0", "--decoder-config", '{"ch": 32, "num_res_blocks": 0}',
            "--steps", "24", "--global-batch", "4", "--micro-batch", "2", "--lr", "5e-4", "--log-every", "1",
            "--workers", "0"])
    losses = [r["rec_loss"] for r in log_records(out)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert len(losses) == 24 and last < 0.8 * first, (first, last)           # about 0.38 -> 0.24
    assert all(r["g_loss"] is None and r["p_loss"] is None and r["skipped"] == 0 for r in log_records(out))
    sd = load_file(str(ckpt(out, 24) / "autoencoder.safetensors"))
    assert not any(k.startswith("loss.") for k in sd)         # no GAN, no LPIPS: nothing of them written
    run = json.loads((ckpt(out, 24) / "run.json").read_text())
    assert run["decoder"]["ch"] == 32 and run["decoder"]["z_channels"] == DINO.dim and run["discriminator"] is None


@pytest.mark.parametrize("recipe", [[], ["--lr-schedule", "cosine", "--betas", "0.9,0.999", "--l2-weight", "1"]],
                         ids=["paper", "cosine-l2"])
def test_killed_run_resumes_bit_for_bit(world, tmp_path, recipe):
    """(A schedule's lr follows the step, and --betas is applied to a resumed optimiser too.)"""
    extra = ["--disc-start", "1", "--save-every", "2", *recipe]   # GAN on from iteration 1; LPIPS and D from the file
    full, cut = tmp_path / "full", tmp_path / "cut"
    T.main(args_for(world, full, *extra, steps=4))
    r = run_cli(args_for(world, cut, *extra, steps=4), instrument=["--kill-after-step", "2"])
    assert r.returncode == -9, r.stderr[-2000:]
    assert (cut / "latest").read_text().strip() == "ckpt-0000002" and not ckpt(cut, 3).exists()
    T.main(args_for(world, cut, *extra, steps=4) + ["--resume"])
    a, b = (load_file(str(ckpt(o, 4) / "autoencoder.safetensors")) for o in (full, cut))
    assert a.keys() == b.keys() and any(k.startswith("loss.discriminator.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = (torch.load(ckpt(o, 4) / "optimizer.pt", weights_only=True) for o in (full, cut))
    for part in ("ae", "disc"):
        for i, s in oa[part]["state"].items():
            assert all(torch.equal(s[n], ob[part]["state"][i][n]) for n in s), (part, i)
    ra, rb = log_records(full), log_records(cut)
    assert [x["step"] for x in rb] == [1, 2, 3, 4]               # 1-2 before the kill, 3-4 after the resume
    assert [(x["rec_loss"], x["d_weight"]) for x in ra] == [(x["rec_loss"], x["d_weight"]) for x in rb]
    assert ra[-1]["gan"] and ra[-1]["d_weight"] > 0 and ra[-1]["p_loss"] > 0


def test_a_signal_finishes_the_step_saves_and_stops(world, tmp_path):
    """SIGUSR1 (as a scheduler's SIGTERM) mid-run: the step finishes, a checkpoint of it is written, and
    --resume goes on from there."""
    out = tmp_path / "run"

    def signal_once_logging():
        for _ in range(600):
            if (out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().strip():
                return os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.1)
    threading.Thread(target=signal_once_logging, daemon=True).start()
    T.main(args_for(world, out, "--save-every", "100000", steps=100000))
    step = log_records(out)[-1]["step"]
    assert 1 <= step < 100000 and (out / "latest").read_text().strip() == ckpt(out, step).name
    T.main(args_for(world, out, "--save-every", "100000", steps=step + 1) + ["--resume"])
    assert [r["step"] for r in log_records(out)] == list(range(1, step + 2))


def test_two_ddp_processes_match_one_process(world, tmp_path):
    """Micro-batches of one image: the adaptive weight and BatchNorm see the same images in both runs (1 process x
    4 micro-batches, 2 processes x 2), so the all-reduced gradients agree (the GAN on from the start, LPIPS on).

    Compared is what is well conditioned, so the test passes on any CPU and still fails for a wrong data split or
    reduction (a sum for a mean, a rank left out, another rank's images: tens of per cent in the first gradient,
    in the second step's losses and in its gradient as a whole).
    - Step 1 starts from the same weights: its gradients differ by float noise only (another summation order),
      so they are compared element by element, and its logged terms tightly.
    - From then on single elements are not comparable. Adam's first update, lr * g / (|g| + eps), is lr * sign(g):
      an element whose gradient is float noise (biases a GroupNorm or BatchNorm cancels) moves by lr with a random
      sign, and LPIPS amplifies the tiny differences of the reconstructions that follow (its unit-normalisation
      divides by feature norms near zero in this tiny VGG), so on some CPUs 4 % of conv_in.weight's step-2
      gradient differ by up to 0.05. What stays well conditioned: the step-2 losses and gradient norm (scalars
      of the whole batch, 1e-3; 2e-5 seen), the step-2 gradient as one vector (1e-2 of its norm; 3e-4 seen), and
      every weight within twice what Adam can move it in two steps (train_helpers.adam_reach: 4.1 lr; attention
      key biases and biases before a GroupNorm differ by up to 1.9 lr)."""
    extra = ["--disc-start", "0", "--micro-batch", "1"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    with instruments(single, dump_grads=True):
        T.main(args_for(world, single, *extra, steps=2, init=world["P_fresh_d"]))
    r = run_cli(args_for(world, ddp, *extra, steps=2, init=world["P_fresh_d"]), torchrun=2,
                instrument=["--dump-grads"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "replicas identical on 2 ranks" in r.stdout
    grads = {(run, step): load_file(str(run / f"grads-{step:07d}-rank0.safetensors"))
             for run in (single, ddp) for step in (1, 2)}
    for step in (1, 2):
        g0b = load_file(str(ddp / f"grads-{step:07d}-rank1.safetensors"))
        assert all(torch.equal(g0b[k], v) for k, v in grads[ddp, step].items())   # all-reduced: one gradient
    g1, g0 = grads[single, 1], grads[ddp, 1]
    assert g0.keys() == g1.keys() and len(g1) > 20
    # float noise only: biases before a GroupNorm have a gradient of ~0, and the adaptive weight (~200 here)
    # multiplies rounding; so the absolute tolerance is relative to a typical element
    rms = torch.cat([g.flatten() for g in g1.values()]).pow(2).mean().sqrt().item()
    for k in g1:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-4, atol=1e-3 * rms)
    g1, g0 = (torch.cat([g.flatten() for g in grads[run, 2].values()]) for run in (single, ddp))
    assert (g0 - g1).norm() <= 1e-2 * g1.norm()
    la, lb = log_records(single), log_records(ddp)
    assert [x["step"] for x in la] == [x["step"] for x in lb] == [1, 2]
    for x, y in zip(la, lb):
        for term in ("rec_loss", "p_loss", "g_loss", "d_weight", "disc_loss", "logits_real", "logits_fake",
                     "grad_norm"):
            assert y[term] == pytest.approx(x[term], rel=1e-3), (x["step"], term)
    lr = float(args_for(world, ddp)[args_for(world, ddp).index("--lr") + 1])
    a, b = (load_file(str(ckpt(o, 2) / "autoencoder.safetensors")) for o in (single, ddp))
    trained = [k for k in a if a[k].is_floating_point() and "running" not in k]    # (BatchNorm's: per rank)
    assert len(trained) > 20 and any(k.startswith("loss.discriminator.") for k in trained)
    for k in trained:             # the decoder, and the discriminator's step (all-reduced as well)
        assert (a[k] - b[k]).abs().max() <= 2 * adam_reach(T.ADAM_BETAS, 2, lr), k


def test_residual_vit_starts_from_the_official_init():
    torch.manual_seed(0)
    vit = ResidualViT(ResidualViTConfig(dim=128, depth=2, num_heads=2, mlp_hidden=256)).reset_parameters()
    f = vit.freqs.view(2, 2, 2, 32)                                   # [x/y, block, head, head_dim/2]
    mag = 10.0 ** (-torch.arange(0, 64, 4).float() / 64)             # theta 10, head_dim 64: 16 magnitudes
    for b in range(2):
        for h in range(2):
            fx, fy = f[0, b, h], f[1, b, h]
            torch.testing.assert_close(fx[:16].hypot(fy[:16]), mag)  # each pair: magnitude mag_j at angle a ...
            a = torch.atan2(fy[:16], fx[:16])
            assert torch.allclose(a, a[0].expand(16), atol=1e-5)
            a2 = torch.atan2(fy[16:], fx[16:])                       # ... and the second half at a + pi/2
            torch.testing.assert_close(torch.remainder(a2 - a + math.pi, 2 * math.pi) - math.pi,
                                       torch.full((16,), math.pi / 2), rtol=0, atol=1e-5)
    assert abs(vit.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002 and vit.blocks[0].attn.qkv.bias.eq(0).all()
    assert vit.blocks[1].gamma_2.eq(1e-4).all() and vit.norm.weight.eq(1).all()


def test_r_trains_the_residual_vit_with_distribution_matching(world, tmp_path):
    out = tmp_path / "r"
    T.main(["--ae", "R", "--data", world["data"], "--out", str(out), "--init-from", world["R"]["path"],
            "--crops", "buckets", "--resolution", "128", "--steps", "2", "--global-batch", "2", "--disc-start", "0",
            "--lr", "1e-3", "--workers", "0", "--stats-images", "3"])
    folder = ckpt(out, 2)
    sd = load_file(str(folder / "autoencoder.safetensors"))
    start = world["R"]["state_dict"]
    assert sd["decoder.conv_in.weight"].shape[1] == DINO.dim + 8
    assert not torch.equal(sd["extra_vit.freqs"], start["extra_vit.freqs"])          # RoPE frequencies trained
    assert not torch.equal(sd["extra_vit.heads.2.weight"], start["extra_vit.heads.2.weight"])
    ae = loading.load_autoencoder(folder / "autoencoder.safetensors")
    assert ae.residual is not None and ae.latent_channels == 40
    x = data.load_bucket_crop(data.Records(world["data"])[1]["path"], data.crops_for(128))[None]
    model = T.TrainedAutoencoder(ae.decoder, ae.residual)
    with torch.no_grad():
        h = ae.encoder(ae.pixels(x)).transpose(1, 2).reshape(1, DINO.dim, *[s // 16 for s in x.shape[2:]])
        z = model.latents(h, ae.pixels(x))
        raw = ae.residual(ae.pixels(x))                                             # [1, 8, N]
    by_hand = ((raw - raw.mean((0, 2)).mean()) / (raw.std((0, 2)).mean() + 1e-6) * h.flatten(2).std((0, 2)).mean()
               + h.flatten(2).mean((0, 2)).mean())
    torch.testing.assert_close(z[:, DINO.dim:].flatten(2), svgt2i.match_distribution(h.flatten(2), raw))
    torch.testing.assert_close(z[:, DINO.dim:].flatten(2), by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z, ae.encode(x), rtol=0, atol=0)                      # what load_autoencoder encodes
    stats = torch.load(folder / "latent_stats.pt", weights_only=True)
    assert stats["mean"].shape == stats["std"].shape == (1, 40)
    assert loading.load_latent_stats(str(folder / "latent_stats.pt"), channels=40).channels == 40


def test_output_is_read_by_the_rest_of_the_project(world, tmp_path):
    """sample.py --reconstruct, load_autoencoder, train.py --autoencoder; --init-from the official layout took the
    decoder, discriminator and LPIPS from the file, and --eval records the metrics in the checkpoint's run.json."""
    out = tmp_path / "p"
    T.main(args_for(world, out, "--disc-start", "1", steps=2))
    folder = ckpt(out, 2)
    sd = load_file(str(folder / "autoencoder.safetensors"))
    start = world["P"]["state_dict"]
    assert {k.split(".")[0] for k in sd} == {"encoder", "decoder", "loss"}
    ours, theirs = (loading.load_dinov3(f).state_dict() for f in (folder / "autoencoder.safetensors",
                                                                   world["P"]["path"]))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)   # DINOv3 carried
    lp = loading.lpips_from_checkpoint(sd, "ours")
    assert all(torch.equal(lp.state_dict()[k], v) for k, v in
               loading.lpips_from_checkpoint(start, "official").state_dict().items())       # LPIPS carried over
    assert sd["loss.discriminator.main.0.weight"].shape == (2, 3, 4, 4)            # the file's (tiny) D, trained
    assert not torch.equal(sd["loss.discriminator.main.0.weight"], start["loss.discriminator.main.0.weight"])
    run = json.loads((folder / "run.json").read_text())
    assert run["ae"] == "P" and run["step"] == 2 and run["discriminator"]["ndf"] == 2
    sample.main(["--ckpt", str(folder), "--reconstruct", str(Path(world["folder"]) / "img001.png"),
                 "--out", str(tmp_path / "rec.png")])
    assert Image.open(tmp_path / "rec.png").size == (192, 80)
    gemma = write_tiny_gemma(str(tmp_path / "gemma"), ["a red square"])
    train.main(["--model", "tiny", "--data", world["data"], "--out", str(tmp_path / "dit"), "--autoencoder",
                str(folder / "autoencoder.safetensors"), "--gemma", gemma, "--steps", "1", "--global-batch", "2",
                "--resolution", "32", "--system-prompt", "P: ", "--stats-images", "4"])
    dit_run = json.loads((tmp_path / "dit" / "ckpt-0000001" / "run.json").read_text())
    assert dit_run["frozen"]["autoencoder"] == str(folder / "autoencoder.safetensors")
    result = T.evaluate(T.finish_args(T.parse_args(["--eval", "--data", world["folder"], "--ckpt", str(out),
                                                    "--limit", "3", "--eval-resolution", "32"])))
    recorded = json.loads((folder / "run.json").read_text())["eval"]
    assert list(recorded.values())[0]["psnr"] == result["psnr"] and result["images"] == 3


def test_eval_follows_the_official_protocol(world, tmp_path):
    """The metrics of a checkpoint recomputed by hand from its parts: eval crop, encode, decode, quantise."""
    folder = tmp_path / "val"
    folder.mkdir()
    for i, size in enumerate([(300, 200), (256, 256), (200, 330)]):
        Image.effect_noise(size, 40 + 10 * i).convert("RGB").save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    result = T.evaluate(T.finish_args(T.parse_args(["--eval", "--data", str(folder), "--ckpt", world["P"]["path"],
                                                    "--eval-batch", "2", "--eval-resolution", "128"])))
    ae = loading.load_autoencoder(world["P"]["path"])
    lp = loading.lpips_from_checkpoint(files.read_state_dict(world["P"]["path"]), "lpips")
    p, s, l = [], [], []
    for i in range(3):
        x = data.eval_crop(files.read_image(folder / f"{i}.png"), 128)[None]
        assert x.shape == (1, 3, 128, 128)
        q = (127.5 * ae.decode(ae.encode(x)) + 128).clamp(0, 255)
        ref = (127.5 * x + 128).clamp(0, 255).to(torch.uint8)
        mse = (q.to(torch.uint8).double() - ref.double()).pow(2).mean()
        p.append(10 * math.log10(255 ** 2 / mse.item()))
        s.append(T.ssim(q / 255 * 2 - 1, x).item())
        l.append(lp(x, q / 255 * 2 - 1).item())
    assert result["images"] == 3 and result["skipped"] == 1
    assert result["psnr"] == pytest.approx(sum(p) / 3, rel=1e-5)
    assert result["ssim"] == pytest.approx(sum(s) / 3, rel=1e-5)
    assert result["lpips"] == pytest.approx(sum(l) / 3, rel=1e-5)


def test_unreadable_images_are_skipped_and_counted(world, tmp_path):
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.effect_noise((40, 48), 50).convert("RGB").save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    good = (folder / "0.png").read_bytes()
    (folder / "4.jpg").write_bytes(good[:len(good) // 2])                # truncated mid-file
    out = tmp_path / "run"
    T.main(["--data", str(tmp_path / "imgs"), "--out", str(out), "--init-from", world["P"]["path"], "--resolution",
            "32", "--steps", "3", "--global-batch", "5", "--disc-weight", "0", "--perceptual-weight", "0",
            "--workers", "0", "--log-every", "3"])
    assert log_records(out)[-1]["skipped"] >= 2                          # every epoch meets both bad files
    state = torch.load(ckpt(out, 3) / "state.pt", weights_only=True)
    assert sum(state["skipped"]) == log_records(out)[-1]["skipped"]


@pytest.mark.parametrize("stage, res, crops, steps, batch", [(1, 256, "fixed", 94_000, 512),
                                                             (2, 512, "buckets", 78_000, 128),
                                                             (3, 1024, "buckets", 190_000, 32)])
def test_stage_presets(stage, res, crops, steps, batch):
    a = T.finish_args(T.parse_args(["--stage", str(stage), "--data", "d", "--out", "o"]))
    assert (a.resolution, a.crops, a.steps, a.global_batch) == (res, crops, steps, batch)
    assert (a.lr, a.perceptual_weight, a.disc_weight, a.disc_start, a.grad_clip) == (1e-4, 1.0, 0.5, 2500, 0.0)
    assert T.ADAM_BETAS == (0.5, 0.9)
    b = T.finish_args(T.parse_args(["--stage", str(stage), "--data", "d", "--out", "o", "--resolution", "320",
                                    "--crops", "fixed", "--steps", "7", "--global-batch", "8", "--lr", "3e-5"]))
    assert (b.resolution, b.crops, b.steps, b.global_batch, b.lr) == (320, "fixed", 7, 8, 3e-5)


@pytest.mark.parametrize("args, message", [
    (["--dinov3", "{dinov3}"], "no LPIPS weights: pass --vgg vgg16-397923af.pth"),
    (["--dinov3", "{dinov3}", "--vgg", "{root}/none.pth", "--lpips", "{root}/vgg.pth"], "none.pth"),
    (["--perceptual-weight", "0"], "no DINOv3 weights"),
    (["--init-from", "{root}/missing"], "missing not found"),
    (["--init-from", "{dinov3}"], "no decoder.* weights"),
    (["--decoder-config", '{"z_channels": 8}', "--perceptual-weight", "0", "--dinov3", "{dinov3}"],
     "DecoderConfig fields ['z_channels'] follow the frozen encoders"),
    (["--resume"], "nothing to resume"),
    (["--stage", "4"], "choose 1, 2 or 3"),
    (["--betas", "0.9"], "--betas: two numbers in [0, 1), e.g. 0.9,0.999"),
    (["--betas", "0.9,1.5"], "--betas: two numbers in [0, 1)"),
    (["--l2-weight", "-1"], "--l2-weight must not be negative"),
])
def test_bad_input_is_one_line_and_exit_2(world, tmp_path, capsys, args, message):
    args = [a.replace("{root}", str(world["root"])).replace("{dinov3}", world["dinov3"]) for a in args]
    with pytest.raises(SystemExit) as e:
        T.main(["--data", world["data"], "--out", str(tmp_path / "o"), "--steps", "1", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
