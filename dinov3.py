"""DINOv3 ViT-S/16+: the frozen image encoder whose patch features are SVG-T2I's latent space.

An image [B, 3, H, W] (ImageNet-normalised RGB) becomes final-normed patch tokens
[B, H/16 * W/16, 384] in row-major patch order, the official
`forward_features(x)["x_norm_patchtokens"]`.

Architecture (DINOv3, Simeoni et al. 2025): a 16x16 patch embedding, one cls token and 4 "storage"
(register) tokens, 12 pre-norm blocks with 2-D rotary position embedding (RoPE) on the patch
tokens, LayerScale and a SwiGLU MLP, then one final LayerNorm over all tokens. No learned
absolute positions.

Module and parameter names mirror the original checkpoint keys (`blocks.3.attn.qkv.weight` ...), so
the key map at the end (dinov3_keymap; the plumbing's load_dinov3 reads the files) is short and
explicit.
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Mean and std of ImageNet RGB in [0, 1]: DINOv3 expects (x - mean) / std per channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DINOv3Config:
    """Shape of a DINOv3 ViT with SwiGLU MLP (the "+" models); defaults are ViT-S/16+."""

    patch_size: int = 16
    in_chans: int = 3
    dim: int = 384
    depth: int = 12
    n_heads: int = 6
    ffn_dim: int = 1536  # SwiGLU hidden width: int(384 * 6 * 2/3) rounded up to a multiple of 8
    n_storage_tokens: int = 4
    rope_base: float = 100.0  # only initialises `rope_embed.periods`; a checkpoint's periods win
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 4:
            raise ValueError(f"DINOv3Config: dim {self.dim} must split into {self.n_heads} heads "
                             "whose size is a multiple of 4 (RoPE gives a quarter of each head "
                             "to y, a quarter to x, twice)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def vits16plus(cls) -> "DINOv3Config":
        """dinov3_vits16plus as the official hub builder sets it (28.7M parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> "DINOv3Config":
        """For tests: two blocks, but the real head size (64), so RoPE has the real 16 periods."""
        return cls(dim=128, depth=2, n_heads=2, ffn_dim=256)

    @classmethod
    def from_state_dict(cls, sd: dict, hf_config: dict | None = None) -> "DINOv3Config":
        """Read the config off the tensor shapes (our names), so tiny test checkpoints load
        through the same code.

        The head count is the one thing shapes cannot give: it comes from the periods
        (head_dim = 4 * #periods), else from HF config.json, else the released
        models' 64-dim heads.
        """
        dim = _shape(sd, "cls_token", -1, _shape(sd, "patch_embed.proj.weight", 0, 384))
        blocks = {int(k.split(".")[1]) for k in sd if re.fullmatch(r"blocks\.\d+\..+", k)}
        if "rope_embed.periods" in sd:
            head_dim = 4 * sd["rope_embed.periods"].numel()
        elif hf_config is not None:
            head_dim = dim // hf_config.get("num_attention_heads", 6)  # 6: transformers' default
        else:
            head_dim = _HEAD_DIM_DEFAULT
        if head_dim == 0 or dim % head_dim:
            raise ValueError(f"cannot split width {dim} into heads of {head_dim} (from the RoPE "
                             "periods or config.json): the checkpoint is inconsistent")
        hf = hf_config or {}
        return cls(
            patch_size=_shape(sd, "patch_embed.proj.weight", -1, 16),
            in_chans=_shape(sd, "patch_embed.proj.weight", 1, 3),
            dim=dim,
            depth=max(blocks) + 1 if blocks else 0,
            n_heads=dim // head_dim,
            ffn_dim=_shape(sd, "blocks.0.mlp.w1.weight", 0, 1536),
            n_storage_tokens=_shape(sd, "storage_tokens", 1, 4),
            rope_base=float(hf.get("rope_theta", 100.0)),  # HF's defaults where a config omits them
            norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        )


def rope_periods(head_dim: int, base: float) -> torch.Tensor:
    """The official RoPE periods base^(2k / (head_dim/2)), k < head_dim/4, in fp32:
    [head_dim // 4].

    transformers computes its inv_freq from the same fp32 expression, so 1 / these == its inv_freq.
    """
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def rope_rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate channel d with channel d + D/2 by angle[d]
    ("rotate-half" layout, not interleaved pairs).

    x: [..., N, D]; sin, cos: [N, D]. For d < D/2: x'_d = x_d cos - x_{d+D/2} sin and
    x'_{d+D/2} = x_{d+D/2} cos + x_d sin (the angle table repeats after D/2, so both use angle[d]).
    """
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RopeEmbedding(nn.Module):
    """Axial 2-D RoPE tables from patch-centre coordinates, each axis normalised to
    (-1, 1) on its own.

    `periods` is a persistent buffer because the official checkpoint stores it (rounded to bf16),
    and the official model uses the stored values rather than the formula. Always fp32.
    The official training-mode coordinate augmentation (random rescale in [0.5, 2]) is deliberately
    absent: DINOv3 is a frozen encoder here, so the tables never depend on train()/eval().
    """

    def __init__(self, config: DINOv3Config):
        super().__init__()
        self.register_buffer("periods", rope_periods(config.head_dim, config.rope_base))

    def forward(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """sin, cos: [h*w, head_dim] fp32, rows in row-major patch order."""
        periods = self.periods.float()
        dd = dict(device=periods.device, dtype=torch.float32)
        coords_y = torch.arange(0.5, h, **dd) / h  # patch centres in (0, 1)
        coords_x = torch.arange(0.5, w, **dd) / w
        coords = torch.stack(torch.meshgrid(coords_y, coords_x, indexing="ij"), dim=-1)  # [h, w, 2]
        coords = 2.0 * coords.flatten(0, 1) - 1.0  # [h*w, 2] in (-1, 1)
        angles = 2 * math.pi * coords[:, :, None] / periods  # [h*w, 2, head_dim/4]
        # [y_0..y_{D/4-1}, x_0..x_{D/4-1}] then repeated once: [h*w, head_dim] = [y, x, y, x]
        angles = angles.flatten(1, 2).tile(2)
        return torch.sin(angles), torch.cos(angles)


class PatchEmbed(nn.Module):
    def __init__(self, config: DINOv3Config):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_chans, config.dim, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, dim, h, w] -> [B, h*w, dim] row-major


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))  # official init; checkpoints set it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention; RoPE on the patch tokens of q and k only
    (cls and storage tokens stay put).

    The official `qkv` has a learnable k bias that a fixed `bias_mask` zeroes; the loader folds the
    mask into `qkv.bias` once, so here it is a plain Linear whose k third of the bias is 0.
    """

    def __init__(self, config: DINOv3Config):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, N, C = x.shape
        # qkv rows are [q | k | v], each head-major: [B, N, 3, heads, head_dim] -> 3 x
        # [B, heads, N, head_dim]
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads,
                                   self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        sin, cos = rope
        n_prefix = N - sin.shape[0]  # cls + storage tokens
        # Rotate in fp32 (as the official code does) even when the model runs in bf16,
        # then cast back.
        q = torch.cat([q[:, :, :n_prefix],
                       rope_rotate(q[:, :, n_prefix:].float(), sin, cos).to(q.dtype)], dim=2)
        k = torch.cat([k[:, :, :n_prefix],
                       rope_rotate(k[:, :, n_prefix:].float(), sin, cos).to(k.dtype)], dim=2)
        x = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(head_dim), no mask
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x): w1 is the gate, w2 the linear "up", w3 the "down" projection."""

    def __init__(self, config: DINOv3Config):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim)
        self.w2 = nn.Linear(config.dim, config.ffn_dim)
        self.w3 = nn.Linear(config.ffn_dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Block(nn.Module):
    def __init__(self, config: DINOv3Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ls1 = LayerScale(config.dim)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = SwiGLU(config)
        self.ls2 = LayerScale(config.dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv3(nn.Module):
    """DINOv3 vision transformer; `forward` returns the final-normed patch tokens
    (the SVG latent)."""

    def __init__(self, config: DINOv3Config):
        super().__init__()
        self.config = config
        self.n_prefix = 1 + config.n_storage_tokens
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, config.dim))
        self.storage_tokens = nn.Parameter(0.02 * torch.randn(1, config.n_storage_tokens,
                                                              config.dim))
        self.patch_embed = PatchEmbed(config)
        self.rope_embed = RopeEmbedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        # The official `mask_token` is dropped: it is for masked-image training only.
        # (The official cls is `cls_token + 0 * mask_token`, which equals cls_token unless
        # mask_token holds NaN/Inf.)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, H, W], ImageNet-normalised, H and W multiples of 16 ->
        [B, H/16 * W/16, dim]."""
        p = self.config.patch_size
        if pixels.ndim != 4 or pixels.shape[1] != self.config.in_chans:
            raise ValueError(f"DINOv3 expects images [B, {self.config.in_chans}, H, W], got shape "
                             f"{list(pixels.shape)}")
        H, W = pixels.shape[-2:]
        if H % p or W % p:
            # The official conv silently drops the leftover pixels; we refuse instead, since the
            # decoder and the latent grid assume H/16 x W/16 exactly.
            raise ValueError(f"DINOv3 needs image sides that are multiples of {p}, got {H}x{W}: "
                             f"resize or crop to e.g. {max(p, H // p * p)}x{max(p, W // p * p)}")
        B = pixels.shape[0]
        x = self.patch_embed(pixels.to(self.patch_embed.proj.weight.dtype))  # [B, h*w, dim]
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.storage_tokens.expand(B, -1, -1), x],
                      dim=1)
        rope = self.rope_embed(H // p, W // p)  # computed once, shared by all blocks and heads
        for block in self.blocks:
            x = block(x, rope)
        # LayerNorm is per token, so norming only the patch tokens equals the official
        # norm(all)[:, 5:].
        return self.norm(x[:, self.n_prefix:])


# -------------------------------------------------------------------------------------------------
# The key map. Three file layouts hold the same weights (plumbing.loading.load_dinov3 opens each):
#   original  `dinov3_vits16plus_pretrain_lvd1689m-*.pth`: our names exactly, plus
#   `mask_token` (dropped) and
#             `blocks.N.attn.qkv.bias_mask` (folded into the bias);
#   HF        `model.safetensors` (+ `config.json`): renamed keys, q/k/v split, no k bias, no
#   periods; Lightning an SVG autoencoder `.ckpt` whose `state_dict` holds the original keys
#   under `encoder.`.
# -------------------------------------------------------------------------------------------------

_HEAD_DIM_DEFAULT = 64  # the released ViTs S ... H+ have 64-dim heads (7B: 128)

# HF (transformers) names -> ours. Per-block names are relative to `layer.N.` / `blocks.N.`.
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "storage_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_HF_BLOCK = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.gate_proj.weight": "mlp.w1.weight", "mlp.gate_proj.bias": "mlp.w1.bias",
    "mlp.up_proj.weight": "mlp.w2.weight", "mlp.up_proj.bias": "mlp.w2.bias",
    "mlp.down_proj.weight": "mlp.w3.weight", "mlp.down_proj.bias": "mlp.w3.bias",
}
_HF_QKV = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "v_proj.bias")
# transformers <= 4.57 (the hub files) writes `layer.N.`, >= 5.0 writes `model.layer.N.`.
_HF_LAYER = re.compile(r"(?:model\.)?layer\.(\d+)\.(.+)")


def _from_original(sd: dict, missing: list) -> dict:
    """Original layout -> ours: drop `mask_token`, fold `bias_mask` into the qkv bias."""
    out = {}
    for key, t in sd.items():
        if key == "mask_token" or key.endswith(".attn.qkv.bias_mask"):
            continue
        if key.endswith(".attn.qkv.bias"):
            mask = sd.get(key + "_mask")
            if mask is None:  # required: without it we cannot tell whether the k bias is to be used
                missing.append(key + "_mask")
                continue
            if mask.shape != t.shape:
                raise ValueError(f"{key}_mask has shape {list(mask.shape)} but the bias "
                                 f"{list(t.shape)}")
            if not torch.isfinite(mask).all():
                raise ValueError(f"{key}_mask holds NaN/Inf: the file was saved from an "
                                 "uninitialised model (the official code leaves it NaN unless "
                                 "weights are loaded)")
            t = t * mask.to(t.dtype)  # [1 (q), 0 (k), 1 (v)]: the k bias is masked out
        out[key] = t
    return out


def _from_hf(sd: dict, missing: list) -> dict:
    """HF layout -> ours: rename, concatenate q/k/v (k has no bias in HF: zeros), drop
    `mask_token`."""
    out, qkv = {}, {}  # qkv[layer][name] collects the split projections of one block
    for key, t in sd.items():
        m = _HF_LAYER.fullmatch(key)
        if key == "embeddings.mask_token":
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = t
        elif m and m.group(2) in _HF_BLOCK:
            out[f"blocks.{m.group(1)}.{_HF_BLOCK[m.group(2)]}"] = t
        elif m and m.group(2).removeprefix("attention.") in _HF_QKV + ("k_proj.bias",):
            qkv.setdefault(int(m.group(1)), {})[m.group(2).removeprefix("attention.")] = (key, t)
        else:
            out[key] = t  # left under its own name: reported as unexpected
    for i, parts in sorted(qkv.items()):
        prefix = parts[next(iter(parts))][0].rsplit("attention.", 1)[0]  # (model.)layer.i.
        absent = [prefix + "attention." + n for n in _HF_QKV if n not in parts]
        if absent:
            missing.extend(absent)
            continue
        q, k, v, qb, vb = (parts[n][1] for n in _HF_QKV)
        kb = parts["k_proj.bias"][1] if "k_proj.bias" in parts else torch.zeros_like(qb)
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v], dim=0)  # [3 dim, dim]: q | k | v
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([qb, kb, vb], dim=0)
    return out


def dinov3_keymap(state_dict: dict, hf_config: dict | None = None, source: str = "state dict"):
    """An original or HF state dict under our names -> (DINOv3Config, state dict, missing keys).

    `missing` names the file's keys the map needed but did not find (a bias_mask, a q/k/v part),
    for the plumbing's build to report together with every other key problem. `hf_config` is a
    parsed HF config.json (head count, rope_theta, eps); without it an HF state dict gets 64-dim
    heads, base 100, eps 1e-5.
    """
    keys = list(state_dict)
    if any(k.startswith("embeddings.") for k in keys):
        layout = "hf"
    elif "cls_token" in state_dict or any(k.startswith("blocks.") for k in keys):
        layout = "original"
    else:
        raise ValueError(f"{source} is not a DINOv3 checkpoint: expected keys like 'cls_token', "
                         "'blocks.0.attn.qkv.weight' (original) or 'embeddings.cls_token', "
                         "'layer.0.attention.q_proj.weight' (Hugging Face); found "
                         f"{', '.join(keys[:5]) or 'none'}{' ...' if len(keys) > 5 else ''}")
    missing = []
    if layout == "hf":
        if hf_config is not None:
            _check_hf_config(hf_config, source)
        sd = _from_hf(state_dict, missing)
        # HF files carry no periods (transformers recomputes inv_freq), so we compute them from the
        # config with the official fp32 formula: the numbers transformers uses. The official .pth
        # instead stores them rounded to bf16 (up to 0.2% off), so features from an HF file differ
        # from the .pth ones by ~1e-3.
        config = DINOv3Config.from_state_dict(sd, hf_config)
        sd["rope_embed.periods"] = rope_periods(config.head_dim, config.rope_base)
    else:
        sd = _from_original(state_dict, missing)
        config = DINOv3Config.from_state_dict(sd)
    return config, sd, missing


def _shape(sd: dict, key: str, axis: int, default: int) -> int:
    """sd[key].shape[axis], or `default` when the key is absent or too flat
    (the key check reports it)."""
    t = sd.get(key)
    return t.shape[axis] if isinstance(t, torch.Tensor) and -t.ndim <= axis < t.ndim else default


def _check_hf_config(hf_config: dict, source: str):
    if hf_config.get("model_type") != "dinov3_vit":
        raise ValueError(f"{source}: config.json has model_type {hf_config.get('model_type')!r}, "
                         "expected 'dinov3_vit': this is not a DINOv3 ViT checkpoint")
    # transformers' defaults are a GELU MLP without gate; DINOv3 ViT-S/16+ sets the gated SiLU one.
    act, gated = hf_config.get("hidden_act", "gelu"), hf_config.get("use_gated_mlp", False)
    if act != "silu" or not gated:
        raise ValueError(f"{source}: config.json has hidden_act={act!r}, use_gated_mlp={gated}; "
                         "only the SwiGLU DINOv3 ViTs (hidden_act='silu', use_gated_mlp=true, "
                         "e.g. ViT-S/16+) are supported")


def dinov3_official_state_dict(model: DINOv3) -> dict:
    """The inverse of the key map: our weights in the original .pth layout. The k-bias mask is
    written back as `bias_mask` (1 for q and v, 0 for k), the bias itself already holding
    zeros there."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dim = model.config.dim
    for k in list(sd):
        if k.endswith("attn.qkv.bias"):
            mask = torch.ones(3 * dim)
            mask[dim:2 * dim] = 0
            sd[k.replace(".bias", ".bias_mask")] = mask
    return sd
