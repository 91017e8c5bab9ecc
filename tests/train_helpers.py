"""Test helpers for train.py (not tests): tiny frozen parts in the official file layouts, and a small synthetic
image-caption data set drawn with PIL."""

import dataclasses
import json
import os
import random

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import gemma2
from dinov3 import DINOv3Config
from svgt2i import SYSTEM_PROMPTS
from tiny_autoencoder import write_lightning_ckpt
from tiny_dinov3 import random_official_state_dict, write_official_pth
from tiny_gemma2 import caption_corpus, train_tiny_tokenizer

# Smaller than DINOv3Config.tiny() (32 channels, head size 16), so the training tests stay fast.
DINO = DINOv3Config(dim=32, depth=2, n_heads=2, ffn_dim=64)
GEMMA = gemma2.Gemma2Config.tiny(hidden_size=32, intermediate_size=48, num_hidden_layers=2)


def write_tiny_gemma(folder, texts=(), seed=0, config=GEMMA):
    """A Gemma-2 folder as the Hub has it (config.json, model.safetensors with `model.` keys, tokenizer.model),
    random weights (drawn for our module's names and shapes), tokenizer trained on `texts` + a caption corpus."""
    os.makedirs(folder, exist_ok=True)
    model_file = train_tiny_tokenizer(os.path.join(folder, "tok"), texts=list(texts) + caption_corpus(),
                                      vocab_size=config.vocab_size)
    os.replace(model_file, os.path.join(folder, "tokenizer.model"))
    os.remove(os.path.join(folder, "tok.vocab"))
    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k != "attn_softcap"}
    cfg.update(model_type="gemma2", hidden_activation="gelu_pytorch_tanh", layer_types=list(config.layer_types))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    torch.manual_seed(seed)
    model = gemma2.Gemma2(config)
    sd = {"model." + k: (0.3 * torch.randn(v.shape) if k.endswith("norm.weight") else v).contiguous()
          for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def write_tiny_frozen(folder, texts=(), seed=0, encoder_in_autoencoder=True):
    """The frozen parts train.py needs: {"autoencoder", "dinov3", "gemma"} paths. With encoder_in_autoencoder the
    Lightning checkpoint holds DINOv3 under encoder.* (as upstream's training checkpoints); else only the decoder,
    and DINOv3 comes from the .pth."""
    os.makedirs(folder, exist_ok=True)
    dino_sd = random_official_state_dict(DINO, seed)
    dinov3 = os.path.join(folder, "dinov3.pth")
    write_official_pth(dinov3, config=DINO, state_dict=dino_sd)
    ae = os.path.join(folder, "autoencoder.ckpt")
    info = write_lightning_ckpt(ae, "P", encoder_sd=dino_sd if encoder_in_autoencoder else None, seed=seed)
    assert info["z_channels"] == DINO.dim
    gemma = write_tiny_gemma(os.path.join(folder, "gemma"), texts, seed)
    return {"autoencoder": ae, "dinov3": dinov3, "gemma": gemma}


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("square", "circle")


def draw(colour, shape, size, rng):
    """One shape on a grey background with a little noise."""
    w, h = size
    im = Image.new("RGB", size, tuple(rng.randint(100, 140) for _ in range(3)))
    d = ImageDraw.Draw(im)
    r = min(w, h) // 3
    cx, cy = w // 2 + rng.randint(-r // 3, r // 3), h // 2 + rng.randint(-r // 3, r // 3)
    box = (cx - r, cy - r, cx + r, cy + r)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLOURS[colour])
    return im


def write_dataset(folder, n=16, seed=0, sizes=((128, 128), (240, 100), (100, 240)), variants=False, extra=()):
    """n images + data.jsonl (relative paths). variants=True gives every record short/middle/long and en/zh captions.
    `extra`: more raw records (dicts) appended. Returns (jsonl path, captions)."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    lines, texts = [], []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        name = f"img{i:03d}.png"
        draw(colour, shape, sizes[i % len(sizes)], rng).save(os.path.join(folder, name))
        caption = f"a {colour} {shape}"
        if variants:
            prompt = {"en": {"short": caption, "middle": f"{caption} on grey", "long": f"a photo of {caption} on a grey "
                             "background, centred"}, "zh": {"short": f"{colour} {shape} zh"}}
            texts += [caption, f"{caption} on grey", f"{colour} {shape} zh"]
        else:
            prompt = caption
            texts.append(caption)
        lines.append({"path": name, "prompt": prompt})
    lines += list(extra)
    path = os.path.join(folder, "data.jsonl")
    with open(path, "w") as f:
        for rec in lines:
            f.write(json.dumps(rec) + "\n")
    return path, texts + list(SYSTEM_PROMPTS.values())


def adam_reach(betas, steps, lr):
    """How far Adam (bias-corrected, no weight decay) can move one element in `steps` steps, whatever its
    gradients: step t moves it by lr |m_t| / sqrt(v_t) * sqrt(1 - b2^t) / (1 - b1^t), and Cauchy-Schwarz on
    m_t = (1 - b1) sum b1^i g_{t-i} against v_t = (1 - b2) sum b2^i g_{t-i}^2 gives |m_t| <= (1 - b1) /
    sqrt(1 - b2) * sqrt(sum_{i<t} (b1^2 / b2)^i) * sqrt(v_t); so lr at step 1 (lr * sign(g)), about lr later.
    Two runs from the same weights differ by at most twice this in any element: the bound for comparing weights
    after steps whose gradients are float noise in places (Adam turns noise into a full step of either sign)."""
    b1, b2 = betas
    return lr * sum((1 - b1) / (1 - b2) ** 0.5 * sum((b1 * b1 / b2) ** i for i in range(t)) ** 0.5
                    * (1 - b2 ** t) ** 0.5 / (1 - b1 ** t) for t in range(1, steps + 1))
