"""End to end: sample.py and SVGT2I on a tiny checkpoint folder written in the official `pre-trained/` layout
(tiny DINOv3 .pth, tiny Lightning autoencoder .ckpt, stats file, tiny DiT consolidated.00-of-01.pth, tiny Gemma
folder with a sentencepiece tokenizer.model)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from nextdit import NextDiTConfig
from plumbing import UsageError, jobs
from plumbing.release import find_weights
from svgt2i import SVGT2I
from tiny_autoencoder import write_lightning_ckpt
from tiny_dinov3 import write_official_pth
from tiny_gemma2 import write_tiny_gemma_folder
from tiny_nextdit import write_official_consolidated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The official release layout, tiny: pre-trained/ + a Gemma folder."""
    root = tmp_path_factory.mktemp("release")
    pre = root / "pre-trained"
    (pre / "autoencoder").mkdir(parents=True)
    ae = write_lightning_ckpt(pre / "autoencoder" / "svg_autoencoder-P-stage3.ckpt", kind="P", seed=1)
    write_official_pth(pre / "dinov3_vits16plus_pretrain_lvd1689m-0000test.pth", seed=1)
    C = ae["z_channels"]
    g = torch.Generator().manual_seed(0)
    torch.save({"mean": torch.randn(12, C, generator=g) * 0.1, "std": torch.rand(12, C, generator=g) + 0.5},
               pre / "dinov3_s16p_layer_patchtoken_stats_dist.pt")
    gemma = write_tiny_gemma_folder(root / "gemma-2-2b", seed=0)
    cfg = dataclasses.replace(NextDiTConfig.tiny(), in_channels=C, cap_feat_dim=gemma["config"].hidden_size)
    write_official_consolidated(pre / "dit-tiny", config=cfg, seed=0)
    return {"ckpt": str(pre), "gemma": str(root / "gemma-2-2b"), "channels": C}


def run_cli(release, tmp_path, *args):
    """sample.py in a subprocess, as a user runs it."""
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", release["ckpt"], "--gemma", release["gemma"],
           "--steps", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)


def test_find_weights_official_layout(release):
    files = find_weights(release["ckpt"], release["gemma"])
    assert files["dit"].endswith(os.path.join("dit-tiny", "consolidated.00-of-01.pth"))
    assert files["autoencoder"].endswith("svg_autoencoder-P-stage3.ckpt")
    assert os.path.basename(files["dinov3"]).startswith("dinov3_vits16plus_pretrain_lvd1689m-")
    assert files["stats"].endswith("dinov3_s16p_layer_patchtoken_stats_dist.pt")


def test_cli_png_size_seed_and_metadata(release, tmp_path):
    r = run_cli(release, tmp_path, "--prompt", "a red cube", "--h", "32", "--w", "64", "--seed", "5", "--out", "a.png")
    assert r.returncode == 0, r.stderr
    assert "seed 5" in r.stderr
    img = Image.open(tmp_path / "a.png")
    assert img.size == (64, 32)                                   # width x height: not transposed
    meta = img.text
    assert meta["prompt"] == "a red cube" and meta["seed"] == "5" and meta["steps"] == "2"
    assert {"cfg", "shift", "solver", "negative", "system_prompt", "height", "width"} <= set(meta)
    r2 = run_cli(release, tmp_path, "--prompt", "a red cube", "--h", "32", "--w", "64", "--seed", "5", "--out", "b.png")
    r3 = run_cli(release, tmp_path, "--prompt", "a red cube", "--h", "32", "--w", "64", "--seed", "6", "--out", "c.png")
    assert r2.returncode == 0 and r3.returncode == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--prompt", "x", "--h", "30"], "not a multiple of 16"),
    (["--prompt", "x", "--ckpt", "/nonexistent/pre-trained"], "checkpoint folder not found"),
    (["--prompts", "bad.jsonl"], "not valid JSON"),
    (["--prompts", "missing.txt"], "prompt file not found"),
    ([], "no prompt"),
])
def test_cli_errors_are_one_line(release, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{not json\n')
    r = run_cli(release, tmp_path, *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_gemma_and_wrong_file_errors(release, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", release["ckpt"], "--prompt", "x"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "no gemma weights found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(release, tmp_path, "--prompt", "x", "--h", "32", "--w", "32",
                "--dit", os.path.join(release["ckpt"], "dinov3_s16p_layer_patchtoken_stats_dist.pt"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def pipe(release):
    return SVGT2I.from_pretrained(release["ckpt"], release["gemma"], dtype=torch.float32)


@pytest.mark.parametrize("solver", ["euler", "dpm"])
def test_image_k_uses_seed_plus_k(pipe, solver):
    kw = dict(height=32, width=48, steps=2, seed=10, solver=solver)
    both = pipe.generate(["a red cube", "a blue ball"], **kw)
    second = pipe.generate(["a blue ball"], **{**kw, "seed": 11})
    assert both[0].size == (48, 32)
    assert list(both[1].getdata()) == list(second[0].getdata())
    batched = pipe.generate(["a red cube", "a blue ball"], batch_size=2, **kw)
    a = torch.tensor([list(im.getdata()) for im in both]).float()
    b = torch.tensor([list(im.getdata()) for im in batched]).float()
    assert (a - b).abs().max() <= 1                              # batching changes at most float rounding


def test_guidance_and_prompt_matter(pipe):
    kw = dict(height=32, width=32, steps=2, seed=0)
    px = lambda im: torch.tensor(list(im.getdata())).float()
    base = px(pipe.generate("a red cube", cfg=4.0, **kw)[0])
    assert (base - px(pipe.generate("a red cube", cfg=1.0, **kw)[0])).abs().max() > 0
    assert (base - px(pipe.generate("a blue ball", cfg=4.0, **kw)[0])).abs().max() > 0


def test_geneval_layout(release, tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a red cube", "tag": "single_object"}) + "\n"
                                      + json.dumps({"prompt": "two dogs", "tag": "counting"}) + "\n")
    r = run_cli(release, tmp_path, "--prompts", "p.jsonl", "--layout", "geneval", "--n", "2", "--outdir", "ev",
                "--h", "32", "--w", "32", "--seed", "42")
    assert r.returncode == 0, r.stderr
    for i in range(2):
        assert sorted(os.listdir(tmp_path / "ev" / f"{i:05d}" / "samples")) == ["00000.png", "00001.png"]
        rec = json.loads((tmp_path / "ev" / f"{i:05d}" / "metadata.jsonl").read_text())
        assert rec["tag"] == ["single_object", "counting"][i]
    # seeds base + index * n + k
    assert Image.open(tmp_path / "ev" / "00001" / "samples" / "00001.png").text["seed"] == str(42 + 1 * 2 + 1)


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert jobs.read_prompts(str(tmp_path / "p.txt"))[0] == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"caption": "x"}\n{"prompt": "y", "caption": "z"}\n')
    assert jobs.read_prompts(str(tmp_path / "p.jsonl"))[0] == ["x", "y"]
    (tmp_path / "q.jsonl").write_text('{"image": 1}\n')
    with pytest.raises(UsageError, match="no prompt field"):
        jobs.read_prompts(str(tmp_path / "q.jsonl"))


def test_find_weights_run_folder_and_ambiguity(tmp_path):
    # a training run: OUT/latest names the newest checkpoint, whose run.json names the frozen parts
    ck = tmp_path / "run" / "ckpt-0000010"
    ck.mkdir(parents=True)
    for name in ("ema.safetensors", "model.safetensors", "latent_stats.pt"):
        (ck / name).write_bytes(b"")
    (tmp_path / "ae.ckpt").write_bytes(b"")
    (tmp_path / "gemma").mkdir()
    (ck / "run.json").write_text(json.dumps({"frozen": {"autoencoder": str(tmp_path / "ae.ckpt"), "dinov3": None,
                                                        "gemma": str(tmp_path / "gemma")}}))
    (tmp_path / "run" / "latest").write_text("ckpt-0000010\n")
    files = find_weights(str(tmp_path / "run"))
    assert files["dit"] == str(ck / "ema.safetensors") and files["gemma"] == str(tmp_path / "gemma")
    assert files["autoencoder"] == str(tmp_path / "ae.ckpt") and files["stats"] == str(ck / "latent_stats.pt")
    # a recorded part that has gone: run.json and the flag that replaces it are named; the flag wins
    (tmp_path / "ae.ckpt").rename(tmp_path / "ae2.ckpt")
    with pytest.raises(FileNotFoundError, match=r"run.json records the autoencoder at .*ae.ckpt, which does "
                                                r"not exist \(was the run moved\?\): pass --autoencoder"):
        find_weights(str(tmp_path / "run"))
    files = find_weights(str(tmp_path / "run"), autoencoder=str(tmp_path / "ae2.ckpt"))
    assert files["autoencoder"] == str(tmp_path / "ae2.ckpt")
    # a gone record of a part this command does not need is as if absent
    files = find_weights(str(tmp_path / "run"), need=("dit", "gemma"))
    assert files["autoencoder"] is None and files["dit"] == str(ck / "ema.safetensors")
    # a relative record is read from the checkpoint folder: the run moved whole still finds it
    (ck / "run.json").write_text(json.dumps({"frozen": {"autoencoder": "../../ae2.ckpt",
                                                        "gemma": str(tmp_path / "gemma")}}))
    (tmp_path / "run").rename(tmp_path / "moved")
    files = find_weights(str(tmp_path / "moved"))
    assert files["autoencoder"] == str(tmp_path / "ae2.ckpt")
    # two DiTs in one release folder: refuse to guess
    for d in ("dit-a", "dit-b"):
        (tmp_path / "rel" / d).mkdir(parents=True)
        (tmp_path / "rel" / d / "consolidated.00-of-01.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="several files match"):
        find_weights(str(tmp_path / "rel"))


def test_cli_reconstruct(release, tmp_path):
    Image.new("RGB", (70, 40), (200, 30, 30)).save(tmp_path / "in.png")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", release["ckpt"], "--reconstruct",
                        "in.png", "--out", "rec.png"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "rec.png").size == (64, 32)        # cropped to multiples of 16
