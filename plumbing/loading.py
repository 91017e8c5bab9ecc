"""
Building the models from checkpoint files, official or ours: read (plumbing.files.read_state_dict)
-> the model file's key map -> `build`, which makes the model on the meta device, checks every key
and shape strictly, and casts each tensor straight into its target dtype, so loading never holds two
copies of the weights. One `load_*` per model, the latent statistics, the whole pipeline's
parts for SVGT2I.from_pretrained, and train_autoencoder.py's checkpoints (LPIPS, the
discriminator, the official layout it writes).

You need not read this to learn SVG-T2I.
"""

import dataclasses
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from decoder import (Decoder, DecoderConfig, ResidualViT, ResidualViTConfig, decoder_keymap,
                     residual_vit_keymap)
from dinov3 import DINOv3, dinov3_keymap, dinov3_official_state_dict
from gemma2 import Gemma2, Gemma2Config, Gemma2Tokenizer, gemma2_keymap
from nextdit import NextDiT, NextDiTConfig, add_lora, merge_lora, nextdit_keymap
from plumbing import UsageError
from plumbing.files import key_mismatch, read_json, read_state_dict, read_torch, sub_state_dict
from plumbing.release import (DOWNLOAD_HINT, LIN_FILE, LORA_FILE, NEXTDIT_FILES, VGG_FILE,
                              autoencoder_file, find_weights, lora_file)
from svgt2i import Autoencoder, LatentStats, TextEncoder


def build(model_class, config, sd, source, prefix="", device="cpu", dtype=torch.float32,
          keep_fp32=(), missing=()):
    """The one strict load: `model_class(config)` on the meta device, `sd` (our names) checked
    against it (one line lists every missing, unexpected and mis-shaped key under the file's names,
    `prefix` added; `missing` adds keys a key map could not find), then each tensor is cast to
    `dtype` (None: as stored; names in keep_fp32 stay fp32) on `device` and assigned. Returns the
    model in eval mode."""
    with torch.device("meta"):
        model = model_class(config)
    problems = key_mismatch(model.state_dict(), sd, prefix, missing)
    if problems:
        raise ValueError(f"{source}: {model_class.__name__} weights do not match: {problems}")

    def cast(k, v):
        if not v.is_floating_point() or dtype is None:
            return v.to(device)
        return v.to(device=device, dtype=torch.float32 if k in keep_fp32 else dtype)
    model.load_state_dict({k: cast(k, v) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


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
            hf_config = read_json(path / "config.json")
            if not isinstance(hf_config, dict):
                raise ValueError(f"{path / 'config.json'} is not a Hugging Face config (a JSON "
                                 "object)")
        path = path / "model.safetensors"
    elif path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
        # next to a file passed directly, a config.json is used only if it describes a DINOv3 ViT
        cfg = read_json(path.parent / "config.json")
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


def load_tokenizer(gemma_dir):
    tok_file = os.path.join(gemma_dir, "tokenizer.model")
    if not os.path.isfile(tok_file):
        raise FileNotFoundError(f"{tok_file} not found: the Gemma folder needs its sentencepiece "
                                "tokenizer.model")
    return Gemma2Tokenizer(tok_file)


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


# -------------------------------------------------------------------------------------------------
# LoRA: train.py --lora's model, the adapter files it writes, and their merge at sampling

def lora_model(init_file, args, config, device, bf16):
    """train.py --lora's DiT: the weights of `init_file` frozen, held in bf16 when training in bf16
    (no fp32 master copy: built on meta, each tensor cast as it is assigned), then fresh fp32
    adapters (nextdit.add_lora) drawn from the current RNG. `config`'s widths are what the frozen
    encoders give: the base must take them."""
    dit = load_nextdit(init_file, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    for name in ("in_channels", "cap_feat_dim"):
        if getattr(dit.config, name) != getattr(config, name):
            raise UsageError(f"--init-from {init_file}: its DiT has {name} "
                             f"{getattr(dit.config, name)}, the frozen parts give "
                             f"{getattr(config, name)}: fine-tune it with its own autoencoder "
                             "and text encoder")
    add_lora(dit.requires_grad_(False).train(), args.lora, args.lora_alpha, args.lora_targets)
    dit.lora["base"] = str(init_file)
    return dit


def lora_metadata(lora):
    """A LoRA file's safetensors metadata: rank, alpha, targets and the base it was trained on."""
    return {"lora_rank": str(lora["rank"]), "lora_alpha": repr(float(lora["alpha"])),
            "lora_targets": ",".join(lora["targets"]), "lora_base": lora.get("base", "")}


def read_lora(path):
    """A LoRA file (or a LoRA run's / checkpoint's lora.safetensors): (adapters, alpha, path),
    checked to hold adapter pairs only, of one rank, with lora_alpha in its metadata."""
    from safetensors import safe_open
    path = Path(lora_file(str(path)))
    if not path.is_file():
        raise UsageError(f"--lora {path}: no such file (expected a {LORA_FILE} written by "
                         "train.py --lora, or its run folder)")
    try:
        with safe_open(str(path), "pt") as f:
            meta, adapters = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        alpha = float(meta["lora_alpha"])
    except Exception as e:
        raise UsageError(f"--lora {path}: not a LoRA file of train.py --lora ({type(e).__name__}"
                         f" {e}): pass the {LORA_FILE} of a --lora run") from None
    for key in sorted(adapters):
        layer, kind = key.rsplit(".lora_", 1) if ".lora_" in key else (key, "")
        pair = adapters.get(f"{layer}.lora_{'B' if kind == 'A.weight' else 'A'}.weight")
        if kind not in ("A.weight", "B.weight") or pair is None or adapters[key].dim() != 2:
            raise UsageError(f"--lora {path}: {key} is not one of a pair of adapter matrices "
                             "(<layer>.lora_A.weight [r, in], <layer>.lora_B.weight [out, r])")
    ranks = {v.shape[0] for k, v in adapters.items() if k.endswith("lora_A.weight")}
    ranks |= {v.shape[1] for k, v in adapters.items() if k.endswith("lora_B.weight")}
    if len(ranks) != 1:
        raise UsageError(f"--lora {path}: the adapters do not share one rank ({sorted(ranks)})")
    return adapters, alpha, path


def apply_lora(dit, path, scale=1.0):
    """Merge the LoRA file `path` into `dit` at `scale` (nextdit.merge_lora), once every adapter
    is checked against it: one line names the first layer the DiT lacks or whose shape differs
    (a LoRA of another model). Returns the file's path."""
    adapters, alpha, path = read_lora(path)
    layers = dict(dit.named_modules())
    for key in sorted(k for k in adapters if k.endswith(".lora_A.weight")):
        layer = key.removesuffix(".lora_A.weight")
        A, B = adapters[key], adapters[layer + ".lora_B.weight"]
        if not isinstance(layers.get(layer), torch.nn.Linear):
            raise UsageError(f"--lora {path}: {key}: this DiT has no linear layer {layer!r} (a "
                             "LoRA of another model)")
        if (B.shape[0], A.shape[1]) != tuple(layers[layer].weight.shape):
            raise UsageError(f"--lora {path}: {key}: adapts a {B.shape[0]} x {A.shape[1]} layer, "
                             f"but this DiT's {layer} is {tuple(layers[layer].weight.shape)} (a "
                             "LoRA of another model)")
    merge_lora(dit, adapters, alpha, scale)
    return path


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


def load_latent_stats(path, channels=384, layer=-1):
    """Read the official stats file: {'mean': [L, 384], 'std': [L, 384]}
    (one row per ViT layer; row -1, the final-normed patch tokens, is the one used). For
    autoencoder-R's 392 channels the 8 residual channels get the scalar averages of the row, as the
    official code does."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"latent statistics file not found: {path} "
                                "(expected dinov3_s16p_layer_patchtoken_stats_dist.pt)")
    d = read_torch(path)
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


def load_pipeline(ckpt_dir, gemma_dir=None, device="cpu", dtype=torch.bfloat16,
                  with_encoder=False, lora=(), **overrides):
    """SVGT2I.from_pretrained's parts: (dit, autoencoder, stats, text encoder, the files), found by
    plumbing.release.find_weights (`overrides`: dit=, autoencoder=, dinov3=, stats= paths). The DiT
    and Gemma in `dtype`, the decoder (and DINOv3) in fp32. Each (file, scale) of `lora` is merged
    into the DiT (apply_lora) and listed in files["lora"]."""
    files = find_weights(ckpt_dir, gemma_dir, **overrides)
    dit = load_nextdit(files["dit"], device=device, dtype=dtype)
    files["lora"] = [(str(apply_lora(dit, path, scale)), scale) for path, scale in lora]
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
    return dit, autoencoder, stats, text, files


# -------------------------------------------------------------------------------------------------
# train_autoencoder.py's checkpoints: where its run starts from, LPIPS (VGG16) and the PatchGAN
# discriminator from their files, and the official Lightning layout its checkpoints are written in.
# The model classes are train_autoencoder's, imported where used: importing this module never
# imports a trainer.

LPIPS_HINT = (f"pass --vgg {VGG_FILE} (torchvision's ImageNet VGG16) and --lpips {LIN_FILE} (the "
              "lpips package's VGG linear layers), or --init-from a training checkpoint holding "
              "loss.perceptual_loss.*, or --perceptual-weight 0 to do without LPIPS")
LPIPS_PREFIX, DISC_PREFIX = "loss.perceptual_loss.", "loss.discriminator."
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


def autoencoder_source(resume_dir, init_from):
    """The checkpoint a train_autoencoder.py run starts from, as ({name: tensor}, its file):
    --resume's autoencoder.safetensors, else --init-from's (autoencoder_file), else ({}, None).
    It must hold decoder.* (an SVG autoencoder's, official or ours)."""
    path = (Path(resume_dir) / "autoencoder.safetensors" if resume_dir else
            autoencoder_file(init_from, "--init-from") if init_from else None)
    if path is None:
        return {}, None
    source = read_state_dict(path)
    if not any(k.startswith("decoder.") for k in source):
        raise UsageError(f"--init-from {path}: no decoder.* weights (not an SVG autoencoder "
                         "checkpoint)")
    return source, path


def dinov3_file(dinov3, source, source_path, flag):
    """The frozen encoder's file: --dinov3, else the source checkpoint when it holds encoder.*."""
    if dinov3:
        return dinov3
    if any(k.startswith("encoder.") for k in source):
        return source_path
    raise UsageError("no DINOv3 weights: pass --dinov3 dinov3_vits16plus_pretrain_lvd1689m-*.pth "
                     f"(or {flag} a checkpoint holding encoder.*)")


def autoencoder_frozen(args, source, source_path, device):
    """A train_autoencoder.py run's frozen parts: DINOv3 (dinov3_file), as an Autoencoder that
    encodes, and LPIPS (load_lpips; None at --perceptual-weight 0). Returns (autoencoder, LPIPS,
    the DINOv3 file)."""
    dino_path = str(dinov3_file(args.dinov3, source, source_path, "--init-from"))
    encoder = Autoencoder(None, load_dinov3(dino_path, device=device)).to(device).eval()
    lpips = (load_lpips(args.vgg, args.lpips, source, source_path, device)
             if args.perceptual_weight > 0 else None)
    return encoder, lpips, dino_path


def load_lpips(vgg, lin, source, source_path, device="cpu"):
    """LPIPS from --vgg and --lpips, else from the source checkpoint's loss.perceptual_loss.*,
    else an error naming the files."""
    if vgg or lin:
        if not (vgg and lin):
            raise UsageError(f"LPIPS needs both files: --vgg {VGG_FILE} and --lpips {LIN_FILE}")
        return lpips_from_files(vgg, lin, device)
    if any(k.startswith(LPIPS_PREFIX) for k in source):
        return lpips_from_checkpoint(source, str(source_path), device)
    where = f" in {source_path}" if source_path else ""
    raise UsageError(f"no LPIPS weights{where}: {LPIPS_HINT}")


def lpips_from_files(vgg_path, lin_path, device="cpu"):
    """LPIPS from torchvision's VGG16 file and lpips' vgg.pth (legacy pickles are fine)."""
    vgg, lin = read_state_dict(vgg_path), read_state_dict(lin_path)
    sd = {("net." + k if k.startswith("features.") else k): v for k, v in vgg.items()
          if not k.startswith("classifier.")}
    sd.update({k: v for k, v in lin.items() if LIN_KEY.fullmatch(k)})
    return build_lpips(sd, f"{vgg_path} + {lin_path}", "", device)


def lpips_from_checkpoint(sd, source, device="cpu"):
    """LPIPS from the loss.perceptual_loss.* keys of an official (or our) training checkpoint."""
    from train_autoencoder import LPIPS_SCALE, LPIPS_SHIFT
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
    return build_lpips(ours, source, LPIPS_PREFIX, device)


def lpips_config(sd):
    """LPIPSConfig of a trunk's conv indices (ours: net.features.{i}.*): convs of a stage are
    2 apart (conv, ReLU), a max-pool between stages makes it 3."""
    from train_autoencoder import LPIPSConfig
    conv = re.compile(r"net\.features\.(\d+)\.weight")
    idxs = sorted(int(m[1]) for m in map(conv.fullmatch, sd) if m)
    if not idxs:
        raise ValueError("no LPIPS trunk weights (net.features.{i}.weight)")
    stages, start = [], 0
    for j in range(1, len(idxs) + 1):
        if j == len(idxs) or idxs[j] - idxs[j - 1] != 2:
            stages.append((sd[f"net.features.{idxs[j - 1]}.weight"].shape[0], j - start))
            start = j
    return LPIPSConfig(stages=tuple(stages))


def build_lpips(sd, source, prefix, device):
    """LPIPS of the trunk's shapes in `sd` (our names), frozen."""
    from train_autoencoder import LPIPS
    try:
        config = lpips_config(sd)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{source}: not LPIPS VGG16 weights ({e})") from None
    return build(LPIPS, config, sd, source, prefix, device).requires_grad_(False)


def lpips_official_state_dict(lpips):
    """Ours -> the official loss.perceptual_loss.* layout (without the prefix), constants included,
    so our checkpoints can be fine-tuned again like the official ones."""
    from train_autoencoder import LPIPS_SCALE, LPIPS_SHIFT
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


def discriminator_config(sd):
    """DiscriminatorConfig of the shapes of main.* (the PatchGAN's own names)."""
    from train_autoencoder import DiscriminatorConfig
    if "main.0.weight" not in sd:
        raise ValueError("no discriminator weights (main.0.weight)")
    ndf, cin = sd["main.0.weight"].shape[:2]
    n_layers = sum(1 for k in sd if re.fullmatch(r"main\.\d+\.running_mean", k))
    return DiscriminatorConfig(in_channels=cin, ndf=ndf, n_layers=n_layers)


def discriminator_from_checkpoint(sd, source, device="cpu"):
    """The discriminator of a training checkpoint (loss.discriminator.*, running statistics
    included), in its own memory (it is trained further), in train mode."""
    from train_autoencoder import NLayerDiscriminator
    sub = {k: v.clone() for k, v in sub_state_dict(sd, DISC_PREFIX).items()}
    try:
        config = discriminator_config(sub)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{source}: {e}") from None
    return build(NLayerDiscriminator, config, sub, source, DISC_PREFIX, device).train()


def autoencoder_configs(source, residual, dino_dim, decoder_overrides, residual_overrides):
    """A train_autoencoder.py run's decoder config and (`residual`) residual ViT config: the
    source checkpoint's shapes where it has them, else the defaults, the overrides (dicts of
    fields) on top; z_channels follows DINOv3's width (+ the residual ViT's channels)."""
    dec = sub_state_dict(source, "decoder.")
    dcfg = DecoderConfig.from_state_dict(dec) if dec else DecoderConfig()
    dcfg = dataclasses.replace(dcfg, **decoder_overrides)
    rcfg = None
    if residual:
        vit = sub_state_dict(source, "extra_vit.")
        rcfg = (ResidualViTConfig.from_state_dict(residual_vit_keymap(vit)) if vit
                else ResidualViTConfig())
        rcfg = dataclasses.replace(rcfg, **residual_overrides)
    dcfg = dataclasses.replace(dcfg, z_channels=dino_dim + (rcfg.out_channels if rcfg else 0))
    return dcfg, rcfg


def trained_weights(source, residual):
    """What the source checkpoint holds of the trained parts, under their names: decoder.* (and,
    with `residual`, extra_vit.*) through the models' key maps."""
    out = {}
    if any(k.startswith("decoder.") for k in source):
        out = {"decoder." + k: v for k, v in decoder_keymap(sub_state_dict(source, "decoder."))
               .items()}
    if residual and any(k.startswith("extra_vit.") for k in source):
        out.update({"extra_vit." + k: v for k, v in residual_vit_keymap(source).items()})
    return out


def autoencoder_state_dict(dino, trained, disc=None, lpips=None):
    """Our checkpoint in the official layout: encoder.* (DINOv3, original layout), decoder.*,
    extra_vit.* (R), loss.discriminator.*, loss.perceptual_loss.*: what load_autoencoder reads
    and what --init-from fine-tunes again. CPU copies."""
    sd = {"encoder." + k: v for k, v in dinov3_official_state_dict(dino).items()}
    sd.update(trained.state_dict())
    if disc is not None:
        sd.update({DISC_PREFIX + k: v for k, v in disc.state_dict().items()})
    if lpips is not None:
        sd.update({LPIPS_PREFIX + k: v for k, v in lpips_official_state_dict(lpips).items()})
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def autoencoder_run_record(args, dino_path, trained, disc, lpips):
    """What a train_autoencoder.py checkpoint's run.json records (and its step): the kind of run,
    its sources, the networks' configs and the arguments."""
    config = lambda m: dataclasses.asdict(m.config) if m is not None else None
    return {"ae": args.ae, "stage": args.stage, "resolution": args.resolution, "crops": args.crops,
            "sources": {"dinov3": dino_path, "init_from": args.init_from},
            "decoder": config(trained.decoder), "residual_vit": config(trained.extra_vit),
            "discriminator": config(disc), "lpips": config(lpips),
            "args": {k: (str(v) if isinstance(v, torch.device) else v)
                     for k, v in vars(args).items()}}


def write_autoencoder_checkpoint(folder, dino, trained, disc, lpips, opt, opt_d):
    """A train_autoencoder.py checkpoint's weights: autoencoder.safetensors (in the layout of
    autoencoder_state_dict) and optimizer.pt ({"ae": the autoencoder's Adam, "disc": the
    discriminator's or None})."""
    save_file(autoencoder_state_dict(dino, trained, disc, lpips),
              str(Path(folder) / "autoencoder.safetensors"), metadata={"format": "pt"})
    torch.save({"ae": opt.state_dict(), "disc": opt_d.state_dict() if opt_d else None},
               Path(folder) / "optimizer.pt")


def read_autoencoder_optimizers(folder, opt, opt_d, device):
    """write_autoencoder_checkpoint's optimizer.pt into this run's optimisers (the weights were
    loaded with the models)."""
    state = torch.load(Path(folder) / "optimizer.pt", map_location=device, weights_only=True)
    opt.load_state_dict(state["ae"])
    if opt_d is not None:
        if state["disc"] is None:
            raise UsageError(f"--resume {folder}: that run had no discriminator (--disc-weight 0)")
        opt_d.load_state_dict(state["disc"])
