"""Write tiny DINOv3 checkpoints in the exact official file layouts (helpers for tests, not tests).

Every writer takes a path, a seed (or a ready state dict in the original layout) and a DINOv3Config
(default `DINOv3Config.tiny()`), and returns the config it wrote:

    write_official_pth(path, seed=0)     the original `dinov3_vits16plus_pretrain_lvd1689m-*.pth` layout
    write_hf(folder, seed=0)             a Hugging Face folder: model.safetensors + config.json
    write_lightning_ckpt(path, seed=0)   an SVG autoencoder Lightning .ckpt (DINOv3 under `encoder.`)

The same seed and config give the same weights in every layout.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dinov3 import DINOv3Config


def official_periods(config: DINOv3Config, rounding: str = "bf16") -> torch.Tensor:
    """RoPE periods base^(2k / (head_dim/2)) in fp32, by default rounded to bf16 as the official .pth stores them.

    rounding: "bf16" (the official checkpoint's values) or "formula" (exact fp32, what HF recomputes).
    """
    hd = config.head_dim
    periods = config.rope_base ** (2 * torch.arange(hd // 4, dtype=torch.float32) / (hd // 2))
    if rounding == "bf16":
        return periods.to(torch.bfloat16).float()
    if rounding == "formula":
        return periods
    raise ValueError(f"rounding must be 'bf16' or 'formula', got {rounding!r}")


def random_official_state_dict(config: DINOv3Config | None = None, seed: int = 0,
                               periods: str = "bf16") -> dict[str, torch.Tensor]:
    """Random fp32 weights under the original checkpoint's 17 + 17*depth keys, in its order.

    Scales keep activations O(1) and attention non-uniform so that a wrong detail shows in the output: LayerScale
    gammas in [0.5, 1.5] (not ~1e-5), a non-zero k bias (which `bias_mask` must cancel), finite `mask_token`.
    periods: "bf16" (as the official file) or "formula" (exact fp32; then HF and original files agree bit for bit).
    """
    c = config or DINOv3Config.tiny()
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return std * torch.randn(*shape, generator=g)

    def linear(prefix, n_out, n_in):
        sd[prefix + ".weight"] = randn(n_out, n_in, std=n_in ** -0.5)
        sd[prefix + ".bias"] = randn(n_out, std=0.1)

    def norm(prefix):
        sd[prefix + ".weight"] = 1 + randn(c.dim, std=0.1)
        sd[prefix + ".bias"] = randn(c.dim, std=0.1)

    sd = {
        "cls_token": randn(1, 1, c.dim),
        "storage_tokens": randn(1, c.n_storage_tokens, c.dim),
        "mask_token": randn(1, c.dim),
        "patch_embed.proj.weight": randn(c.dim, c.in_chans, c.patch_size, c.patch_size,
                                         std=(c.in_chans * c.patch_size ** 2) ** -0.5),
        "patch_embed.proj.bias": randn(c.dim, std=0.1),
        "rope_embed.periods": official_periods(c, periods),
    }
    for i in range(c.depth):
        b = f"blocks.{i}"
        norm(b + ".norm1")
        linear(b + ".attn.qkv", 3 * c.dim, c.dim)
        sd[b + ".attn.qkv.bias"] = randn(3 * c.dim, std=0.5)  # k third included: the mask must remove it
        sd[b + ".attn.qkv.bias_mask"] = torch.cat([torch.ones(c.dim), torch.zeros(c.dim), torch.ones(c.dim)])
        linear(b + ".attn.proj", c.dim, c.dim)
        sd[b + ".ls1.gamma"] = 0.5 + torch.rand(c.dim, generator=g)
        norm(b + ".norm2")
        linear(b + ".mlp.w1", c.ffn_dim, c.dim)
        linear(b + ".mlp.w2", c.ffn_dim, c.dim)
        linear(b + ".mlp.w3", c.dim, c.ffn_dim)
        sd[b + ".ls2.gamma"] = 0.5 + torch.rand(c.dim, generator=g)
    norm("norm")
    return sd


def official_to_hf(sd: dict[str, torch.Tensor], layer_prefix: str = "layer.") -> dict[str, torch.Tensor]:
    """The transformers conversion of an original state dict (as convert_dinov3_vit_to_hf does it).

    layer_prefix: "layer." (transformers <= 4.57, the hub files) or "model.layer." (transformers >= 5).
    Drops `rope_embed.periods` and `bias_mask` (HF has no k bias); `mask_token` [1, D] -> [1, 1, D].
    """
    block_names = {
        "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
        "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
        "attn.proj.weight": "attention.o_proj.weight", "attn.proj.bias": "attention.o_proj.bias",
        "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
        "mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w1.bias": "mlp.gate_proj.bias",
        "mlp.w2.weight": "mlp.up_proj.weight", "mlp.w2.bias": "mlp.up_proj.bias",
        "mlp.w3.weight": "mlp.down_proj.weight", "mlp.w3.bias": "mlp.down_proj.bias",
    }
    hf = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"].unsqueeze(1),
        "embeddings.register_tokens": sd["storage_tokens"],
        "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
    }
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b, h = f"blocks.{i}.", f"{layer_prefix}{i}."
        for ours, theirs in block_names.items():
            hf[h + theirs] = sd[b + ours]
        q, k, v = sd[b + "attn.qkv.weight"].chunk(3, dim=0)
        qb, _, vb = sd[b + "attn.qkv.bias"].chunk(3, dim=0)  # the (masked) k bias is dropped
        hf[h + "attention.q_proj.weight"], hf[h + "attention.k_proj.weight"] = q, k
        hf[h + "attention.v_proj.weight"] = v
        hf[h + "attention.q_proj.bias"], hf[h + "attention.v_proj.bias"] = qb, vb
    hf["norm.weight"], hf["norm.bias"] = sd["norm.weight"], sd["norm.bias"]
    return {k: t.contiguous().clone() for k, t in hf.items()}  # safetensors refuses shared storage


def hf_config_dict(config: DINOv3Config) -> dict:
    """config.json of a DINOv3ViTModel with this shape (fields as on the hub S/16+ config)."""
    return {
        "architectures": ["DINOv3ViTModel"],
        "model_type": "dinov3_vit",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.n_heads,
        "num_register_tokens": config.n_storage_tokens,
        "num_channels": config.in_chans,
        "patch_size": config.patch_size,
        "image_size": 224,
        "hidden_act": "silu",
        "use_gated_mlp": True,
        "rope_theta": config.rope_base,
        "layer_norm_eps": config.norm_eps,
        "layerscale_value": 1.0,
        "query_bias": True,
        "key_bias": False,
        "value_bias": True,
        "proj_bias": True,
        "mlp_bias": True,
        "pos_embed_rescale": 2.0,
        "pos_embed_shift": None,
        "pos_embed_jitter": None,
        "torch_dtype": "float32",
    }


def write_official_pth(path, seed: int = 0, config: DINOv3Config | None = None, *, periods: str = "bf16",
                       state_dict: dict | None = None) -> DINOv3Config:
    """torch.save the original-layout state dict (random from `seed`, or `state_dict` of shape `config`)."""
    config = config or DINOv3Config.tiny()
    sd = state_dict if state_dict is not None else random_official_state_dict(config, seed, periods)
    torch.save(sd, path)
    return config


def write_hf(folder, seed: int = 0, config: DINOv3Config | None = None, *, layer_prefix: str = "layer.",
             write_config: bool = True, state_dict: dict | None = None) -> DINOv3Config:
    """Write folder/model.safetensors (HF keys, metadata format=pt) and, unless told not to, folder/config.json."""
    config = config or DINOv3Config.tiny()
    sd = state_dict if state_dict is not None else random_official_state_dict(config, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(official_to_hf(sd, layer_prefix), str(folder / "model.safetensors"), metadata={"format": "pt"})
    if write_config:
        (folder / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
    return config


def write_lightning_ckpt(path, seed: int = 0, config: DINOv3Config | None = None, *, periods: str = "bf16",
                         state_dict: dict | None = None) -> DINOv3Config:
    """An SVG autoencoder Lightning checkpoint: DINOv3 under `encoder.`, plus decoder/loss keys and bookkeeping."""
    config = config or DINOv3Config.tiny()
    sd = state_dict if state_dict is not None else random_official_state_dict(config, seed, periods)
    full = {"encoder." + k: v for k, v in sd.items()}
    full["decoder.conv_in.weight"] = torch.zeros(8, config.dim, 3, 3)  # other parts of the autoencoder
    full["loss.logvar"] = torch.zeros(())
    torch.save({"epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.6.0", "state_dict": full,
                "optimizer_states": [], "lr_schedulers": []}, path)
    return config
