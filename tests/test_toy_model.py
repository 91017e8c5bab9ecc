"""The toy SVG-T2I: a short run of `toy.py train` end to end, and the bundled model (assets/toy), which must follow
its prompts (scored by toy.py's analyser) and must need its guidance to do so."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from plumbing import jobs, loading
import sample
import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(ROOT, "assets", "toy")


def test_short_toy_training_writes_a_bundle_that_samples(tmp_path):
    bundle = tmp_path / "bundle"
    toy.main(["train", "--out", str(tmp_path / "run"), "--images", "96", "--decoder-steps", "3",
              "--steps", "4", "--global-batch", "16", "--bundle", str(bundle)])
    assert sorted(os.listdir(bundle)) == ["autoencoder.safetensors", "ema.safetensors", "latent_stats.pt", "run.json",
                                          "text_encoder"]
    args = sample.parse_args(["--ckpt", str(bundle), "--score", "6", "--steps", "3"])
    h, w = jobs.resolve_settings(args, str(bundle))
    assert (h, w, args.system_prompt) == (64, 64, "empty")       # the bundle's own sampling defaults
    summary = jobs.score_toy(args, str(bundle), None, torch.device("cpu"), torch.float32, h, w)
    assert set(summary) == set(toy.CATEGORIES) and all(0 <= v <= 1 for v in summary.values())

    def recorded_args():
        dit = tmp_path / "run" / "dit"
        return json.loads((dit / (dit / "latest").read_text().strip() / "run.json").read_text())["args"]
    assert (recorded_args()["lr"], recorded_args()["ema_decay"]) == (1e-3, 0.999)   # the toy's own recipe
    # the run can be continued (the DiT stage resumes; data, frozen parts and decoder are reused); an explicit
    # --lr equal to the general default is honoured, not mistaken for "use the toy default"
    toy.main(["train", "--out", str(tmp_path / "run"), "--images", "96", "--steps", "6", "--global-batch",
              "16", "--bundle", str(bundle), "--resume", "--lr", "2e-4"])
    assert "ckpt-0000006" in (tmp_path / "run" / "dit" / "latest").read_text()
    assert (recorded_args()["lr"], recorded_args()["ema_decay"]) == (2e-4, 0.999)


def test_a_trainer_stopped_by_a_signal_stops_the_toy_command(tmp_path, monkeypatch, capsys):
    """A trainer stopped by SIGTERM saves and returns as if done: toy.py must not go on to the next part (it
    once trained the DiT on a half-trained decoder, and could bundle a half-trained DiT)."""
    import contextlib

    from plumbing import runs

    @contextlib.contextmanager
    def signalled():                 # as if SIGTERM arrived during the first step
        yield lambda: "signal 15"
    monkeypatch.setattr(runs, "stop_on_signals", signalled)
    args = ["train", "--out", str(tmp_path / "run"), "--images", "32", "--decoder-steps", "3", "--steps", "2",
            "--global-batch", "16", "--bundle", str(tmp_path / "bundle")]
    with pytest.raises(SystemExit) as e:
        toy.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "toy.py: error: the decoder stopped at step 1 of 3: continue with the same command and --resume"
    assert not (tmp_path / "run" / "dit").exists() and not (tmp_path / "bundle").exists()


def test_bundled_toy_cli(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--toy", "--prompt", "two red circles on the left",
           "--seed", "1", "--out"]
    for name in ("a.png", "b.png"):
        r = subprocess.run(cmd + [name], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "a.png").size == (64, 64)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_bundled_toy_follows_prompts_and_needs_guidance():
    def score(cfg):
        args = sample.parse_args(["--toy", "--score", "180", "--cfg", str(cfg)])
        h, w = jobs.resolve_settings(args, BUNDLE)
        return jobs.score_toy(args, BUNDLE, None, torch.device("cpu"), torch.float32, h, w)
    # measured on the bundled model: 0.928 overall at the default cfg 4, 0.889 with guidance off (lower in every
    # category); 180 prompts, seed 0. 0.88 is the bound the bundle is held to.
    guided, unguided = score(4.0), score(1.0)
    assert guided["overall"] >= 0.88, guided
    assert unguided["overall"] <= guided["overall"] - 0.03, (guided, unguided)
    assert all(unguided[k] <= guided[k] for k in toy.CATEGORIES), (guided, unguided)


def reconstruction_quality(autoencoder, n):
    """The autoencoder on n held-out renders (64 px, the 8-bit reconstructions): the mean per-image PSNR, and the
    mean error of each colour channel over the shape pixels (in [0, 1] units: a colour bias)."""
    ae = loading.load_autoencoder(autoencoder)
    renders = np.stack([np.asarray(im) for im, _ in toy.make_dataset(n, toy.SIZE, toy.HELDOUT_SEED)])
    x = torch.from_numpy(renders).permute(0, 3, 1, 2).float()                      # [n, 3, 64, 64], 0..255
    with torch.no_grad():
        out = ((ae.decode(ae.encode(x / 127.5 - 1)) + 1) * 127.5).round().clamp(0, 255)
    mse = (out - x).square().mean((1, 2, 3))
    shapes = (x != torch.tensor(toy.BACKGROUND).view(1, 3, 1, 1)).any(1)              # [n, 64, 64]
    bias = [((out - x)[:, c][shapes].mean() / 255).item() for c in range(3)]
    return (10 * torch.log10(255 ** 2 / mse)).mean().item(), bias


def test_bundled_decoder_draws_held_out_renders():
    """The bundled decoder (toy.py's recipe through train_autoencoder.py): held-out renders back at >= 33 dB, and no
    colour bias: no channel's error over the shape pixels departs from the channels' mean by more than 0.005 (an
    L1-only decoder left the shapes half-drawn: 28.5 dB, red +0.02). The mean itself is the shapes' soft edges
    blending into the grey (measured on 300: 36.0 dB, +0.004, +0.003, +0.006; the former loop's decoder +0.010 to
    +0.014)."""
    psnr, bias = reconstruction_quality(os.path.join(BUNDLE, "autoencoder.safetensors"), 100)
    mean = sum(bias) / 3
    assert psnr >= 33.0 and max(abs(b - mean) for b in bias) <= 0.005 and 0 <= mean <= 0.01, (psnr, bias)


# ---------------------------------------------------------------------------------------------------------------
# the proof on the toy: a word it never read


def test_the_toy_learns_a_new_word_and_keeps_the_rest(tmp_path):
    """python toy.py lora as it runs (toy.LORA_RECIPE: rank 4, 400 renders, 300 steps of 16, lr 1e-3), through
    train.py --lora on the bundle. Measured: 'crimson' drawn red in 0.000 of 60 held-out prompts before (chance:
    0.25), 0.983 after; the 180 held-out prompts score 0.928 before, 0.917 after."""
    results = toy.teach_word(toy.parse_args(["lora", "--out", str(tmp_path / "run")]))
    (before, base, _), (after, adapted, images) = results["before"], results["after"]
    assert before <= 0.25 and after >= 0.8, (before, after)
    assert abs(base["overall"] - adapted["overall"]) <= 0.03, (base, adapted)
    assert len(images) == 60
