"""decoder.py: the official key layout and sizes, loading from an official-layout Lightning checkpoint, numerics
against independent functional references, RoPE-Mixed coordinates/rotation by hand, and clear errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from decoder import Decoder, DecoderConfig, ResidualViT, ResidualViTConfig, apply_rope, patch_coordinates, rope_angles
from plumbing.files import read_state_dict
from plumbing.loading import decoder_from_state_dict, load_decoder, residual_vit_from_state_dict
from tiny_autoencoder import write_lightning_ckpt

# -----------------------------------------------------------------------------------------------------------
# Independent references, written from the spec (official forward order, eager math), reading raw tensors.


def ref_decoder(sd, z, num_levels=5):
    gn = lambda x, p: F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)
    conv = lambda x, p, pad: F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], padding=pad)
    swish = lambda x: x * torch.sigmoid(x)

    def res(x, p):
        h = conv(swish(gn(x, p + ".norm1")), p + ".conv1", 1)
        h = conv(swish(gn(h, p + ".norm2")), p + ".conv2", 1)
        return (conv(x, p + ".nin_shortcut", 0) if p + ".nin_shortcut.weight" in sd else x) + h

    def attn(x, p):
        b, c, hh, ww = x.shape
        h = gn(x, p + ".norm")
        q, k, v = (conv(h, f"{p}.{n}", 0).reshape(b, c, hh * ww) for n in "qkv")
        w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c ** -0.5, dim=2)   # [b, query, key]
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + conv(out, p + ".proj_out", 0)

    h = conv(z, "conv_in", 1)
    h = res(attn(res(h, "mid.block_1"), "mid.attn_1"), "mid.block_2")
    for level in reversed(range(num_levels)):
        j = 0
        while f"up.{level}.block.{j}.conv1.weight" in sd:
            h = res(h, f"up.{level}.block.{j}")
            if f"up.{level}.attn.{j}.q.weight" in sd:
                h = attn(h, f"up.{level}.attn.{j}")
            j += 1
        if level != 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"up.{level}.upsample.conv", 1)
    return conv(swish(gn(h, "norm_out")), "conv_out", 1)


def ref_residual_vit(sd, x, num_heads):
    """RoPE-Mixed DeiT as upstream computes it: complex-number rotation of interleaved pairs, eager attention."""
    B, _, H, W = x.shape
    dim = sd["cls_token"].shape[-1]
    depth = sd["freqs"].shape[1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], dim=1)
    w_ = W // 16
    n = torch.arange((H // 16) * w_, dtype=torch.float32)
    tx, ty = n % w_, torch.floor(n / w_)
    N = tx.shape[0]
    fx = (tx[:, None] @ sd["freqs"][0][:, None, :]).view(depth, N, num_heads, -1).permute(0, 2, 1, 3)
    fy = (ty[:, None] @ sd["freqs"][1][:, None, :]).view(depth, N, num_heads, -1).permute(0, 2, 1, 3)
    cis = torch.polar(torch.ones_like(fx), fx + fy)                           # [depth, heads, N, hd/2]
    ln = lambda y, p: F.layer_norm(y, (dim,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)
    lin = lambda y, p: F.linear(y, sd[p + ".weight"], sd[p + ".bias"])
    for i in range(depth):
        p = f"blocks.{i}"
        y = ln(t, p + ".norm1")
        q, k, v = lin(y, p + ".attn.qkv").reshape(B, N + 1, 3, num_heads, -1).permute(2, 0, 3, 1, 4)

        def rot(a):
            c = torch.view_as_complex(a[:, :, 1:].reshape(*a[:, :, 1:].shape[:-1], -1, 2))
            return torch.cat([a[:, :, :1], torch.view_as_real(c * cis[i]).flatten(3)], dim=2)
        q, k = rot(q), rot(k)
        a = torch.softmax((q * 0.125) @ k.transpose(-2, -1), dim=-1) @ v
        t = t + sd[p + ".gamma_1"] * lin(a.transpose(1, 2).reshape(B, N + 1, dim), p + ".attn.proj")
        y = lin(F.gelu(lin(ln(t, p + ".norm2"), p + ".mlp.fc1")), p + ".mlp.fc2")
        t = t + sd[p + ".gamma_2"] * y
    t = ln(t, "norm")[:, 1:]
    return lin(F.gelu(lin(t, "heads.0")), "heads.2").transpose(1, 2)


def official_decoder_keys():
    """The 194 official `decoder.*` names (without prefix), in state-dict order, spelled out from the spec."""
    res = lambda p, short: [f"{p}.{m}.{s}" for m in ("norm1", "conv1", "norm2", "conv2") for s in ("weight", "bias")] + \
        ([f"{p}.nin_shortcut.{s}" for s in ("weight", "bias")] if short else [])
    att = lambda p: [f"{p}.{m}.{s}" for m in ("norm", "q", "k", "v", "proj_out") for s in ("weight", "bias")]
    keys = ["conv_in.weight", "conv_in.bias"] + res("mid.block_1", False) + att("mid.attn_1") + res("mid.block_2", False)
    for level in range(5):
        for j in range(3):
            keys += res(f"up.{level}.block.{j}", (level, j) in ((1, 0), (3, 0)))
        if level == 4:
            for j in range(3):
                keys += att(f"up.4.attn.{j}")
        if level:
            keys += [f"up.{level}.upsample.conv.weight", f"up.{level}.upsample.conv.bias"]
    return keys + ["norm_out.weight", "norm_out.bias", "conv_out.weight", "conv_out.bias"]


# -----------------------------------------------------------------------------------------------------------
# Full-size structure (built on meta: no memory, no time)


@pytest.mark.parametrize("preset, z, n_params", [("autoencoder_p", 384, 43_039_619), ("autoencoder_r", 392, 43_076_483)])
def test_full_size_decoder_keys_and_params(preset, z, n_params):
    with torch.device("meta"):
        model = Decoder(getattr(DecoderConfig, preset)())
    sd = model.state_dict()
    assert list(sd) == official_decoder_keys() and len(sd) == 194
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert sd["conv_in.weight"].shape == (512, z, 3, 3)
    assert sd["up.3.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)
    assert sd["up.1.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["up.4.attn.2.q.weight"].shape == (512, 512, 1, 1) and sd["conv_out.weight"].shape == (3, 128, 3, 3)
    assert sum(v.numel() for k, v in sd.items() if ".attn" in k) == 4_206_592   # the 4 "woattn" attention blocks


def test_full_size_residual_vit_keys_and_params():
    with torch.device("meta"):
        model = ResidualViT(ResidualViTConfig.deit_s())
    sd = model.state_dict()
    # Upstream has 182 extra_vit entries and 22,139,760 parameters; we drop the unused head (2 tensors, 385,000
    # parameters) and the 2 coordinate buffers.
    assert len(sd) == 182 - 4
    assert sum(p.numel() for p in model.parameters()) == 22_139_760 - 385_000
    assert sd["freqs"].shape == (2, 12, 192) and sd["heads.2.weight"].shape == (8, 384)
    assert sd["blocks.11.attn.qkv.weight"].shape == (1152, 384) and sd["blocks.0.mlp.fc1.weight"].shape == (1536, 384)
    assert model.blocks[0].attn.num_heads == 6


# -----------------------------------------------------------------------------------------------------------
# Loading from an official-layout Lightning checkpoint


@pytest.mark.parametrize("kind", ["P", "R"])
def test_load_decoder_from_lightning_ckpt(tmp_path, kind):
    info = write_lightning_ckpt(tmp_path / "ae.ckpt", kind=kind, seed=1)
    raw = torch.load(info["path"], weights_only=True)
    assert set(raw) == {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops"}
    prefixes = {k.split(".")[0] for k in raw["state_dict"]}
    assert prefixes == {"encoder", "decoder", "loss"} | ({"extra_vit", "norm_vit"} if kind == "R" else set())

    dec = load_decoder(info["path"])
    dino_dim = info["state_dict"]["encoder.cls_token"].shape[-1]
    assert dec.config == info["decoder_config"] and dec.config.z_channels == dino_dim + (8 if kind == "R" else 0)
    loaded = dec.state_dict()
    assert list(loaded) == list(info["decoder_sd"])
    assert all(torch.equal(loaded[k], v) for k, v in info["decoder_sd"].items())

    # Exactly equal to a module built normally and loaded strictly from the written tensors ...
    src = Decoder(info["decoder_config"]).eval()
    src.load_state_dict(info["decoder_sd"], strict=True)
    z = torch.randn(2, info["z_channels"], 3, 2)
    with torch.no_grad():
        out = dec(z)
        assert torch.equal(out, src(z))
        # ... and to the independent eager reference (SDPA vs bmm softmax: float rounding only).
        ref = ref_decoder(info["decoder_sd"], z)
    assert out.shape == (2, 3, 48, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=3e-5)
    assert out.abs().max() > 1.0                      # no tanh: unbounded output
    # Small-signal check: with conv_in's bias zeroed and latents ~1e-3, the first GroupNorm sees a variance near
    # its eps, so a wrong eps (1e-5 instead of 1e-6) shows.
    small = dict(info["decoder_sd"], **{"conv_in.bias": torch.zeros_like(info["decoder_sd"]["conv_in.bias"])})
    with torch.no_grad():
        torch.testing.assert_close(decoder_from_state_dict(small)(z * 1e-3), ref_decoder(small, z * 1e-3),
                                   rtol=1e-5, atol=3e-5)


def test_load_decoder_formats_and_dtype(tmp_path):
    from safetensors.torch import save_file
    info = write_lightning_ckpt(tmp_path / "ae.ckpt", kind="P", encoder_sd={})   # decoder + loss keys only
    dsd = info["decoder_sd"]
    torch.save(dsd, tmp_path / "plain.pt")
    save_file({f"decoder.{k}": v for k, v in dsd.items()}, str(tmp_path / "prefixed.safetensors"))
    save_file(dsd, str(tmp_path / "plain.safetensors"))
    z = torch.randn(1, 32, 2, 2)
    with torch.no_grad():
        want = load_decoder(info["path"])(z)
        for name in ("plain.pt", "prefixed.safetensors", "plain.safetensors"):
            assert torch.equal(load_decoder(tmp_path / name)(z), want), name
        bf = load_decoder(info["path"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert torch.equal(bf.conv_in.weight, dsd["conv_in.weight"].bfloat16())
    # The lead's path: one opened checkpoint, state-dict-level builders (full or stripped keys both work).
    sd = read_state_dict(info["path"])
    assert torch.equal(decoder_from_state_dict(sd).conv_out.bias, dsd["conv_out.bias"])


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (4, 1)])
def test_decoder_shapes(hw):
    dec = Decoder(DecoderConfig.tiny(z_channels=16)).eval()
    with torch.no_grad():
        out = dec(torch.randn(2, 16, *hw))
    assert out.shape == (2, 3, 16 * hw[0], 16 * hw[1])
    assert torch.isfinite(out).all()


# -----------------------------------------------------------------------------------------------------------
# Residual ViT (autoencoder-R): coordinates, rotation, whole forward


def test_patch_coordinates_by_hand():
    t_x, t_y = patch_coordinates(2, 3)                  # row-major 2 rows x 3 columns
    assert t_x.tolist() == [0, 1, 2, 0, 1, 2] and t_y.tolist() == [0, 0, 0, 1, 1, 1]
    assert t_x.dtype == torch.float32
    # A non-square grid with 4096 patches gets its own coordinates (upstream reused the 64x64 ones: fixed).
    t_x, t_y = patch_coordinates(32, 128)
    assert t_x.max() == 127 and t_y.max() == 31 and (t_x[128], t_y[128]) == (0, 1)


def test_rope_angles_and_rotation_by_hand():
    # 2 heads x 2 pairs (head_dim 4), 1 block. freqs[axis, block, head*2 + pair].
    freqs = torch.tensor([[[0.5, 1.0, -0.25, 2.0]], [[0.25, 0.0, 1.5, -1.0]]])   # [2, 1, 4]
    t_x, t_y = patch_coordinates(2, 3)
    phi = rope_angles(freqs, t_x, t_y, num_heads=2)                               # [1, 2, 6, 2]
    assert phi.shape == (1, 2, 6, 2)
    # token 5 = (column 2, row 1): head 0 pair 0: 2*0.5 + 1*0.25; head 1 pair 1: 2*2.0 + 1*(-1.0)
    assert phi[0, 0, 5, 0].item() == pytest.approx(1.25)
    assert phi[0, 1, 5, 1].item() == pytest.approx(3.0)
    assert phi[0, 1, 4, 0].item() == pytest.approx(1 * -0.25 + 1 * 1.5)        # token 4 = (column 1, row 1)
    # Interleaved pairs: channels (0, 1) form pair 0, (2, 3) pair 1.
    x = torch.tensor([1.0, 0.0, 2.0, 3.0])
    cos, sin = torch.tensor([math.cos(0.3), math.cos(1.1)]), torch.tensor([math.sin(0.3), math.sin(1.1)])
    want = [math.cos(0.3), math.sin(0.3),
            2 * math.cos(1.1) - 3 * math.sin(1.1), 2 * math.sin(1.1) + 3 * math.cos(1.1)]
    assert apply_rope(x, cos, sin).tolist() == pytest.approx(want, abs=1e-6)
    # bf16 input: rotated in fp32, returned in bf16
    assert apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16


@pytest.mark.parametrize("hw", [(32, 48), (64, 16)])
def test_residual_vit_matches_reference(tmp_path, hw):
    info = write_lightning_ckpt(tmp_path / "r.ckpt", kind="R", seed=2)
    sd = read_state_dict(info["path"])
    vit = residual_vit_from_state_dict(sd)            # full Lightning keys: extra_vit.* picked, rest ignored
    vit_stripped = residual_vit_from_state_dict(info["extra_vit_sd"])
    assert vit.config == info["residual_config"]
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out = vit(x)
        ref = ref_residual_vit(info["extra_vit_sd"], x, num_heads=vit.config.num_heads)
        assert torch.equal(vit_stripped(x), out)
        # Position matters (RoPE): transposing the patch grid changes the output, not just permutes it.
        out_t = vit(x.transpose(2, 3).contiguous())
    assert out.shape == (2, 8, (hw[0] // 16) * (hw[1] // 16))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Small-signal check: patch-embed bias zeroed, image ~1e-3, so the first LayerNorm's eps (1e-6) matters.
    small = dict(info["extra_vit_sd"], **{"patch_embed.proj.bias": torch.zeros(vit.config.dim)})
    with torch.no_grad():
        torch.testing.assert_close(residual_vit_from_state_dict(small)(x * 1e-3),
                                   ref_residual_vit(small, x * 1e-3, num_heads=vit.config.num_heads),
                                   rtol=1e-5, atol=1e-5)
    h, w = hw[0] // 16, hw[1] // 16
    perm = out.view(2, 8, h, w).transpose(2, 3).reshape(2, 8, -1)
    assert not torch.allclose(out_t, perm, atol=1e-3)


def test_residual_vit_bf16_keeps_fp32_freqs(tmp_path):
    info = write_lightning_ckpt(tmp_path / "r.ckpt", kind="R")
    vit = residual_vit_from_state_dict(info["extra_vit_sd"], dtype=torch.bfloat16)
    assert vit.freqs.dtype == torch.float32 and vit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = vit(torch.randn(1, 3, 32, 32))
        ref = ref_residual_vit(info["extra_vit_sd"], torch.randn(1, 3, 32, 32), num_heads=2)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape == (1, 8, 4)


# -----------------------------------------------------------------------------------------------------------
# Clear one-line errors


def test_bad_inputs():
    dec = Decoder(DecoderConfig.tiny(z_channels=16))
    with pytest.raises(ValueError, match=r"latents \[B, 16, h, w\].*\[1, 8, 2, 2\]"):
        dec(torch.randn(1, 8, 2, 2))
    with pytest.raises(ValueError, match="latents"):
        dec(torch.randn(16, 2, 2))
    vit = ResidualViT(ResidualViTConfig.tiny())
    with pytest.raises(ValueError, match="30x32.*not a multiple of 16"):
        vit(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"images \[B, 3, H, W\]"):
        vit(torch.randn(1, 4, 32, 32))


def _oneline(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_decoder(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="cannot read checkpoint") as e:
        load_decoder(tmp_path / "junk.ckpt")
    _oneline(e)

    info = write_lightning_ckpt(tmp_path / "r.ckpt", kind="R")
    full = info["state_dict"]
    # A DINOv3-like file (no decoder keys): says so, names what it found.
    torch.save({"cls_token": torch.zeros(1, 1, 8), "blocks.0.norm1.weight": torch.ones(8)}, tmp_path / "dino.pth")
    with pytest.raises(ValueError, match="no decoder weights found.*blocks, cls_token") as e:
        load_decoder(tmp_path / "dino.pth")
    _oneline(e)
    # Missing, unexpected and mis-shaped keys are listed by name, with the checkpoint prefix.
    bad = dict(full)
    del bad["decoder.mid.attn_1.q.weight"]
    bad["decoder.mid.attn_1.extra"] = torch.zeros(1)
    bad["decoder.up.2.block.1.conv1.bias"] = torch.zeros(5)
    torch.save({"state_dict": bad}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError) as e:
        load_decoder(tmp_path / "bad.ckpt")
    msg = _oneline(e)
    assert "bad.ckpt" in msg and "missing: decoder.mid.attn_1.q.weight" in msg
    assert "unexpected: decoder.mid.attn_1.extra" in msg and "decoder.up.2.block.1.conv1.bias [5] vs [64]" in msg
    # The residual ViT ignores only the documented keys; anything else is an error.
    vsd = dict(info["extra_vit_sd"], pos_embed=torch.zeros(1, 4, 128))
    del vsd["blocks.1.gamma_2"]
    with pytest.raises(ValueError, match=r"missing: extra_vit.blocks.1.gamma_2; unexpected: extra_vit.pos_embed"):
        residual_vit_from_state_dict(vsd)
    with pytest.raises(ValueError, match="not an autoencoder-R"):
        residual_vit_from_state_dict(write_lightning_ckpt(tmp_path / "p.ckpt", kind="P")["state_dict"])
