"""
The SVG autoencoder's pixel side: the convolutional decoder (autoencoder-P and -R) and the residual
ViT that gives autoencoder-R its 8 extra latent channels. Plain PyTorch; imports only torch
(+ safetensors).

    latents [B, 384 (P) or 392 (R), h, w] --Decoder--> image [B, 3, 16h, 16w] (trained on [-1, 1])
    ImageNet-normalised image [B, 3, H, W] --ResidualViT--> residual channels [B, 8, H/16 * W/16]

Module and parameter names mirror the official Lightning checkpoint (`decoder.*`, `extra_vit.*`),
so the key maps at the end are a prefix strip; the plumbing's load_decoder / load_autoencoder read
the file and load strictly.

What the official checkpoint holds, and what we do with each part:
    decoder.*               -> Decoder (194 tensors).
    extra_vit.* (R only)    -> ResidualViT, except, ignored on purpose:
        extra_vit.head.*        a 1000-way classifier head left over from the DeiT it was built
                                from; never called.
        extra_vit.freqs_t_x/_y  the integer column/row indices of a 64x64 patch grid; we compute
                                the coordinates of the actual grid on every call instead.
    encoder.*               -> DINOv3 (dinov3.py, loaded by load_autoencoder); ignored here.
    norm_vit.* (R only)     ignored on purpose: LayerNorm(40) built upstream, unused by encode().
    loss.*                  ignored on purpose: LPIPS + PatchGAN discriminator, training-only.
Anything else inside the prefixes we load (missing, unexpected or mis-shaped) is a one-line
ValueError.

Official quirks, matched or fixed:
- "woattn": the released configs say attn_resolutions=[], but the official decoder still puts an
  AttnBlock after every ResBlock of the lowest-resolution level and one in the middle (4 in all).
  Matched: the weights need it.
- The released autoencoder-R yaml files are copies of the P ones (z 384, no residual ViT). We never
  read yaml: P or R is decided from the checkpoint's shapes (decoder.conv_in width 384 vs 392) and
  its extra_vit.* keys.
- Residual ViT coordinates: upstream reuses its saved 64x64-grid coordinates for *any* input with
  exactly 4096 patches, so e.g. a 512x2048 image gets wrong (square-grid) positions. Fixed:
  coordinates always come from the actual grid (identical to upstream for every other shape,
  including 1024x1024).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -------------------------------------------------------------------------------------------------
# Conv decoder (LDM-style)


@dataclass
class DecoderConfig:
    z_channels: int = 384           # latent channels: 384 DINOv3 (P), 384 + 8 residual (R)
    ch: int = 128                   # width of the full-resolution level
    ch_mult: tuple = (1, 1, 2, 2, 4)  # width multiplier per level; len - 1 upsamplings (4 -> 16x)
    num_res_blocks: int = 2         # each level runs num_res_blocks + 1 ResnetBlocks (as upstream)
    out_ch: int = 3

    @classmethod
    def autoencoder_p(cls):
        return cls(z_channels=384)  # 43,039,619 parameters

    @classmethod
    def autoencoder_r(cls):
        return cls(z_channels=392)  # 43,076,483 parameters

    @classmethod
    def tiny(cls, z_channels=32):
        # Same 5 levels (16x) and GroupNorm(32) as the real one, 16x fewer channels, 2
        # blocks per level.
        return cls(z_channels=z_channels, ch=32, num_res_blocks=1)

    @classmethod
    def from_state_dict(cls, sd):
        """Infer the config from decoder tensor shapes (keys without the `decoder.` prefix)."""
        try:
            z_channels = sd["conv_in.weight"].shape[1]
            out_ch, ch = sd["conv_out.weight"].shape[:2]
            levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("up."))
            blocks = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("up.0.block."))
            widths = [sd[f"up.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
        except (KeyError, ValueError, IndexError) as e:
            raise ValueError(f"cannot infer the decoder config: tensor {e} is missing or "
                             "malformed (expected the official decoder keys conv_in.*, "
                             "up.{i}.block.{j}.*, conv_out.*)") from None
        if any(w % ch for w in widths):
            raise ValueError(f"decoder level widths {widths} are not multiples of the output "
                             f"width {ch}")
        return cls(z_channels=z_channels, ch=ch, ch_mult=tuple(w // ch for w in widths),
                   num_res_blocks=blocks - 1, out_ch=out_ch)


def Normalize(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a
    (1x1-projected if the width changes) shortcut. No timestep embedding (the decoder has none) and
    dropout 0, so neither appears here."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = Normalize(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = Normalize(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))   # silu == upstream's x * sigmoid(x)
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, q/k/v/proj as 1x1 convs, scale
    C^-0.5, residual."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, H*W, C]; SDPA's default scale 1/sqrt(C) is the upstream
        # scale. SDPA never materialises the (HW)^2 weights on the fused paths, which keeps a
        # 1024^2 decode (4096 tokens) cheap.
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q(h), self.k(h),
                                                                       self.v(h)))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class UpLevel(nn.Module):
    """One resolution level: ResnetBlocks (each followed by an AttnBlock at the lowest level), then
    x2 upsampling (every level but the full-resolution one)."""

    def __init__(self, cin, cout, n_blocks, with_attn, with_upsample):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(cout if i else cin, cout) for i in range(n_blocks)])
        self.attn = nn.ModuleList([AttnBlock(cout) for _ in range(n_blocks)] if with_attn else [])
        self.upsample = Upsample(cout) if with_upsample else None

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x if self.upsample is None else self.upsample(x)


class Decoder(nn.Module):
    """SVG pixel decoder: conv_in -> mid (ResBlock, Attn, ResBlock) -> levels L-1 .. 0 -> GN,
    swish, conv_out. Input: raw (not stats-normalised) latents [B, z_channels, h, w]; output
    [B, 3, 16h, 16w], no tanh."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        widths = [c.ch * m for m in c.ch_mult]
        levels = len(widths)
        self.conv_in = nn.Conv2d(c.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1])
        # up[i] is level i (index = level, as in the checkpoint); forward runs them from the lowest
        # resolution (i = L-1, widest) up to full resolution (i = 0). Level i's input width is
        # level i+1's output width.
        self.up = nn.ModuleList([
            UpLevel(widths[min(i + 1, levels - 1)], widths[i], c.num_res_blocks + 1,
                    with_attn=(i == levels - 1),   # the "woattn" quirk: attention is always here
                    with_upsample=(i != 0))
            for i in range(levels)])
        self.norm_out = Normalize(widths[0])
        self.conv_out = nn.Conv2d(widths[0], c.out_ch, 3, padding=1)
        self.channels_last = False

    def use_channels_last(self, on=True):
        """Run the convolutions in channels-last (NHWC) memory layout, which GPU convolution
        kernels may prefer (bench/bench_gpu.py measures it); the output is returned contiguous
        as always. Same function: fp32 results differ only by rounding. Returns self."""
        self.channels_last = on
        return self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def forward(self, z):
        if z.dim() != 4 or z.shape[1] != self.config.z_channels:
            raise ValueError(f"decoder expects latents [B, {self.config.z_channels}, h, w], got "
                             f"{list(z.shape)}"
                             + ("" if z.dim() != 4 else " (P decoders take 384 channels, R "
                                                        "decoders 392)"))
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        z = z.to(self.conv_in.weight.dtype).contiguous(memory_format=layout)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()


# -------------------------------------------------------------------------------------------------
# Autoencoder-R residual branch: RoPE-Mixed DeiT-S with LayerScale
# (its 8 output channels join the latent)


@dataclass
class ResidualViTConfig:
    dim: int = 384
    depth: int = 12
    num_heads: int = 6        # head width 64; not in the checkpoint (freqs is [2, depth, dim/2])
    mlp_hidden: int = 1536
    patch_size: int = 16
    out_channels: int = 8
    eps: float = 1e-6               # LayerNorm eps (DINOv3 uses 1e-5; this ViT 1e-6)

    @classmethod
    def deit_s(cls):
        return cls()    # 21,754,760 parameters (22,139,760 upstream with the unused 1000-way head)

    @classmethod
    def tiny(cls):
        return cls(dim=128, depth=2, num_heads=2, mlp_hidden=256)

    @classmethod
    def from_state_dict(cls, sd, head_dim=64):
        """Infer the config from tensor shapes (keys without the `extra_vit.` prefix). The head
        count cannot be read from shapes; DeiT models use 64-wide heads."""
        try:
            dim = sd["cls_token"].shape[-1]
            if dim % head_dim:
                raise ValueError(f"width {dim} is not a multiple of the head width {head_dim}: "
                                 "pass config=")
            depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
            return cls(dim=dim, depth=depth, num_heads=dim // head_dim,
                       mlp_hidden=sd["blocks.0.mlp.fc1.weight"].shape[0],
                       patch_size=sd["patch_embed.proj.weight"].shape[-1],
                       out_channels=sd["heads.2.weight"].shape[0])
        except (KeyError, ValueError, IndexError) as e:
            raise ValueError(f"cannot infer the residual ViT config: {e} is missing or malformed "
                             "(expected the official extra_vit keys cls_token, blocks.{i}.*, "
                             "patch_embed.proj.*, heads.2.*)") from None


def patch_coordinates(h, w, device=None):
    """Integer patch coordinates of a row-major h x w grid: token n sits at column n % w, row n //
    w. Returns (t_x, t_y), each float32 [h*w]. Not normalised, not centred
    (RoPE-Mixed uses raw indices)."""
    n = torch.arange(h * w, device=device)
    return (n % w).float(), torch.div(n, w, rounding_mode="floor").float()


def rope_angles(freqs, t_x, t_y, num_heads):
    """RoPE-Mixed angles for every block: phi[b, head, n, j] = t_x[n] * freqs[0, b, head*P + j]
    + t_y[n] * freqs[1, b, head*P + j], P = head_dim / 2 pairs. freqs: [2, depth, dim/2] ->
    [depth, heads, N, P]."""
    depth = freqs.shape[1]
    freqs = freqs.float().view(2, depth, 1, num_heads, -1)                # [2, depth, 1, heads, P]
    phi = t_x.view(-1, 1, 1) * freqs[0] + t_y.view(-1, 1, 1) * freqs[1]  # [depth, N, heads, P]
    return phi.transpose(1, 2)


def apply_rope(x, cos, sin):
    """Rotate interleaved channel pairs (2j, 2j+1) of x [..., N, head_dim] by angles with cos/sin
    [..., N, head_dim/2]: (a, b) -> (a cos - b sin, a sin + b cos). Computed in fp32, returned
    in x's dtype."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


class RoPEAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, -1)                 # [B, N, 3, heads, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                 # 3 x [B, heads, N, hd]
        # Token 0 is the cls token: it is not rotated; patch tokens 1..N-1 are.
        q = torch.cat([q[:, :, :1], apply_rope(q[:, :, 1:], cos, sin)], dim=2)
        k = torch.cat([k[:, :, :1], apply_rope(k[:, :, 1:], cos, sin)], dim=2)
        x = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim) = 0.125, as upstream
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class RoPEBlock(nn.Module):
    """Pre-norm transformer block with LayerScale: x += gamma_1 * attn(norm1(x)); x += gamma_2 *
    mlp(norm2(x))."""

    def __init__(self, c):
        super().__init__()
        self.gamma_1 = nn.Parameter(torch.full((c.dim,), 1e-4))
        self.gamma_2 = nn.Parameter(torch.full((c.dim,), 1e-4))
        self.norm1 = nn.LayerNorm(c.dim, eps=c.eps)
        self.attn = RoPEAttention(c.dim, c.num_heads)
        self.norm2 = nn.LayerNorm(c.dim, eps=c.eps)
        self.mlp = Mlp(c.dim, c.mlp_hidden)

    def forward(self, x, cos, sin):
        x = x + self.gamma_1 * self.attn(self.norm1(x), cos, sin)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, dim, h, w] -> [B, h*w, dim] row-major


class ResidualViT(nn.Module):
    """Autoencoder-R's residual branch: a RoPE-Mixed DeiT-S ("LS" blocks), no absolute position
    embedding. Each block has its own learned 2D RoPE frequencies (`freqs`), applied to integer
    patch coordinates. Input: the same ImageNet-normalised image DINOv3 gets, [B, 3, H, W] with H,
    W multiples of 16. Output: [B, out_channels (8), N] with N = (H/16)(W/16) row-major tokens,
    before distribution matching."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.freqs = nn.Parameter(torch.zeros(2, c.depth, c.dim // 2))  # [x/y, block, head*pair]
        self.patch_embed = PatchEmbed(c.patch_size, c.dim)
        self.blocks = nn.ModuleList([RoPEBlock(c) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.dim, eps=c.eps)
        self.heads = nn.Sequential(nn.Linear(c.dim, c.dim), nn.GELU(),
                                   nn.Linear(c.dim, c.out_channels))

    @torch.no_grad()
    def reset_parameters(self):
        """The official initialisation, for training from scratch (loading overwrites it): Linear
        weights N(0, 0.02) (timm's trunc_normal_, whose +-2 bounds never bite at this std), biases
        0, LayerNorms 1 / 0, cls token N(0, 0.02), LayerScale 1e-4, patch embedding and the output
        head at PyTorch's defaults (upstream builds the head after its init pass), and per block
        and head RoPE-Mixed frequencies of magnitude 10^(-4j / head_dim), j = 0 .. head_dim/4 - 1,
        along x at a random angle a and along y at a + pi/2 (init_random_2d_freqs, theta 10)."""
        c = self.config
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for block in self.blocks:
            block.gamma_1.fill_(1e-4)
            block.gamma_2.fill_(1e-4)
        head_dim = c.dim // c.num_heads
        mag = 10.0 ** (-torch.arange(0, head_dim, 4)[:head_dim // 4].float() / head_dim)
        angles = torch.rand(c.depth, c.num_heads, 1) * 2 * torch.pi        # one per block and head
        both = torch.cat([angles, angles + torch.pi / 2], dim=-1)           # [depth, heads, 2]
        fx = (mag.view(1, 1, 1, -1) * both.cos().unsqueeze(-1)).flatten(2)  # [depth, heads, hd/2]
        fy = (mag.view(1, 1, 1, -1) * both.sin().unsqueeze(-1)).flatten(2)
        self.freqs.copy_(torch.stack([fx, fy]).view(2, c.depth, c.dim // 2))
        return self

    def forward(self, x):
        p = self.config.patch_size
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"residual ViT expects images [B, 3, H, W], got {list(x.shape)}")
        H, W = x.shape[-2:]
        if H % p or W % p or H == 0 or W == 0:
            raise ValueError(f"residual ViT: image size {H}x{W} (HxW) is not a multiple of {p}; "
                             f"resize or crop to e.g. {max(p, H // p * p)}x{max(p, W // p * p)}")
        x = self.patch_embed(x.to(self.cls_token.dtype))                            # [B, N, dim]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1 + N, dim]
        t_x, t_y = patch_coordinates(H // p, W // p, device=x.device)
        phi = rope_angles(self.freqs, t_x, t_y, self.config.num_heads)  # [depth, heads, N, hd/2]
        cos, sin = phi.cos(), phi.sin()
        for i, block in enumerate(self.blocks):
            x = block(x, cos[i], sin[i])
        x = self.heads(self.norm(x)[:, 1:])                             # drop cls: [B, N, 8]
        return x.transpose(1, 2)                                                    # [B, 8, N]


# -------------------------------------------------------------------------------------------------
# The key maps (the plumbing's load_decoder / load_autoencoder open the file)


def decoder_keymap(sd):
    """The decoder's tensors under our names: `decoder.*` of an autoencoder checkpoint with the
    prefix removed, or a decoder state dict that has no prefix. Every other prefix
    (encoder.*, extra_vit.*, norm_vit.*, loss.*) is ignored here."""
    if "conv_in.weight" in sd:
        return dict(sd)
    out = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    if "conv_in.weight" not in out:
        found = sorted({k.split(".")[0] for k in sd})
        raise ValueError("no decoder weights found (no 'decoder.conv_in.weight' or "
                         f"'conv_in.weight'; keys start with {', '.join(found) or 'nothing'}): "
                         "expected an SVG autoencoder checkpoint "
                         "(svg_autoencoder-P/R-stage*.ckpt) or a decoder state dict")
    return out


# Residual-ViT keys ignored on purpose (see the module docstring): the unused 1000-way `head` and
# the saved 64x64-grid coordinates.
RESIDUAL_VIT_IGNORED = ("head.weight", "head.bias", "freqs_t_x", "freqs_t_y")


def residual_vit_keymap(sd):
    """The residual ViT's tensors under our names: `extra_vit.*` with the prefix removed
    (or a state dict without it), minus RESIDUAL_VIT_IGNORED."""
    if "cls_token" not in sd:
        sd = {k[len("extra_vit."):]: v for k, v in sd.items() if k.startswith("extra_vit.")}
    if "cls_token" not in sd:
        raise ValueError("no residual ViT weights found (no 'extra_vit.*' keys): this is not an "
                         "autoencoder-R checkpoint (autoencoder-P has no residual branch)")
    return {k: v for k, v in sd.items() if k not in RESIDUAL_VIT_IGNORED}
