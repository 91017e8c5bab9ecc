"""
Test helper (not a test): write a tiny SVG autoencoder checkpoint in the official PyTorch-Lightning layout.

The tensors are generated from the official key layout written out here by hand (the reference's tables), not
from decoder.py's modules, so a loader test compares two independent descriptions of the same checkpoint.

Top level, as Lightning 2.x's ModelCheckpoint(save_weights_only=True) writes it (no optimizer/callback states,
no hyper_parameters: the official DinoDecoder never calls save_hyperparameters):
    {"epoch": int, "global_step": int, "pytorch-lightning_version": "2.6.0", "state_dict": {...}, "loops": {...}}
`state_dict`, in the LightningModule's registration order:
    encoder.*    DINOv3 in its original key layout (tiny_dinov3's random weights, or `encoder_sd`; omitted if {})
    extra_vit.*  residual RoPE-Mixed ViT (R only), incl. the unused head.* and the freqs_t_x/_y 64x64-grid buffers
    norm_vit.*   unused LayerNorm(40) (R only)
    decoder.*    the conv decoder
    loss.*       LPIPS + PatchGAN discriminator + logvar: official key names, shrunken widths (training-only:
                 load_autoencoder ignores them; train_autoencoder.py --init-from reads them)
"""

import math

import torch

from decoder import DecoderConfig, ResidualViTConfig


def _resblock(add, name, cin, cout):
    add(f"{name}.norm1.weight", [cin], "gn_w")
    add(f"{name}.norm1.bias", [cin], "b")
    add(f"{name}.conv1.weight", [cout, cin, 3, 3], "w")
    add(f"{name}.conv1.bias", [cout], "b")
    add(f"{name}.norm2.weight", [cout], "gn_w")
    add(f"{name}.norm2.bias", [cout], "b")
    add(f"{name}.conv2.weight", [cout, cout, 3, 3], "w")
    add(f"{name}.conv2.bias", [cout], "b")
    if cin != cout:
        add(f"{name}.nin_shortcut.weight", [cout, cin, 1, 1], "w")
        add(f"{name}.nin_shortcut.bias", [cout], "b")


def _attnblock(add, name, c):
    add(f"{name}.norm.weight", [c], "gn_w")
    add(f"{name}.norm.bias", [c], "b")
    for p in ("q", "k", "v", "proj_out"):
        add(f"{name}.{p}.weight", [c, c, 1, 1], "w")
        add(f"{name}.{p}.bias", [c], "b")


def decoder_layout(z_channels, ch, ch_mult, num_res_blocks, out_ch=3):
    """[(key, shape, kind)] of the official LDM decoder (Decoder(**ddconfig) in the SVG repo), in state-dict order:
    conv_in, mid, up.0 .. up.L-1 (block, then attn, then upsample), norm_out, conv_out."""
    out = []
    add = lambda k, s, kind: out.append((k, s, kind))
    L = len(ch_mult)
    top = ch * ch_mult[-1]
    add("conv_in.weight", [top, z_channels, 3, 3], "w")
    add("conv_in.bias", [top], "b")
    _resblock(add, "mid.block_1", top, top)
    _attnblock(add, "mid.attn_1", top)
    _resblock(add, "mid.block_2", top, top)
    for level in range(L):
        cin = ch * ch_mult[min(level + 1, L - 1)]   # input of level i = output of level i+1 (mid for the top)
        cout = ch * ch_mult[level]
        for j in range(num_res_blocks + 1):
            _resblock(add, f"up.{level}.block.{j}", cin if j == 0 else cout, cout)
        if level == L - 1:                          # attention after every block of the lowest resolution
            for j in range(num_res_blocks + 1):
                _attnblock(add, f"up.{level}.attn.{j}", cout)
        if level != 0:
            add(f"up.{level}.upsample.conv.weight", [cout, cout, 3, 3], "w")
            add(f"up.{level}.upsample.conv.bias", [cout], "b")
    add("norm_out.weight", [ch * ch_mult[0]], "gn_w")
    add("norm_out.bias", [ch * ch_mult[0]], "b")
    add("conv_out.weight", [out_ch, ch * ch_mult[0], 3, 3], "w")
    add("conv_out.bias", [out_ch], "b")
    return out


def residual_layout(dim, depth, mlp_hidden, patch_size, out_channels, grid=64):
    """[(key, shape, kind)] of the official `extra_vit` (rope_mixed_deit_small_patch16_LS(img_size=1024) + heads):
    own parameters and buffers first (cls_token, freqs, freqs_t_x, freqs_t_y), then submodules."""
    out = []
    add = lambda k, s, kind: out.append((k, s, kind))
    add("cls_token", [1, 1, dim], "small")
    add("freqs", [2, depth, dim // 2], "freqs")
    add("freqs_t_x", [grid * grid], "t_x")
    add("freqs_t_y", [grid * grid], "t_y")
    add("patch_embed.proj.weight", [dim, 3, patch_size, patch_size], "w")
    add("patch_embed.proj.bias", [dim], "b")
    for i in range(depth):
        b = f"blocks.{i}"
        add(f"{b}.gamma_1", [dim], "gamma")
        add(f"{b}.gamma_2", [dim], "gamma")
        add(f"{b}.norm1.weight", [dim], "gn_w")
        add(f"{b}.norm1.bias", [dim], "b")
        add(f"{b}.attn.qkv.weight", [3 * dim, dim], "w")
        add(f"{b}.attn.qkv.bias", [3 * dim], "b")
        add(f"{b}.attn.proj.weight", [dim, dim], "w")
        add(f"{b}.attn.proj.bias", [dim], "b")
        add(f"{b}.norm2.weight", [dim], "gn_w")
        add(f"{b}.norm2.bias", [dim], "b")
        add(f"{b}.mlp.fc1.weight", [mlp_hidden, dim], "w")
        add(f"{b}.mlp.fc1.bias", [mlp_hidden], "b")
        add(f"{b}.mlp.fc2.weight", [dim, mlp_hidden], "w")
        add(f"{b}.mlp.fc2.bias", [dim], "b")
    add("norm.weight", [dim], "gn_w")
    add("norm.bias", [dim], "b")
    add("head.weight", [1000, dim], "w")   # unused upstream
    add("head.bias", [1000], "b")
    add("heads.0.weight", [dim, dim], "w")
    add("heads.0.bias", [dim], "b")
    add("heads.2.weight", [out_channels, dim], "w")
    add("heads.2.bias", [out_channels], "b")
    return out


def loss_layout():
    """Official `loss.*` key names (taming LPIPSWithDiscriminator: logvar, LPIPS-VGG16, PatchGAN) at tiny widths; the
    LPIPS input constants are the real ones (the loader checks them), the lin weights positive (as trained ones)."""
    out = [("logvar", [], "zero"), ("perceptual_loss.scaling_layer.shift", [1, 3, 1, 1], "lpips_shift"),
           ("perceptual_loss.scaling_layer.scale", [1, 3, 1, 1], "lpips_scale")]
    vgg = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # conv indices inside torchvision's vgg16.features
    slices = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
    cin = 3
    for idx in vgg:
        cout = 2 * 2 ** min(slices[idx] - 1, 3)    # real widths are 32x this: 64, 128, 256, 512, 512
        out += [(f"perceptual_loss.net.slice{slices[idx]}.{idx}.weight", [cout, cin, 3, 3], "w"),
                (f"perceptual_loss.net.slice{slices[idx]}.{idx}.bias", [cout], "b")]
        cin = cout
    for i, c in enumerate([2, 4, 8, 16, 16]):
        out.append((f"perceptual_loss.lin{i}.model.1.weight", [1, c, 1, 1], "gn_w"))
    d = "discriminator.main"
    out += [(f"{d}.0.weight", [2, 3, 4, 4], "w"), (f"{d}.0.bias", [2], "b")]
    cin = 2
    for conv, bn, cout in ((2, 3, 4), (5, 6, 8), (8, 9, 16)):
        out += [(f"{d}.{conv}.weight", [cout, cin, 4, 4], "w"), (f"{d}.{bn}.weight", [cout], "gn_w"),
                (f"{d}.{bn}.bias", [cout], "b"), (f"{d}.{bn}.running_mean", [cout], "b"),
                (f"{d}.{bn}.running_var", [cout], "gn_w"), (f"{d}.{bn}.num_batches_tracked", [], "count")]
        cin = cout
    out += [(f"{d}.11.weight", [1, cin, 4, 4], "w"), (f"{d}.11.bias", [1], "b")]
    return out


def _tensor(shape, kind, g, heads=1):
    if kind == "w":       # fan-in scaled, so activations stay O(1) through the whole tiny network
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        return torch.randn(shape, generator=g) / math.sqrt(fan_in)
    if kind == "b":
        return 0.1 * torch.randn(shape, generator=g)
    if kind == "gn_w":    # norm scales around 1, perturbed so a wrong scale/bias mapping shows
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if kind == "gamma":   # LayerScale: trained values, large enough that every block matters
        return 0.2 + 0.1 * torch.randn(shape, generator=g)
    if kind == "small":
        return 0.02 * torch.randn(shape, generator=g)
    if kind == "lpips_shift":   # taming's ScalingLayer buffers
        return torch.tensor([-0.030, -0.088, -0.188]).view(shape)
    if kind == "lpips_scale":
        return torch.tensor([0.458, 0.448, 0.450]).view(shape)
    if kind == "zero":
        return torch.zeros(shape)
    if kind == "count":
        return torch.tensor(123, dtype=torch.long)
    if kind in ("t_x", "t_y"):  # column / row index of the 64x64 grid (as upstream's init_t_xy(64, 64))
        n, side = torch.arange(shape[0]), int(math.isqrt(shape[0]))
        return (n % side if kind == "t_x" else n // side).float()
    if kind == "freqs":   # upstream init recipe: per head, magnitudes theta^(-4j/head_dim) at a random angle
        axes, depth, half = shape
        pairs = half // heads
        mag = 10.0 ** (-torch.arange(pairs // 2).float() * 4 / (2 * pairs))
        fx, fy = [], []
        for _ in range(depth * heads):
            a = float(torch.rand(1, generator=g)) * 2 * math.pi
            fx.append(torch.cat([mag * math.cos(a), mag * math.cos(math.pi / 2 + a)]))
            fy.append(torch.cat([mag * math.sin(a), mag * math.sin(math.pi / 2 + a)]))
        return torch.stack([torch.stack(fx), torch.stack(fy)]).view(2, depth, heads * pairs)
    raise ValueError(kind)


def _loops_state(global_step):
    """The shape of Lightning 2.x's `loops` entry: per-loop progress counters (plain ints/dicts, weights_only-safe)."""
    prog = lambda n: {"total": {"ready": n, "started": n, "processed": n, "completed": n},
                      "current": {"ready": n, "started": n, "processed": n, "completed": n}}
    return {
        "fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": global_step // 2},
                     "epoch_loop.batch_progress": {**prog(global_step // 2), "is_last_batch": False},
                     "epoch_loop.scheduler_progress": prog(0),
                     "epoch_loop.manual_optimization.state_dict": {},
                     "epoch_loop.manual_optimization.optim_step_progress": prog(global_step),
                     "epoch_loop.val_loop.state_dict": {}, "epoch_loop.val_loop.batch_progress": prog(0),
                     "epoch_progress": prog(0)},
        "validate_loop": {"state_dict": {}, "batch_progress": prog(0)},
        "test_loop": {"state_dict": {}, "batch_progress": prog(0)},
        "predict_loop": {"state_dict": {}, "batch_progress": prog(0)},
    }


def write_lightning_ckpt(path, kind="P", encoder_sd=None, seed=0, decoder_config=None, residual_config=None):
    """Write a tiny autoencoder-P or -R checkpoint in the official Lightning layout to `path` and return
    {"path", "kind", "z_channels", "decoder_config", "residual_config" (None for P), "state_dict" (everything written,
    full keys), "decoder_sd", "extra_vit_sd" (prefix-stripped views)}.

    encoder_sd: DINOv3 weights in the original layout (keys without `encoder.`); None -> tiny_dinov3's
    random_official_state_dict(DINOv3Config.tiny(), seed); {} -> no encoder keys (a decoder-only file).
    z_channels = the encoder width (cls_token's; 32 without an encoder) for P, + 8 residual channels for R.
    Default tiny sizes: DecoderConfig.tiny(z_channels), ResidualViTConfig.tiny(); pass configs to override."""
    if kind not in ("P", "R"):
        raise ValueError(f"kind must be 'P' or 'R', got {kind!r}")
    if encoder_sd is None:
        from tiny_dinov3 import random_official_state_dict
        encoder_sd = random_official_state_dict(seed=seed)
    g = torch.Generator().manual_seed(seed)
    enc_dim = encoder_sd["cls_token"].shape[-1] if encoder_sd else 32
    rcfg = None
    if kind == "R":
        rcfg = residual_config or ResidualViTConfig.tiny()
    z = enc_dim + (rcfg.out_channels if rcfg else 0)
    dcfg = decoder_config or DecoderConfig.tiny(z_channels=z)

    sd = {}
    if encoder_sd:
        sd.update({f"encoder.{k}": v.detach().clone() for k, v in encoder_sd.items()})
    if rcfg is not None:
        for k, shape, kk in residual_layout(rcfg.dim, rcfg.depth, rcfg.mlp_hidden, rcfg.patch_size, rcfg.out_channels):
            sd[f"extra_vit.{k}"] = _tensor(shape, kk, g, heads=rcfg.num_heads)
        sd["norm_vit.weight"] = _tensor([40], "gn_w", g)   # LayerNorm(8 + embed_dim 32), unused upstream
        sd["norm_vit.bias"] = _tensor([40], "b", g)
    for k, shape, kk in decoder_layout(dcfg.z_channels, dcfg.ch, dcfg.ch_mult, dcfg.num_res_blocks, dcfg.out_ch):
        sd[f"decoder.{k}"] = _tensor(shape, kk, g)
    for k, shape, kk in loss_layout():
        sd[f"loss.{k}"] = _tensor(shape, kk, g)

    global_step = 40000   # Lightning counts both optimizers' steps: 20,000 iterations
    ckpt = {"epoch": 3, "global_step": global_step, "pytorch-lightning_version": "2.6.0", "state_dict": sd,
            "loops": _loops_state(global_step)}
    torch.save(ckpt, path)
    strip = lambda p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return {"path": str(path), "kind": kind, "z_channels": z, "decoder_config": dcfg, "residual_config": rcfg,
            "state_dict": sd, "decoder_sd": strip("decoder."), "extra_vit_sd": strip("extra_vit.") or None}
