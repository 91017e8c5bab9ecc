"""NextDiT: forward vs a naive restatement of the official algorithm, invariances, GQA, RoPE, loader, 2B key table."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import nextdit
from nextdit import NextDiT, NextDiTConfig, TimestepEmbedder, apply_rope, position_ids, rope_cos_sin
from plumbing.loading import load_nextdit, nextdit_from_state_dict
from tiny_nextdit import (CONSOLIDATED, CONSOLIDATED_EMA, official_keys_and_shapes, official_state_dict,
                          write_official_consolidated)

TINY = NextDiTConfig.tiny()


def tiny_model(config=TINY, seed=0):
    model = NextDiT(config)
    model.load_state_dict(official_state_dict(config, seed))
    return model.eval()


def captions(lens, L, dim=TINY.cap_feat_dim, garbage=0.0):
    """Right-padded caption features [B, L, dim] and mask [B, L]; padded features set to `garbage` * randn."""
    feats = torch.randn(len(lens), L, dim)
    mask = torch.arange(L)[None] < torch.tensor(lens)[:, None]
    feats = torch.where(mask[..., None], feats, garbage * torch.randn_like(feats))
    return feats, mask


# ---------------------------------------------------------------------------------------------------------------
# An independent, naive restatement of the official forward (reference sections 2.1-2.13): per-sample loops,
# complex64 RoPE tables looked up by position id, the caption refiner over the full padded length with zero
# rotation at padding, K/V heads repeated explicitly, [B, H, S, S] boolean masks, explicit softmax. Reads the
# official state dict directly.


def ref_forward(sd, c, xs, t, cap_feats, cap_mask):
    p, hd, n_rep = c.patch_size, c.dim // c.n_heads, c.n_heads // c.n_kv_heads

    def lin(x, name, bias=True):
        return x @ sd[name + ".weight"].T + (sd[name + ".bias"] if bias else 0)

    def rms(x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    tables = []  # per axis: [axes_len, d/2] complex64
    for d, e in zip(c.axes_dims, c.axes_lens):
        omega = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angle = torch.outer(torch.arange(e, dtype=torch.float64), omega).float()
        tables.append(torch.polar(torch.ones_like(angle), angle))

    def attention(x, mask, freqs, pre):
        B, S, _ = x.shape
        qkv = lin(x, pre + ".qkv", bias=False)
        q = qkv[..., :c.n_heads * hd].reshape(B, S, c.n_heads, hd)
        k = qkv[..., c.n_heads * hd:(c.n_heads + c.n_kv_heads) * hd].reshape(B, S, c.n_kv_heads, hd)
        v = qkv[..., (c.n_heads + c.n_kv_heads) * hd:].reshape(B, S, c.n_kv_heads, hd)
        q, k = rms(q, sd[pre + ".q_norm.weight"], 1e-6), rms(k, sd[pre + ".k_norm.weight"], 1e-6)

        def rot(z):
            zc = torch.view_as_complex(z.float().reshape(B, S, z.shape[2], hd // 2, 2))
            return torch.view_as_real(zc * freqs[:, :, None]).reshape(z.shape)

        q, k = rot(q), rot(k)
        k = k[:, :, :, None].expand(B, S, c.n_kv_heads, n_rep, hd).reshape(B, S, c.n_heads, hd)  # h -> h // n_rep
        v = v[:, :, :, None].expand(B, S, c.n_kv_heads, n_rep, hd).reshape(B, S, c.n_heads, hd)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~mask[:, None, None, :].expand(B, c.n_heads, S, S), float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, S, c.n_heads * hd)
        return lin(out, pre + ".out", bias=False)

    def ffn(x, pre):
        return lin(F.silu(lin(x, pre + ".w1", False)) * lin(x, pre + ".w3", False), pre + ".w2", False)

    def block(x, mask, freqs, pre, temb=None):
        n = lambda z, name: rms(z, sd[f"{pre}.{name}.weight"], 1e-5)
        if temb is None:
            x = x + n(attention(n(x, "attention_norm1"), mask, freqs, pre + ".attention"), "attention_norm2")
            return x + n(ffn(n(x, "ffn_norm1"), pre + ".feed_forward"), "ffn_norm2")
        mod = lin(F.silu(temb), pre + ".adaLN_modulation.1")
        s_msa, g_msa, s_mlp, g_mlp = [m[:, None] for m in mod.chunk(4, dim=1)]
        a = attention(n(x, "attention_norm1") * (1 + s_msa), mask, freqs, pre + ".attention")
        x = x + torch.tanh(g_msa) * n(a, "attention_norm2")
        return x + torch.tanh(g_mlp) * n(ffn(n(x, "ffn_norm1") * (1 + s_mlp), pre + ".feed_forward"), "ffn_norm2")

    B = len(xs)
    k = torch.arange(128, dtype=torch.float32)
    args = t[:, None].float() * torch.exp(-math.log(10000) * k / 128)[None]
    temb = lin(F.silu(lin(torch.cat([args.cos(), args.sin()], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    cap = lin(rms(cap_feats, sd["cap_embedder.0.weight"], 1e-5), "cap_embedder.1")  # all L_pad positions

    cap_lens = [int(m.sum()) for m in cap_mask]
    grids = [(x.shape[1] // p, x.shape[2] // p) for x in xs]
    img_lens = [h * w for h, w in grids]
    S, N, L = max(a + b for a, b in zip(cap_lens, img_lens)), max(img_lens), cap_feats.shape[1]
    pos = torch.zeros(B, S, 3, dtype=torch.long)
    for i in range(B):
        cl, (h, w) = cap_lens[i], grids[i]
        for j in range(cl):
            pos[i, j] = torch.tensor([j, 0, 0])
        for r in range(h):
            for col in range(w):
                pos[i, cl + r * w + col] = torch.tensor([cl, r, col])
    freqs = torch.cat([tables[a][pos[..., a]] for a in range(3)], dim=-1)  # [B, S, hd/2]
    cap_freqs = torch.zeros(B, L, hd // 2, dtype=torch.complex64)
    img_freqs = torch.zeros(B, N, hd // 2, dtype=torch.complex64)
    for i in range(B):
        cap_freqs[i, :cap_lens[i]] = freqs[i, :cap_lens[i]]
        img_freqs[i, :img_lens[i]] = freqs[i, cap_lens[i]:cap_lens[i] + img_lens[i]]

    for i in range(c.n_refiner_layers):
        cap = block(cap, cap_mask.bool(), cap_freqs, f"context_refiner.{i}")

    img = torch.zeros(B, N, p * p * c.in_channels)
    img_mask = torch.zeros(B, N, dtype=torch.bool)
    for i, x in enumerate(xs):
        h, w = grids[i]
        for r in range(h):
            for col in range(w):  # token vector ordered (pH, pW, C)
                img[i, r * w + col] = x[:, r * p:(r + 1) * p, col * p:(col + 1) * p].permute(1, 2, 0).flatten()
        img_mask[i, :img_lens[i]] = True
    img = lin(img, "x_embedder")
    for i in range(c.n_refiner_layers):
        img = block(img, img_mask, img_freqs, f"noise_refiner.{i}", temb)

    h = torch.zeros(B, S, c.dim)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for i in range(B):
        cl, il = cap_lens[i], img_lens[i]
        h[i, :cl], h[i, cl:cl + il], mask[i, :cl + il] = cap[i, :cl], img[i, :il], True
    for i in range(c.n_layers):
        h = block(h, mask, freqs, f"layers.{i}", temb)
    scale = lin(F.silu(temb), "final_layer.adaLN_modulation.1")[:, None]
    h = lin(F.layer_norm(h, (c.dim,), eps=1e-6) * (1 + scale), "final_layer.linear")

    outs = []
    for i, x in enumerate(xs):
        (gh, gw), out = grids[i], torch.zeros_like(x)
        for r in range(gh):
            for col in range(gw):
                tok = h[i, cap_lens[i] + r * gw + col].reshape(p, p, c.in_channels)
                out[:, r * p:(r + 1) * p, col * p:(col + 1) * p] = tok.permute(2, 0, 1)
        outs.append(out)
    return outs


@pytest.mark.parametrize("patch_size", [1, 2])
def test_forward_matches_naive_official_algorithm(patch_size):
    config = replace(TINY, patch_size=patch_size)
    model = tiny_model(config)
    xs = [torch.randn(8, 4 * patch_size, 6 * patch_size), torch.randn(8, 2 * patch_size, 3 * patch_size),
          torch.randn(8, 3 * patch_size, 3 * patch_size)]
    cap_feats, cap_mask = captions([4, 7, 1], 9, garbage=10.0)
    t = torch.tensor([0.0, 0.37, 1.0])
    with torch.no_grad():
        ours = model(xs, t, cap_feats, cap_mask)
        ref = ref_forward(official_state_dict(config), config, xs, t, cap_feats, cap_mask)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert b.abs().mean() > 0.1  # a real signal, not a trivially zero output
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# Invariances


def test_list_input_equals_tensor_input():
    model = tiny_model()
    x = torch.randn(3, 8, 4, 5)
    cap_feats, cap_mask = captions([3, 6, 6], 6)
    t = torch.rand(3)
    with torch.no_grad():
        out_tensor = model(x, t, cap_feats, cap_mask)
        out_list = model(list(x), t, cap_feats, cap_mask)
    assert isinstance(out_tensor, torch.Tensor) and out_tensor.shape == x.shape
    assert isinstance(out_list, list) and len(out_list) == 3
    torch.testing.assert_close(torch.stack(out_list), out_tensor, atol=1e-6, rtol=0)


def test_batch_independence():
    """A sample's output is the same alone and in a batch of other sizes and caption lengths (whose padding
    enters its refiner and joint sequences)."""
    model = tiny_model()
    xs = [torch.randn(8, 3, 4), torch.randn(8, 5, 6), torch.randn(8, 1, 2)]
    cap_feats, cap_mask = captions([2, 5, 3], 7, garbage=5.0)
    t = torch.tensor([0.1, 0.6, 0.9])
    with torch.no_grad():
        batched = model(xs, t, cap_feats, cap_mask)
        for i in range(3):
            n = int(cap_mask[i].sum())
            alone = model([xs[i]], t[i:i + 1], cap_feats[i:i + 1, :n], cap_mask[i:i + 1, :n])[0]
            torch.testing.assert_close(batched[i], alone, atol=2e-5, rtol=2e-5)


def test_extra_caption_padding_changes_nothing():
    model = tiny_model()
    x = torch.randn(2, 8, 3, 3)
    cap_feats, cap_mask = captions([3, 5], 5)
    t = torch.tensor([0.2, 0.8])
    pad = 11
    more_feats = torch.cat([cap_feats, 100 * torch.randn(2, pad, TINY.cap_feat_dim)], dim=1)  # garbage padding
    more_mask = torch.cat([cap_mask, torch.zeros(2, pad, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        out = model(x, t, cap_feats, cap_mask)
        out_padded = model(x, t, more_feats, more_mask.long())  # 0/1 mask accepted too
    torch.testing.assert_close(out_padded, out, atol=1e-6, rtol=0)
    # and the padded features really are ignored: changing a valid token does change the output
    cap_feats[0, 0] += 1
    with torch.no_grad():
        assert not torch.allclose(model(x, t, cap_feats, cap_mask)[0], out[0], atol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
def test_context_computed_once_equals_per_call(padded):
    """Sampling computes NextDiT.context once per image: the same bits as computing it in every forward, at
    every t, and the context refiner's output depends on the captions only."""
    model = tiny_model()
    cap_feats, cap_mask = captions([5, 3] if padded else [5, 5], 7)
    x = torch.randn(2, 8, 4, 6)
    ctx = model.context(cap_feats, cap_mask, [(4, 6)] * 2)
    for t in (torch.tensor([0.1, 0.9]), torch.tensor([0.5, 0.5])):
        assert torch.equal(model(x, t, cap_feats, cap_mask), model(x, t, context=ctx))
        assert torch.equal(model(x * 2, t, cap_feats, cap_mask), model(x * 2, t, context=ctx))
    with pytest.raises(ValueError, match="do not match the context"):
        model(torch.randn(2, 8, 4, 4), torch.rand(2), context=ctx)


def test_no_mask_when_nothing_is_padded(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((attn_mask is not None, kw.get("enable_gqa", False), k.shape[1]))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(nextdit.F, "scaled_dot_product_attention", spy)
    model = tiny_model()
    n_blocks = 2 * TINY.n_refiner_layers + TINY.n_layers
    with torch.no_grad():
        model(torch.randn(2, 8, 3, 4), torch.rand(2), *captions([4, 4], 4))
    assert calls == [(False, True, TINY.n_kv_heads)] * n_blocks  # no mask, GQA without repeated K/V
    calls.clear()
    with torch.no_grad():
        model(torch.randn(2, 8, 3, 4), torch.rand(2), *captions([4, 2], 4))  # CFG-like: different caption lengths
    # context refiner and joint blocks masked; the noise refiner (same image sizes) is not
    expected = ([(True, True, TINY.n_kv_heads)] * TINY.n_refiner_layers + [(False, True, TINY.n_kv_heads)] *
                TINY.n_refiner_layers + [(True, True, TINY.n_kv_heads)] * TINY.n_layers)
    assert calls == expected


@pytest.mark.parametrize("padded, repeat_kv", [(False, False), (True, False), (True, True)])
def test_gqa_equals_mha_with_repeated_kv_heads(padded, repeat_kv, monkeypatch):
    """GQA (query head h reads K/V head h // n_rep) equals plain multi-head attention whose K/V heads (weights
    and the shared k_norm) are each repeated n_rep times in a row. repeat_kv: the masked path used on CUDA."""
    if repeat_kv:
        monkeypatch.setattr(nextdit, "REPEAT_KV_WHEN_MASKED", {"cpu"})
    gqa = tiny_model()
    mha_config = replace(TINY, n_kv_heads=TINY.n_heads)
    sd = official_state_dict(TINY)
    n_rep, hd, D = TINY.n_heads // TINY.n_kv_heads, TINY.head_dim, TINY.dim
    for name in list(sd):
        if name.endswith("attention.qkv.weight"):
            q, k, v = sd[name].split([TINY.n_heads * hd, TINY.n_kv_heads * hd, TINY.n_kv_heads * hd])
            rep = lambda w: w.reshape(TINY.n_kv_heads, hd, D).repeat_interleave(n_rep, 0).reshape(-1, D)
            sd[name] = torch.cat([q, rep(k), rep(v)])
    mha = NextDiT(mha_config).eval()
    mha.load_state_dict(sd)
    xs = [torch.randn(8, 3, 4), torch.randn(8, 2, 5) if padded else torch.randn(8, 3, 4)]
    cap_feats, cap_mask = captions([5, 2] if padded else [5, 5], 5)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        for a, b in zip(gqa(xs, t, cap_feats, cap_mask), mha(xs, t, cap_feats, cap_mask)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Positions, RoPE, timestep embedding against hand-built values


def test_position_ids_hand_built():
    pos = position_ids([2, 1], [(2, 2), (1, 3)])
    expected = torch.tensor([
        [[0, 0, 0], [1, 0, 0], [2, 0, 0], [2, 0, 1], [2, 1, 0], [2, 1, 1]],  # 2 caption tokens, 2x2 image
        [[0, 0, 0], [1, 0, 0], [1, 0, 1], [1, 0, 2], [0, 0, 0], [0, 0, 0]],  # 1 caption token, 1x3 image, padding
    ])
    assert torch.equal(pos, expected)


def test_rope_tables_hand_built():
    pos = torch.tensor([[[5, 7, 11], [0, 0, 0]]])
    cos, sin = rope_cos_sin(pos, (4, 6, 8), theta=10000.0)
    assert cos.shape == sin.shape == (1, 2, 9) and cos.dtype == torch.float32
    angles = [5 * 10000 ** (-k / 4) for k in (0, 2)] + [7 * 10000 ** (-k / 6) for k in (0, 2, 4)] + \
             [11 * 10000 ** (-k / 8) for k in (0, 2, 4, 6)]
    torch.testing.assert_close(cos[0, 0], torch.tensor([math.cos(a) for a in angles]), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[0, 0], torch.tensor([math.sin(a) for a in angles]), atol=1e-6, rtol=0)
    assert torch.equal(cos[0, 1], torch.ones(9)) and torch.equal(sin[0, 1], torch.zeros(9))
    # the official table: float64 angles rounded to float32, complex64 polar
    official = torch.polar(torch.ones(9), torch.tensor(angles, dtype=torch.float64).float())
    torch.testing.assert_close(torch.complex(cos[0, 0], sin[0, 0]), official, atol=1e-7, rtol=0)
    # a different theta changes all but the k = 0 angles
    cos2, _ = rope_cos_sin(pos, (4, 6, 8), theta=500.0)
    assert torch.equal(cos2[0, 0, [0, 2, 5]], cos[0, 0, [0, 2, 5]]) and not torch.allclose(cos2, cos)


@pytest.mark.parametrize("part", [0, 1])
def test_apply_rope_rotates_adjacent_pairs(part):
    """head_dim 12 = axes (4, 4, 4): pairs 0-1 rotate with axis 0, pairs 2-3 with axis 1 (row), 4-5 with axis 2.
    A unit vector on channel 2m + part (real / imaginary part of pair m) rotates in the (2m, 2m+1) plane only."""
    pos = torch.tensor([[[3, 5, 7]]])
    cos, sin = rope_cos_sin(pos, (4, 4, 4))
    for m, angle in [(0, 3.0), (1, 3 * 0.01), (3, 5 * 0.01), (4, 7.0)]:  # 10000^(-2/4) = 0.01
        x = torch.zeros(1, 1, 2, 12)
        x[..., 2 * m + part] = 1.0
        out = apply_rope(x, cos, sin)
        expected = torch.zeros(1, 1, 2, 12)
        c, s = math.cos(angle), math.sin(angle)
        expected[..., 2 * m], expected[..., 2 * m + 1] = (c, s) if part == 0 else (-s, c)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_timestep_embedding_cos_then_sin_unscaled():
    emb = TimestepEmbedder.sinusoid(torch.tensor([0.0, 0.5, 1.0]), 256)
    assert emb.shape == (3, 256)
    f = lambda k: math.exp(-math.log(10000) * k / 128)
    for row, t in enumerate([0.0, 0.5, 1.0]):
        for k in (0, 1, 64, 127):
            assert emb[row, k].item() == pytest.approx(math.cos(t * f(k)), abs=1e-6)
            assert emb[row, 128 + k].item() == pytest.approx(math.sin(t * f(k)), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Training support


def test_initialisation_as_upstream():
    torch.manual_seed(0)
    model = NextDiT(replace(TINY, dim=144, n_heads=12, n_kv_heads=4, ffn_dim=384, axes_dims=(4, 4, 4)))
    sd = model.state_dict()
    for name, value in sd.items():
        if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
            assert torch.count_nonzero(value) == 0, name
        elif name.endswith("norm_final.weight") or "norm" in name or name == "cap_embedder.0.weight":
            assert torch.equal(value, torch.ones_like(value)), name
        elif name.endswith("bias"):
            assert torch.count_nonzero(value) == 0, name
    for name in ["x_embedder.weight", "layers.0.attention.qkv.weight", "layers.1.feed_forward.w2.weight"]:
        fan_out, fan_in = sd[name].shape  # xavier uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))
        a = math.sqrt(6 / (fan_in + fan_out))
        assert sd[name].abs().max() <= a and sd[name].std().item() == pytest.approx(a / math.sqrt(3), rel=0.1)
    for name in ["t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight", "cap_embedder.1.weight"]:
        assert sd[name].std().item() == pytest.approx(0.02, rel=0.1), name
    # zero-initialised final layer: a fresh model predicts zero velocity
    with torch.no_grad():
        out = model(torch.randn(1, 8, 2, 2), torch.rand(1), *captions([3], 3))
    assert torch.count_nonzero(out) == 0


def test_grad_checkpointing_same_gradients_and_recomputes():
    model = tiny_model().train()
    xs = [torch.randn(8, 3, 4), torch.randn(8, 2, 2)]
    cap_feats, cap_mask = captions([3, 5], 5)
    t = torch.tensor([0.4, 0.6])
    calls = []
    model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))  # recompute may stop early
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        calls.clear()
        loss = sum(o.square().mean() for o in model(xs, t, cap_feats, cap_mask))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if n != "norm_final.weight"})
        assert len(calls) == (2 if ckpt else 1)  # with checkpointing the block re-runs in backward
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_bf16_model_and_autocast():
    model = tiny_model()
    x, t = torch.randn(2, 8, 3, 3), torch.tensor([0.3, 0.9])
    cap_feats, cap_mask = captions([2, 4], 4)
    with torch.no_grad():
        ref = model(x, t, cap_feats, cap_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x, t, cap_feats, cap_mask)
        bf16 = model.to(torch.bfloat16)(x, t, cap_feats, cap_mask)  # fp32 inputs are cast to the weights' dtype
    assert bf16.dtype == torch.bfloat16
    for out in (auto, bf16):
        assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


# ---------------------------------------------------------------------------------------------------------------
# Loader


def wrap(sd, how):
    if how == "model":
        return {"model": sd, "args": {"lr": torch.tensor(1e-4)}}
    if how == "ema":
        return {"ema": sd}
    if how == "fsdp":  # FSDP + activation-checkpoint wrappers around each joint block
        return {k.replace("layers.", "layers._fsdp_wrapped_module._checkpoint_wrapped_module.", 1)
                if k.startswith("layers.") else k: v for k, v in sd.items()}
    if how == "ddp":
        return {"module." + k: v for k, v in sd.items()}
    return sd


@pytest.mark.parametrize("layout", ["folder", "file", "ema_file", "ema_folder", "model", "ema", "fsdp", "ddp",
                                    "safetensors"])
def test_loader_round_trip(tmp_path, layout):
    sd = official_state_dict(TINY, seed=1)
    if layout in ("folder", "file"):
        file = write_official_consolidated(tmp_path / ("ckpt" if layout == "folder" else "x.pth"), TINY, seed=1)
        path = tmp_path / "ckpt" if layout == "folder" else file
    elif layout in ("ema_file", "ema_folder"):
        path = write_official_consolidated(tmp_path / CONSOLIDATED_EMA, TINY, seed=1)
        path = tmp_path if layout == "ema_folder" else path
    elif layout == "safetensors":
        from safetensors.torch import save_file

        save_file(dict(sd), tmp_path / "model.safetensors")
        path = tmp_path
    else:
        torch.save(wrap(sd, layout), tmp_path / "wrapped.pth")
        path = tmp_path / "wrapped.pth"
    model = load_nextdit(path, dtype=torch.float32)
    assert model.config == TINY and not model.training
    loaded = model.state_dict()
    assert list(loaded) == [k for k, _ in official_keys_and_shapes(TINY)]
    for name, value in sd.items():
        assert torch.equal(loaded[name], value), name
    # and it runs: same output as the model loaded by hand
    xs, t, (cf, cm) = [torch.randn(8, 2, 3)], torch.tensor([0.5]), captions([3], 4)
    with torch.no_grad():
        torch.testing.assert_close(model(xs, t, cf, cm)[0], tiny_model(TINY, seed=1)(xs, t, cf, cm)[0])


def test_loader_converts_to_bf16_and_infers_the_config(tmp_path):
    config = replace(TINY, n_layers=3, n_refiner_layers=2, in_channels=5, cap_feat_dim=20, ffn_dim=64)
    write_official_consolidated(tmp_path, config, seed=2)
    model = load_nextdit(tmp_path)
    assert model.config == config
    sd = official_state_dict(config, seed=2)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v.to(torch.bfloat16)) for k, v in sd.items())
    assert nextdit_from_state_dict(sd, dtype=None).x_embedder.weight.dtype == torch.float32


def test_folder_prefers_the_ema_weights(tmp_path):
    write_official_consolidated(tmp_path / CONSOLIDATED, TINY, seed=3)
    write_official_consolidated(tmp_path / CONSOLIDATED_EMA, TINY, seed=4)
    (tmp_path / "model_args.pth").write_bytes(b"not weights")  # trainer folders hold other .pth files too
    w = lambda s: official_state_dict(TINY, s)["x_embedder.weight"]
    assert torch.equal(load_nextdit(tmp_path, dtype=None).x_embedder.weight, w(4))      # the EMA
    assert torch.equal(load_nextdit(tmp_path / CONSOLIDATED, dtype=None).x_embedder.weight, w(3))


# the released 2B model's official key table (reference section 3), written out literally
BLOCK_2B = {"attention.qkv.weight": (3840, 2304), "attention.out.weight": (2304, 2304),
            "attention.q_norm.weight": (96,), "attention.k_norm.weight": (96,),
            "feed_forward.w1.weight": (9216, 2304), "feed_forward.w2.weight": (2304, 9216),
            "feed_forward.w3.weight": (9216, 2304), "attention_norm1.weight": (2304,), "ffn_norm1.weight": (2304,),
            "attention_norm2.weight": (2304,), "ffn_norm2.weight": (2304,)}
ADALN_2B = {"adaLN_modulation.1.weight": (9216, 1024), "adaLN_modulation.1.bias": (9216,)}
TOP_2B = {"x_embedder.weight": (2304, 384), "x_embedder.bias": (2304,), "t_embedder.mlp.0.weight": (1024, 256),
          "t_embedder.mlp.0.bias": (1024,), "t_embedder.mlp.2.weight": (1024, 1024), "t_embedder.mlp.2.bias": (1024,),
          "cap_embedder.0.weight": (2304,), "cap_embedder.1.weight": (2304, 2304), "cap_embedder.1.bias": (2304,),
          "norm_final.weight": (2304,), "final_layer.linear.weight": (384, 2304), "final_layer.linear.bias": (384,),
          "final_layer.adaLN_modulation.1.weight": (2304, 1024), "final_layer.adaLN_modulation.1.bias": (2304,)}


def test_2b_preset_on_meta_has_the_official_keys_and_parameter_count():
    with torch.device("meta"):
        model = NextDiT(NextDiTConfig.from_name("2b"))
        small = NextDiT(NextDiTConfig.from_name("0.8b"))
    expected = dict(TOP_2B)
    for blk, n, adaln in [("layers", 26, True), ("noise_refiner", 2, True), ("context_refiner", 2, False)]:
        for i in range(n):
            expected.update({f"{blk}.{i}.{k}": s for k, s in (BLOCK_2B | (ADALN_2B if adaln else {})).items()})
    sd = model.state_dict()
    assert len(sd) == len(expected) == 400
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sum(p.numel() for p in model.parameters()) == 2_611_246_336
    assert sum(p.numel() for p in small.parameters()) == 784_896_640
    # the config is recovered from shapes alone
    assert NextDiTConfig.from_state_dict(sd) == NextDiTConfig.from_name("2b")
    assert NextDiTConfig.from_state_dict(small.state_dict()) == NextDiTConfig.from_name("0.8b")
    # the hand-written helper table agrees (it is what the tiny checkpoints are written from)
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == official_keys_and_shapes(NextDiTConfig.from_name("2b"))


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_nextdit(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="consolidated.00-of-01.pth"):
        load_nextdit(tmp_path / "empty")
    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ValueError, match="corrupt"):
        load_nextdit(tmp_path / "garbage.pth")
    good = write_official_consolidated(tmp_path / "good.pth")
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_nextdit(tmp_path / "truncated.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"{}" * 10)
    with pytest.raises(ValueError, match="safetensors"):
        load_nextdit(tmp_path / "bad.safetensors")


def test_state_dict_errors_name_the_keys(tmp_path):
    sd = official_state_dict()
    bad = dict(sd)
    del bad["layers.1.ffn_norm2.weight"]
    bad["layers.0.extra.weight"] = torch.zeros(3)
    bad["layers.1.feed_forward.w1.weight"] = torch.zeros(7, TINY.dim)
    torch.save(bad, tmp_path / CONSOLIDATED)
    with pytest.raises(ValueError) as e:
        load_nextdit(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and CONSOLIDATED in msg
    assert "missing: layers.1.ffn_norm2.weight" in msg
    assert "unexpected: layers.0.extra.weight" in msg
    assert "layers.1.feed_forward.w1.weight [7, 72] vs [96, 72]" in msg
    with pytest.raises(ValueError, match="not a NextDiT checkpoint"):
        nextdit_from_state_dict({"blocks.0.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="not a tensor"):
        nextdit_from_state_dict({**sd, "step": 3})


@pytest.mark.parametrize("case, match", [
    ("left_padded", "right-padded"),
    ("no_caption", "valid tokens"),
    ("caption_too_long", "valid tokens"),
    ("channels", "channels"),
    ("odd_size", "divisible by patch_size"),
    ("grid_too_large", "RoPE range"),
    ("t_shape", "t must be"),
    ("cap_dim", "cap_feats must be"),
    ("mask_shape", "cap_mask must be"),
    ("x_ndim", "x must be"),
])
def test_forward_errors(case, match):
    config = replace(TINY, patch_size=2, axes_lens=(10, 6, 6))
    model = NextDiT(config)
    x, t = torch.randn(2, 8, 4, 4), torch.rand(2)
    cap_feats, cap_mask = captions([3, 2], 4)
    if case == "left_padded":
        cap_mask = cap_mask.flip(1)
    elif case == "no_caption":
        cap_mask[1] = False
    elif case == "caption_too_long":
        cap_feats, cap_mask = captions([10, 2], 12)
    elif case == "channels":
        x = torch.randn(2, 7, 4, 4)
    elif case == "odd_size":
        x = [torch.randn(8, 4, 4), torch.randn(8, 4, 5)]
    elif case == "grid_too_large":
        x = torch.randn(2, 8, 12, 4)
    elif case == "t_shape":
        t = torch.rand(3)
    elif case == "cap_dim":
        cap_feats = torch.randn(2, 4, 31)
    elif case == "mask_shape":
        cap_mask = cap_mask[:, :3]
    elif case == "x_ndim":
        x = torch.randn(8, 4, 4)
    with pytest.raises(ValueError, match=match):
        model(x, t, cap_feats, cap_mask)
