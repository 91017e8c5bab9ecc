"""
Test helper (not a test): write a tiny NextDiT checkpoint in the official SVG-T2I layout.

The official trainer saves `FSDP.state_dict()` (FULL_STATE_DICT, wrapper prefixes stripped) with `torch.save` as
`<ckpt>/consolidated.00-of-01.pth` (and the EMA as `consolidated_ema.00-of-01.pth`): a flat OrderedDict
name -> fp32 tensor, in module registration order. The key list below is written out by hand from the official
key table (reference section 3), not taken from nextdit.py's modules, so a loader test compares two independent
descriptions of the same checkpoint. Weights are random (not the zero-heavy training init) so every parameter
changes the output.
"""

from collections import OrderedDict
from pathlib import Path

import torch

from nextdit import NextDiTConfig

CONSOLIDATED = "consolidated.00-of-01.pth"
CONSOLIDATED_EMA = "consolidated_ema.00-of-01.pth"


def official_keys_and_shapes(config=None):
    """[(key, shape)] of the official state dict for `config`, in the official order."""
    c = config or NextDiTConfig.tiny()
    D, hd, F, T = c.dim, c.dim // c.n_heads, c.ffn_dim, min(c.dim, 1024)
    patch = c.patch_size * c.patch_size * c.in_channels
    keys = []

    def add(name, *shape):
        keys.append((name, tuple(shape)))

    def block(prefix, modulation):
        add(f"{prefix}.attention.qkv.weight", (c.n_heads + 2 * c.n_kv_heads) * hd, D)  # [q | k | v]
        add(f"{prefix}.attention.out.weight", D, D)
        add(f"{prefix}.attention.q_norm.weight", hd)
        add(f"{prefix}.attention.k_norm.weight", hd)
        add(f"{prefix}.feed_forward.w1.weight", F, D)
        add(f"{prefix}.feed_forward.w2.weight", D, F)
        add(f"{prefix}.feed_forward.w3.weight", F, D)
        for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            add(f"{prefix}.{norm}.weight", D)
        if modulation:
            add(f"{prefix}.adaLN_modulation.1.weight", 4 * D, T)
            add(f"{prefix}.adaLN_modulation.1.bias", 4 * D)

    add("x_embedder.weight", D, patch)
    add("x_embedder.bias", D)
    for i in range(c.n_refiner_layers):
        block(f"noise_refiner.{i}", True)
    for i in range(c.n_refiner_layers):
        block(f"context_refiner.{i}", False)
    add("t_embedder.mlp.0.weight", T, 256)
    add("t_embedder.mlp.0.bias", T)
    add("t_embedder.mlp.2.weight", T, T)
    add("t_embedder.mlp.2.bias", T)
    add("cap_embedder.0.weight", c.cap_feat_dim)
    add("cap_embedder.1.weight", D, c.cap_feat_dim)
    add("cap_embedder.1.bias", D)
    for i in range(c.n_layers):
        block(f"layers.{i}", True)
    add("norm_final.weight", D)
    add("final_layer.linear.weight", patch, D)
    add("final_layer.linear.bias", patch)
    add("final_layer.adaLN_modulation.1.weight", D, T)
    add("final_layer.adaLN_modulation.1.bias", D)
    return keys


def official_state_dict(config=None, seed=0):
    """OrderedDict of random fp32 tensors with the official keys and shapes (deterministic in `seed`)."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for name, shape in official_keys_and_shapes(config):
        if len(shape) == 2:  # Linear weight: unit-variance outputs
            value = torch.randn(shape, generator=g) / shape[1] ** 0.5
        elif name.endswith("bias"):
            value = 0.1 * torch.randn(shape, generator=g)
        else:  # RMSNorm weight: around 1, but not 1
            value = 1 + 0.2 * torch.randn(shape, generator=g)
        sd[name] = value
    return sd


def write_official_consolidated(path, config=None, seed=0):
    """Write the official flat state dict with torch.save. `path` is the .pth file, or a folder that gets
    `consolidated.00-of-01.pth`. Returns the file path."""
    path = Path(path)
    if path.suffix != ".pth":
        path.mkdir(parents=True, exist_ok=True)
        path = path / CONSOLIDATED
    torch.save(official_state_dict(config, seed), path)
    return path
