"""
Unified Next-DiT: the single-stream diffusion transformer of SVG-T2I (2.6B), and its key map.

One joint sequence per sample, [valid caption tokens, image tokens, padding], runs through
`n_layers` blocks of sandwich-normed attention + SwiGLU, conditioned on the timestep by
scale-and-gate adaLN. Before that, two "context refiner" blocks (no adaLN) refine the caption alone
and two "noise refiner" blocks (with adaLN) refine the image alone. Positions are 3-axis RoPE
(M-RoPE): caption token j sits at (j, 0, 0), image token (r, c) at (cap_len, r, c). Attention is
grouped-query (24 query heads share 8 K/V heads in the 2B model).

Conventions: x is a normalised DINOv3 latent [C=384, H/16, W/16]
(one token per DINO patch, patch_size 1); t in [0, 1] with 0 = pure noise and 1 = data
(not scaled by 1000); the output is the velocity d x_t / d t. Module and parameter names mirror the
official checkpoint keys, so loading (plumbing.loading.load_nextdit) is a plain strict load. At the
end: LoRA adapters for fine-tuning (train.py --lora), then the key map.

Where this code deliberately differs from the official implementation
(same function, different mechanics):
- The context refiner runs on the caption truncated to the longest valid caption in the batch, not
  on the full padded length. Padded keys are masked either way, so valid outputs are identical, and
  extra caption padding cannot change any output at all.
- RoPE angles are computed from the position ids directly (float64 product, rounded to float32, as
  the official table), as real cos/sin instead of complex64, so nothing in the model is complex or
  a non-parameter buffer.
- No attention mask is passed when nothing in the batch is padded, so the fast SDPA kernels can
  run; K/V heads are never repeated, except on CUDA when a mask is needed
  (see REPEAT_KV_WHEN_MASKED).
- q/k RMSNorm eps is 1e-6 (upstream's value without apex; with apex installed upstream
  silently used 1e-5).
- Inputs are cast to the parameter dtype when autocast is off
  (the official code would fail on a mismatch).
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint


@dataclass
class NextDiTConfig:
    in_channels: int = 384  # DINOv3 ViT-S/16+ channels; the output is as wide (no learned sigma)
    patch_size: int = 1  # one token per latent pixel (= per DINO patch)
    dim: int = 2304
    n_layers: int = 26  # joint blocks
    n_refiner_layers: int = 2  # each of: noise refiner (adaLN), context refiner (no adaLN)
    n_heads: int = 24
    n_kv_heads: int = 8  # GQA: query head h reads K/V head h // (n_heads // n_kv_heads)
    ffn_dim: int = 9216  # 4 * dim rounded up to a multiple of 256; there is no LLaMA 2/3 factor
    cap_feat_dim: int = 2304  # Gemma-2-2B hidden size
    norm_eps: float = 1e-5  # sandwich norms and the caption RMSNorm
    qk_norm_eps: float = 1e-6  # q/k RMSNorm: upstream's eps without apex (with apex: 1e-5)
    axes_dims: tuple = (32, 32, 32)  # RoPE channels per axis (caption index, row, column)
    axes_lens: tuple = (600, 512, 512)  # positions per axis the official tables cover
    rope_theta: float = 10000.0

    def __post_init__(self):
        self.axes_dims, self.axes_lens = tuple(self.axes_dims), tuple(self.axes_lens)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"NextDiTConfig: dim {self.dim} must divide into n_heads "
                             f"{self.n_heads}, and n_heads into n_kv_heads {self.n_kv_heads}")
        dims = self.axes_dims
        if sum(dims) != self.head_dim or any(d % 2 for d in dims) or len(dims) != 3:
            raise ValueError(f"NextDiTConfig: axes_dims {self.axes_dims} must be 3 even numbers "
                             f"summing to head_dim {self.head_dim}")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def t_dim(self):
        # width of the timestep embedding, the only adaLN input
        return min(self.dim, 1024)

    def flops(self, cap_len, img_len):
        """Matmul FLOPs (2 per multiply-add) of one sample's forward with cap_len caption and
        img_len image tokens; the formula of train.py's MFU and bench/bench_gpu.py.

        Each block's linear layers cost 2 * P_block per token and its attention
        4 * (n_heads * head_dim) * S^2 (QK^T and AV), over its own sequence: the context refiner
        sees the caption, the noise refiner the image, the joint layers S = cap_len + img_len
        tokens. Plus the caption and patch embedders and the final linear, per token. Per-sample
        terms (adaLN, the timestep MLP) and elementwise work are left out (< 0.1%)."""
        d, hd, p2c = self.dim, self.head_dim, self.patch_size ** 2 * self.in_channels
        block = d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d \
            + 3 * d * self.ffn_dim                                 # qkv, out, w1 w2 w3
        S, R = cap_len + img_len, self.n_refiner_layers
        tokens = self.n_layers * S + R * (cap_len + img_len)
        squares = self.n_layers * S ** 2 + R * (cap_len ** 2 + img_len ** 2)
        embed = cap_len * self.cap_feat_dim * d + img_len * p2c * d + S * d * p2c
        return 2 * block * tokens + 4 * self.n_heads * hd * squares + 2 * embed

    @classmethod
    def from_name(cls, name):
        """A named preset from PRESETS: "2b", "0.8b", "tiny" or "toy"."""
        if name not in PRESETS:
            raise ValueError(f"unknown NextDiT preset {name!r}: choose one of "
                             f"{', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def tiny(cls):
        return cls.from_name("tiny")

    @classmethod
    def from_state_dict(cls, sd):
        """Infer the config from tensor shapes (official key names, prefixes already stripped).

        Not stored in the checkpoint, so taken as defaults: patch_size 1 (both released models),
        eps values, axes_lens, theta, and axes_dims = head_dim split into three equal parts
        (true for both released models).
        """
        need = ["x_embedder.weight", "layers.0.attention.qkv.weight",
                "layers.0.attention.q_norm.weight", "layers.0.feed_forward.w1.weight",
                "cap_embedder.1.weight"]
        missing = [k for k in need if k not in sd]
        if missing:
            raise ValueError(f"not a NextDiT checkpoint: missing {missing} (found keys like "
                             f"{list(sd)[:5]})")
        dim, in_channels = sd["x_embedder.weight"].shape
        head_dim = sd["layers.0.attention.q_norm.weight"].shape[0]
        qkv_heads = sd["layers.0.attention.qkv.weight"].shape[0] // head_dim
        n_heads = dim // head_dim
        if head_dim % 6 or dim % head_dim or (qkv_heads - n_heads) % 2:
            raise ValueError(f"NextDiT checkpoint has inconsistent attention shapes: dim {dim}, "
                             f"head_dim {head_dim}, qkv rows "
                             f"{sd['layers.0.attention.qkv.weight'].shape[0]}")

        def count(prefix):
            return len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})

        return cls(in_channels=in_channels, dim=dim, n_layers=count("layers"),
                   n_refiner_layers=count("noise_refiner"), n_heads=n_heads,
                   n_kv_heads=(qkv_heads - n_heads) // 2,
                   ffn_dim=sd["layers.0.feed_forward.w1.weight"].shape[0],
                   cap_feat_dim=sd["cap_embedder.1.weight"].shape[1],
                   axes_dims=(head_dim // 3,) * 3)


# The named presets. Both released models split each head into three equal RoPE axes.
PRESETS = {
    # NextDiT_2B_GQA_patch1_Adaln_Refiner: 2,611,246,336 parameters, the released SVG-T2I model
    "2b": dict(),
    # NextDiT_08B_GQA_patch1_Adaln_Refiner: 784,896,640 parameters
    # (the official 1-GPU training script)
    "0.8b": dict(dim=1152, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=4608,
                 axes_dims=(24, 24, 24)),
    # 0.24M parameters for tests; n_heads / n_kv_heads = 3 as in the 2B model
    "tiny": dict(in_channels=8, dim=72, n_layers=2, n_refiner_layers=1, n_heads=6, n_kv_heads=2,
                 ffn_dim=96, cap_feat_dim=32, axes_dims=(4, 4, 4)),
    # the toy model (python toy.py train): 48-wide heads as 3 x 16 RoPE axes; 4.5M parameters
    # with the toy's 128 latent channels and 64-wide captions
    # (train.py sets in_channels and cap_feat_dim from the encoders)
    "toy": dict(dim=192, n_layers=6, n_refiner_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=512,
                axes_dims=(16, 16, 16)),
}


# -------------------------------------------------------------------------------------------------
# Positions and rotary embedding


def position_ids(cap_lens, grid_sizes):
    """Joint-sequence positions [B, S, 3] (int64, CPU), S = max(cap_len + h * w).

    Sample i is laid out [caption 0..cap_len-1, image tokens row-major, padding]: caption token j
    -> (j, 0, 0), image token (r, c) -> (cap_len, r, c) (axis 0 is one past the sample's *own* last
    caption token), padding -> (0, 0, 0).
    """
    rows = []
    for cap_len, (h, w) in zip(cap_lens, grid_sizes):
        j = torch.arange(cap_len)
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cap = torch.stack([j, torch.zeros_like(j), torch.zeros_like(j)], dim=-1)
        img = torch.stack([torch.full((h * w,), cap_len), r.flatten(), c.flatten()], dim=-1)
        rows.append(torch.cat([cap, img]))
    return pad_sequence(rows, batch_first=True)


def rope_cos_sin(pos, axes_dims, theta=10000.0):
    """cos and sin of the RoPE angles, each [B, S, sum(axes_dims) // 2] float32, for
    positions pos [B, S, 3].

    Axis a contributes d_a / 2 angles n * theta^(-2k / d_a), k = 0..d_a/2-1, computed in float64
    and rounded to float32 (as the official complex64 table), concatenated in axis order.
    """
    angles = []
    for a, d in enumerate(axes_dims):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d)
        angles.append((pos[..., a, None].double() * omega).float())
    angles = torch.cat(angles, dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x [B, S, heads, head_dim] by cos/sin [B, S, head_dim // 2], in float32.

    Channels (2m, 2m + 1) are the real and imaginary part of complex number m
    (interleaved pairs, not rotate-half), multiplied by exp(i * angle_m). Channel blocks thus
    follow the axes: [axis0 | axis1 | axis2].
    """
    re, im = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).type_as(x)


def patchify(img, p):
    """[C, H, W] -> tokens [(H/p) * (W/p), p * p * C], row-major, token vector ordered
    (pH, pW, C)."""
    C, H, W = img.shape
    patches = img.reshape(C, H // p, p, W // p, p).permute(1, 3, 2, 4, 0)   # [H/p, W/p, p, p, C]
    return patches.reshape((H // p) * (W // p), p * p * C)


def unpatchify(tokens, h, w, p, C):
    """Inverse of patchify: tokens [h * w, p * p * C] -> [C, h * p, w * p]."""
    return tokens.reshape(h, w, p, p, C).permute(4, 0, 2, 1, 3).reshape(C, h * p, w * p)


def length_mask(lengths, max_len, device):
    """[B, max_len] bool, True on the first lengths[i] positions; None when nothing is padded."""
    if all(n == max_len for n in lengths):
        return None
    return torch.arange(max_len, device=device) < torch.tensor(lengths, device=device)[:, None]


# -------------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    """x / rms(x) in float32, rounded back to x's dtype, then times the weight
    (the official order)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class TimestepEmbedder(nn.Module):
    """t [B] in [0, 1] -> [cos(t f_k), sin(t f_k)] (256, cos first) -> Linear -> SiLU -> Linear
    -> [B, t_dim]."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoid(t, dim=256, max_period=10000):
        half = dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * k / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        emb = self.sinusoid(t, self.frequency_embedding_size)          # [B, 256]
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


# Device types on which K/V heads are repeated when a mask is needed. torch's CUDA kernels that
# take a mask (memory-efficient, cuDNN) do not take GQA: with enable_gqa they fall back to the math
# kernel, which materialises [B, H, S, S] scores. Repeating K/V
# (consecutive groups, h -> h // n_rep, as upstream) costs 2 * S * dim per layer. On CPU the flash
# kernel takes a mask and GQA together.
REPEAT_KV_WHEN_MASKED = {"cuda"}


class JointAttention(nn.Module):
    """GQA self-attention: fused qkv, q/k RMSNorm, M-RoPE, SDPA with a key-padding mask,
    output projection."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim,
                             bias=False)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.qk_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.qk_norm_eps)

    def forward(self, x, key_mask, cos, sin):
        # x [B, S, dim]; key_mask [B, S] bool (True = valid key) or None; cos/sin
        # [B, S, head_dim // 2]
        B, S, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)  # qkv rows: q | k | v
        q = apply_rope(self.q_norm(q.view(B, S, H, D)), cos, sin)  # q/k norm before RoPE
        k = apply_rope(self.k_norm(k.view(B, S, Hkv, D)), cos, sin)
        q, k = q.to(v.dtype).transpose(1, 2), k.to(v.dtype).transpose(1, 2)  # [B, H(kv), S, D]
        v = v.view(B, S, Hkv, D).transpose(1, 2)
        if key_mask is None:
            # Nothing padded: no mask, so the flash kernel (which takes GQA natively) can run.
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            mask = key_mask[:, None, None, :]  # keys only: every query row sees all valid keys
            if q.device.type in REPEAT_KV_WHEN_MASKED and H != Hkv:
                k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        # default softmax scale 1 / sqrt(head_dim), as upstream; non-causal
        return self.out(out.transpose(1, 2).reshape(B, S, H * D))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class JointTransformerBlock(nn.Module):
    """Sandwich-normed attention + FFN. With modulation: x * (1 + scale) before each branch and a
    tanh gate after it, from SiLU(t_emb) -> Linear -> [scale_msa, gate_msa, scale_mlp, gate_mlp]
    (no shift terms)."""

    def __init__(self, cfg, modulation=True):
        super().__init__()
        self.attention = JointAttention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.t_dim, 4 * cfg.dim))

    def forward(self, x, key_mask, cos, sin, t_emb=None):
        if not self.modulation:
            h = self.attention(self.attention_norm1(x), key_mask, cos, sin)
            x = x + self.attention_norm2(h)
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        mod = self.adaLN_modulation(t_emb)[:, None]                    # [B, 1, 4 dim]
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=-1)
        h = self.attention(self.attention_norm1(x) * (1 + scale_msa), key_mask, cos, sin)
        x = x + gate_msa.tanh() * self.attention_norm2(h)
        h = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(h)


class FinalLayer(nn.Module):
    """Affine-free LayerNorm (eps 1e-6), scale-only modulation, Linear to p * p * out_channels."""

    def __init__(self, cfg):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)  # no parameters
        self.linear = nn.Linear(cfg.dim, cfg.patch_size ** 2 * cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.t_dim, cfg.dim))

    def forward(self, x, t_emb):
        return self.linear(self.norm_final(x) * (1 + self.adaLN_modulation(t_emb)[:, None]))


class NextDiT(nn.Module):
    """The Unified Next-DiT. forward(x, t, cap_feats, cap_mask) -> velocity, in x's form (tensor
    or list)."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.grad_checkpointing = False  # set by the trainer: checkpoint the joint blocks
        # registration order = the official state-dict order
        self.x_embedder = nn.Linear(cfg.patch_size ** 2 * cfg.in_channels, cfg.dim)
        self.noise_refiner = nn.ModuleList(JointTransformerBlock(cfg)
                                           for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(
            JointTransformerBlock(cfg, modulation=False) for _ in range(cfg.n_refiner_layers))
        self.t_embedder = TimestepEmbedder(cfg.t_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, eps=cfg.norm_eps),
                                          nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.layers = nn.ModuleList(JointTransformerBlock(cfg) for _ in range(cfg.n_layers))
        # Never used in forward (upstream creates it and forgets it), but it is in every
        # official checkpoint.
        self.norm_final = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.final_layer = FinalLayer(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        """Upstream's initialisation, for training from scratch (RMSNorm weights start at 1)."""
        nn.init.xavier_uniform_(self.x_embedder.weight)
        nn.init.zeros_(self.x_embedder.bias)
        for block in [*self.noise_refiner, *self.context_refiner, *self.layers]:
            for lin in (block.attention.qkv, block.attention.out, *block.feed_forward.children()):
                nn.init.xavier_uniform_(lin.weight)
            if block.modulation:
                nn.init.zeros_(block.adaLN_modulation[1].weight)
                nn.init.zeros_(block.adaLN_modulation[1].bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.trunc_normal_(self.cap_embedder[1].weight, std=0.02)
        nn.init.zeros_(self.cap_embedder[1].bias)
        for lin in (self.final_layer.linear, self.final_layer.adaLN_modulation[1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def compile_blocks(self, **kwargs):
        """Regional torch.compile: each transformer block in place (Module.compile; kwargs go to
        torch.compile). Dynamo inlines the block and takes its parameters as graph inputs, so
        one graph per block kind (with or without adaLN) and input shape serves every layer;
        state-dict keys do not change. The first call at a new size compiles."""
        # All blocks share one code object, hence one cache of compiled graphs: past its limit
        # (8 by default: a few sizes, masked and not, grad and no grad) dynamo silently runs
        # eager, so the limit is raised.
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 64))
        for block in [*self.noise_refiner, *self.context_refiner, *self.layers]:
            block.compile(**kwargs)
        return self

    def _check_images(self, x):
        """x as a list of [C, H, W] latents, checked against the config."""
        cfg, p = self.config, self.config.patch_size
        if isinstance(x, torch.Tensor):
            if x.ndim != 4 or x.shape[0] == 0:
                raise ValueError("NextDiT: x must be [B, C, H, W] or a list of [C, H, W], got "
                                 f"shape {tuple(x.shape)}")
            imgs = list(x.unbind(0))
        elif isinstance(x, (list, tuple)) and x and all(torch.is_tensor(i) and i.ndim == 3
                                                        for i in x):
            imgs = list(x)
        else:
            raise ValueError("NextDiT: x must be a [B, C, H, W] tensor or a non-empty list of "
                             "[C, H, W] tensors")
        for img in imgs:
            C, H, W = img.shape
            if C != cfg.in_channels or H % p or W % p or H == 0 or W == 0:
                raise ValueError(f"NextDiT: latent of shape {tuple(img.shape)}: need "
                                 f"{cfg.in_channels} channels and non-zero H, W divisible by "
                                 f"patch_size {p}")
            if H // p >= cfg.axes_lens[1] or W // p >= cfg.axes_lens[2]:
                raise ValueError(f"NextDiT: latent grid {H // p}x{W // p} exceeds the RoPE range "
                                 f"{cfg.axes_lens[1] - 1}x{cfg.axes_lens[2] - 1}")
        return imgs

    def _check_captions(self, cap_feats, cap_mask, B):
        """The number of valid tokens of each caption (a list of ints), checked."""
        cfg = self.config
        if cap_feats.ndim != 3 or tuple(cap_feats.shape[::2]) != (B, cfg.cap_feat_dim):
            raise ValueError(f"NextDiT: cap_feats must be [B={B}, L, {cfg.cap_feat_dim}], got "
                             f"{tuple(cap_feats.shape)}")
        if tuple(cap_mask.shape) != tuple(cap_feats.shape[:2]):
            raise ValueError(f"NextDiT: cap_mask must be [B, L] = {tuple(cap_feats.shape[:2])}, "
                             f"got {tuple(cap_mask.shape)}")
        mask = cap_mask.bool()
        cap_lens = mask.sum(1)
        right_padded = torch.arange(mask.shape[1], device=mask.device) < cap_lens[:, None]
        if not torch.equal(mask, right_padded):
            raise ValueError("NextDiT: cap_mask must be right-padded (valid tokens first, then "
                             "padding)")
        cap_lens = cap_lens.tolist()
        if min(cap_lens) < 1 or max(cap_lens) >= cfg.axes_lens[0]:
            raise ValueError(f"NextDiT: every caption needs 1 to {cfg.axes_lens[0] - 1} valid "
                             "tokens (image tokens sit at RoPE position cap_len), got "
                             f"{min(cap_lens)} to {max(cap_lens)}")
        return cap_lens

    def context(self, cap_feats, cap_mask, sizes):
        """Everything a forward needs besides x and t, for captions [B, L, cap_feat_dim] / [B, L]
        and latent sizes [(H_i, W_i)]: the joint sequence's layout
        (lengths, RoPE tables, key masks) and the captions through the context refiner, which sees
        neither x nor t. A sampler computes it once per image and passes it to every step
        (forward(x, t, context=...)); training computes it in each forward."""
        cfg, p, device = self.config, self.config.patch_size, cap_feats.device
        cap_lens = self._check_captions(cap_feats, cap_mask, len(sizes))
        grids = [(H // p, W // p) for H, W in sizes]
        img_lens = [h * w for h, w in grids]
        seq_lens = [c + n for c, n in zip(cap_lens, img_lens)]
        Lc, N, S = max(cap_lens), max(img_lens), max(seq_lens)
        if not torch.is_autocast_enabled(device.type):
            cap_feats = cap_feats.to(self.x_embedder.weight.dtype)

        # RoPE for the joint sequence, and its caption / image rows for the refiners (identical
        # on valid rows; rows past a sample's cap_len are padding, whose values never matter).
        # The image rows are (cap_len_i, r, c): a common axis-0 offset, which cancels in q.k.
        pos = position_ids(cap_lens, grids)                                        # [B, S, 3]
        cap_pos = pos[:, :Lc]                                                      # [B, Lc, 3]
        img_rows = [pos[i, c:c + n] for i, (c, n) in enumerate(zip(cap_lens, img_lens))]
        img_pos = pad_sequence(img_rows, batch_first=True)                         # [B, N, 3]
        rope = [rope_cos_sin(ids.to(device), cfg.axes_dims, cfg.rope_theta)
                for ids in (pos, cap_pos, img_pos)]

        # Context refiner on the valid captions (truncated to the longest; padded keys masked)
        cap = self.cap_embedder(cap_feats[:, :Lc])                  # [B, Lc, dim]
        cap_mask = length_mask(cap_lens, Lc, device)
        for block in self.context_refiner:
            cap = block(cap, cap_mask, *rope[1])                   # [B, Lc, dim]
        return Context(cap, cap_lens, grids, rope[0], rope[2], length_mask(img_lens, N, device),
                       length_mask(seq_lens, S, device))

    def forward(self, x, t, cap_feats=None, cap_mask=None, context=None):
        """
        x: [B, C, H, W] or a list of B latents [C, H_i, W_i]; t: [B] in [0, 1] (1 = data); the
        captions as cap_feats [B, L, cap_feat_dim] with cap_mask [B, L]
        (right-padded, bool or 0/1), or as the `context` of those captions and sizes
        (self.context). Returns the velocity in x's form: [B, C, H, W] or a list.
        """
        cfg, p = self.config, self.config.patch_size
        imgs = self._check_images(x)
        sizes = [tuple(i.shape[1:]) for i in imgs]
        ctx = context if context is not None else self.context(cap_feats, cap_mask, sizes)
        if [(H // p, W // p) for H, W in sizes] != ctx.grids:
            raise ValueError(f"NextDiT: latent sizes {sizes} do not match the context's grids "
                             f"{ctx.grids}")
        t = torch.as_tensor(t, device=ctx.cap.device)
        t = t.expand(len(imgs)) if t.ndim == 0 else t
        if t.shape != (len(imgs),):
            raise ValueError(f"NextDiT: t must be [B={len(imgs)}] (or a scalar), got shape "
                             f"{tuple(t.shape)}")
        if not torch.is_autocast_enabled(ctx.cap.device.type):
            imgs = [i.to(self.x_embedder.weight.dtype) for i in imgs]
        dtype = imgs[0].dtype   # the joint stream's: the latents' (fp32 under autocast: upstream)
        lens = [(c, h * w) for c, (h, w) in zip(ctx.cap_lens, ctx.grids)]

        t_emb = self.t_embedder(t)                                                  # [B, t_dim]

        # Noise refiner on the image tokens alone
        tokens = pad_sequence([patchify(i, p) for i in imgs], batch_first=True)    # [B, N, p*p*C]
        img = self.x_embedder(tokens)                                               # [B, N, dim]
        for block in self.noise_refiner:
            img = block(img, ctx.img_mask, *ctx.img_rope, t_emb)                    # [B, N, dim]

        # Joint sequence per sample: [valid caption, image, padding]
        joint = [torch.cat([ctx.cap[i, :c], img[i, :n]]).to(dtype) for i, (c, n) in enumerate(lens)]
        h = pad_sequence(joint, batch_first=True)                                   # [B, S, dim]
        for block in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, ctx.mask, *ctx.rope, t_emb, use_reentrant=False)
            else:
                h = block(h, ctx.mask, *ctx.rope, t_emb)                            # [B, S, dim]
        h = self.final_layer(h, t_emb)                                              # [B, S, p*p*C]

        out = [unpatchify(h[i, c:c + n], *ctx.grids[i], p, cfg.in_channels)
               for i, (c, n) in enumerate(lens)]                                    # B x [C, H, W]
        return torch.stack(out) if isinstance(x, torch.Tensor) else out


@dataclass
class Context:
    """NextDiT.context: the refined captions and the layout of a batch's joint sequences."""
    cap: torch.Tensor        # [B, Lc, dim] caption tokens after the context refiner
    cap_lens: list           # valid caption tokens per sample
    grids: list              # (h, w) image token grid per sample
    rope: tuple              # (cos, sin) [B, S, head_dim // 2] of the joint sequence
    img_rope: tuple          # (cos, sin) [B, N, head_dim // 2] of the image tokens alone
    img_mask: torch.Tensor   # [B, N] valid image tokens, or None when none is padded
    mask: torch.Tensor       # [B, S] valid joint tokens, or None when none is padded


# -------------------------------------------------------------------------------------------------
# LoRA (Hu et al., 2021): fine-tune a frozen model through a low-rank update of chosen linear
# layers, W x + (alpha / r) B A x, with A [r, in] and B [out, r]. Here, next to the model, because
# an adapter is named by the layer it adapts: the official module name + ".lora_A.weight" /
# ".lora_B.weight" (e.g. "layers.3.attention.qkv.lora_A.weight").

# Targets are module names: the attention's fused qkv and output, the SwiGLU's w1/w2/w3, in the
# joint blocks and both refiners (the default); "adaLN_modulation" (the blocks' and the final
# layer's modulation) is optional.
LORA_TARGETS = ("qkv", "out", "w1", "w2", "w3")
LORA_OPTIONAL = ("adaLN_modulation",)


class LoRALinear(nn.Linear):
    """A Linear whose weight and bias are the wrapped layer's own (shared, not copied), plus the
    trainable update B A. A starts Kaiming-uniform (nn.Linear's init, as the LoRA paper's code),
    B at zero: a fresh adapter adds exact zeros, so every output is unchanged."""

    def __init__(self, base, rank, alpha):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scale = alpha / rank
        # fp32 whatever the base's dtype: the only trained weights (autocast computes in bf16)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        out = super().forward(x)                                           # W x + b
        update = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))  # B A x, [..., out]
        return out + (update * self.scale).to(out.dtype)


def lora_layer_names(model, targets=LORA_TARGETS):
    """The names of the Linear layers `targets` picks: those with a target among their name's
    parts ("layers.0.attention.qkv"; "layers.0.adaLN_modulation.1" for the Sequential's Linear)."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and set(name.split(".")) & set(targets)   # (not yet adapted)
            and not name.endswith((".lora_A", ".lora_B"))]


def add_lora(model, rank, alpha, targets=LORA_TARGETS):
    """Wrap each target Linear of `model` in a LoRALinear (in place); the adapters are the only
    new parameters. Records rank, alpha and targets as model.lora. Returns model."""
    for name in lora_layer_names(model, targets):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha))
    model.lora = dict(rank=rank, alpha=alpha, targets=list(targets))
    return model


def lora_state_dict(model):
    """The adapters only: {"<layer>.lora_A.weight": [r, in], "<layer>.lora_B.weight": [out, r]}."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


@torch.no_grad()
def merge_lora(model, adapters, alpha, scale=1.0):
    """Fold adapters (lora_state_dict's layout) into a plain model's weights:
    W <- W + scale * (alpha / r) B A, computed in fp32 and rounded once to W's dtype. A negative
    scale takes a merge back out (to within that rounding)."""
    for key in adapters:
        if key.endswith(".lora_A.weight"):
            layer = key.removesuffix(".lora_A.weight")
            A, B = adapters[key].float(), adapters[layer + ".lora_B.weight"].float()
            W = model.get_submodule(layer).weight
            delta = (scale * alpha / A.shape[0]) * (B.to(W.device) @ A.to(W.device))  # [out, in]
            W.copy_((W.float() + delta).to(W.dtype))


# -------------------------------------------------------------------------------------------------
# The key map (plumbing.loading.load_nextdit opens the file): the official names are ours; only
# wrappers are undone.

# Key infixes written by FSDP / activation checkpointing / torch.compile wrappers; DDP adds a
# leading "module.".
_WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def nextdit_keymap(obj):
    """An official consolidated state dict -> ours: the wrapper prefixes stripped (read_state_dict
    has already unwrapped {"model": sd} and the like)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"a NextDiT checkpoint must hold a state dict, got {type(obj).__name__}")
    sd = {}
    for key, value in obj.items():
        clean = key.removeprefix("module.")
        for infix in _WRAPPER_INFIXES:
            clean = clean.replace(infix, "")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"NextDiT checkpoint entry {key!r} is a {type(value).__name__}, not "
                             "a tensor")
        if clean in sd:
            raise ValueError(f"NextDiT checkpoint has {clean!r} twice once wrapper prefixes are "
                             "stripped")
        sd[clean] = value
    return sd
