"""DINOv3 encoder and loader: official layouts, parity with transformers, RoPE by hand, bf16, bad input."""

import argparse
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import tiny_dinov3 as tiny
from dinov3 import IMAGENET_MEAN, IMAGENET_STD, DINOv3, DINOv3Config, rope_rotate
from plumbing.files import refused_global
from plumbing.loading import dinov3_from_state_dict, load_dinov3

SIZES = [(64, 64), (48, 80), (96, 32)]  # square, wide, tall: 16, 15 and 12 patches

# The 16 periods of dinov3_vits16plus as the official checkpoint stores them (bf16-rounded 100^(k/16)),
# written out from the spec rather than computed, so the writer's rounding is checked too.
OFFICIAL_PERIODS = [1, 1.3359375, 1.78125, 2.375, 3.15625, 4.21875, 5.625, 7.5,
                    10, 13.3125, 17.75, 23.75, 31.625, 42.25, 56.25, 75]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One set of tiny random weights (seed 0) written in every layout."""
    d = tmp_path_factory.mktemp("dinov3")
    sd = tiny.random_official_state_dict(seed=0, periods="formula")  # formula periods: HF-comparable
    f = {"dir": d, "sd": sd}
    f["pth"] = d / "dinov3.pth"
    tiny.write_official_pth(f["pth"], state_dict=sd)
    f["pth_bf16"] = d / "dinov3_bf16periods.pth"  # as the real file: periods rounded to bf16
    tiny.write_official_pth(f["pth_bf16"], seed=0, periods="bf16")
    f["hf"] = d / "hf"
    tiny.write_hf(f["hf"], state_dict=sd)
    f["hf_model_layer"] = d / "hf_v5"
    tiny.write_hf(f["hf_model_layer"], state_dict=sd, layer_prefix="model.layer.")
    f["hf_minimal"] = d / "hf_minimal"  # a diff-saved config.json: values equal to HF defaults are omitted
    tiny.write_hf(f["hf_minimal"], state_dict=sd)
    cfg = json.loads((f["hf_minimal"] / "config.json").read_text())
    for key in ["rope_theta", "layer_norm_eps", "key_bias", "query_bias", "image_size"]:
        del cfg[key]  # 100, 1e-5, False, True, 224: transformers' defaults
    (f["hf_minimal"] / "config.json").write_text(json.dumps(cfg))
    (d / "lone").mkdir()
    f["hf_lone"] = d / "lone" / "dinov3.safetensors"  # no config.json: 64-dim heads assumed
    shutil.copy(f["hf"] / "model.safetensors", f["hf_lone"])
    # Residual stream ~0.003 (variance ~1e-5), so LayerNorm's eps visibly matters.
    small = {k: v * 0.003 if k.endswith("gamma") or k.split(".")[0] in ("cls_token", "storage_tokens", "patch_embed")
             else v for k, v in sd.items()}
    f["hf_small"] = d / "hf_small"
    tiny.write_hf(f["hf_small"], state_dict=small)
    f["ckpt"] = d / "svg_autoencoder.ckpt"
    tiny.write_lightning_ckpt(f["ckpt"], state_dict=sd)
    return f


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return {hw: torch.randn(2, 3, *hw, generator=g) for hw in SIZES}


def test_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_vits16plus_matches_the_official_checkpoint_shapes():
    with torch.device("meta"):
        model = DINOv3(DINOv3Config.vits16plus())
        official = tiny.random_official_state_dict(DINOv3Config.vits16plus())
    # Spec: 212 entries, 28,697,472 parameters with mask_token (ours drops mask_token and the 12 bias_masks).
    assert len(official) == 212
    assert sum(t.numel() for k, t in official.items() if k != "rope_embed.periods" and "bias_mask" not in k) \
        == 28_697_472
    assert sum(p.numel() for p in model.parameters()) == 28_697_472 - 384
    ours = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    kept = {k: tuple(t.shape) for k, t in official.items() if k != "mask_token" and "bias_mask" not in k}
    assert ours == kept
    assert ours["blocks.0.mlp.w1.weight"] == (1536, 384) and ours["rope_embed.periods"] == (16,)


def test_config_inferred_from_shapes(files):
    model = load_dinov3(files["pth"])
    assert model.config == DINOv3Config.tiny()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in model.state_dict().values())


@pytest.mark.parametrize("layout", ["hf", "hf_model_layer", "hf_file", "hf_minimal", "hf_lone", "ckpt",
                                    "state_dict"])
def test_layouts_agree_exactly(files, images, layout):
    ref = load_dinov3(files["pth"])
    if layout == "hf_file":
        model = load_dinov3(files["hf"] / "model.safetensors")
    elif layout == "state_dict":  # what the autoencoder loader does with a Lightning checkpoint
        full = torch.load(files["ckpt"], weights_only=True)["state_dict"]
        model = dinov3_from_state_dict({k[8:]: v for k, v in full.items() if k.startswith("encoder.")})
    else:
        model = load_dinov3(files[layout])
    assert model.config == ref.config
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k
    for x in images.values():
        assert torch.equal(model(x), ref(x))


def test_periods_come_from_the_file(files, images, tmp_path):
    model = load_dinov3(files["pth_bf16"])
    assert model.rope_embed.periods.dtype == torch.float32
    assert model.rope_embed.periods.tolist() == OFFICIAL_PERIODS
    # A file whose periods buffer is itself bf16 loads to the same fp32 values.
    sd = tiny.random_official_state_dict(seed=0)
    sd["rope_embed.periods"] = sd["rope_embed.periods"].bfloat16()
    tiny.write_official_pth(tmp_path / "p.pth", state_dict=sd)
    assert torch.equal(load_dinov3(tmp_path / "p.pth").rope_embed.periods, model.rope_embed.periods)
    # The rounding matters a little (the documented ~1e-3 difference between .pth and HF features).
    x = images[(48, 80)]
    diff = (model(x) - load_dinov3(files["pth"])(x)).abs().max().item()
    assert 1e-4 < diff < 5e-2


@pytest.fixture(scope="module")
def hf_models(files):
    from transformers import DINOv3ViTModel  # the oracle (requirements-test.txt); imported here as it is slow

    models = {}
    for name in ["hf", "hf_model_layer", "hf_small"]:
        model, info = DINOv3ViTModel.from_pretrained(files[name], output_loading_info=True)
        assert not any(info[k] for k in ["missing_keys", "unexpected_keys", "mismatched_keys"]), info
        models[name] = model.eval()
    return models


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("name", ["hf", "hf_model_layer", "hf_small"])
def test_parity_with_transformers(files, images, hf_models, hw, name):
    x = images[hw]
    with torch.no_grad():
        expected = hf_models[name](pixel_values=x).last_hidden_state[:, 5:]  # = x_norm_patchtokens
    out = load_dinov3(files[name])(x)
    assert out.shape == (2, hw[0] // 16 * hw[1] // 16, 128)
    assert (out - expected).abs().max().item() <= 1e-5
    assert expected.std() > 0.5  # the features are not trivially small


def test_parity_check_is_sharp(files, images, hf_models):
    """The 1e-5 comparison sees a 0.2% change of the RoPE periods and LayerNorm eps 1e-6 instead of 1e-5."""
    x = images[(48, 80)]
    with torch.no_grad():
        expected = hf_models["hf"](pixel_values=x).last_hidden_state[:, 5:]
        expected_small = hf_models["hf_small"](pixel_values=x).last_hidden_state[:, 5:]
    assert (load_dinov3(files["pth_bf16"])(x) - expected).abs().max().item() > 1e-4
    model = load_dinov3(files["hf_small"])
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
    assert (model(x) - expected_small).abs().max().item() > 1e-4


def test_rope_angles_by_hand(files):
    model = load_dinov3(files["pth_bf16"])
    h, w = 2, 3  # non-square, so swapped axes would show
    sin, cos = model.rope_embed(h, w)
    assert sin.shape == cos.shape == (h * w, 64) and sin.dtype == torch.float32
    # Token n sits at row n // w, column n % w; its centre in (-1, 1) per axis; channels [y16, x16, y16, x16].
    for n in range(h * w):
        y, x = 2 * (n // w + 0.5) / h - 1, 2 * (n % w + 0.5) / w - 1
        for d in range(64):
            k = d % 32
            angle = 2 * math.pi * (y if k < 16 else x) / OFFICIAL_PERIODS[k % 16]
            assert abs(sin[n, d].item() - math.sin(angle)) < 2e-6 and abs(cos[n, d].item() - math.cos(angle)) < 2e-6
    # Two values worked out on paper: token 0 is at (y, x) = (-1/2, -2/3); period 1 gives angles -pi and -4pi/3.
    assert cos[0, 0].item() == pytest.approx(-1, abs=1e-6) and cos[0, 16].item() == pytest.approx(-0.5, abs=1e-6)
    assert sin[0, 48].item() == pytest.approx(math.sqrt(3) / 2, abs=1e-6)  # sin(-4pi/3)


def test_rope_rotates_channel_d_with_d_plus_half():
    g = torch.Generator().manual_seed(0)
    x, angle = torch.randn(3, 8, generator=g), torch.randn(3, 4, generator=g)
    full = angle.tile(2)  # angle[d] for d and d + 4
    out = rope_rotate(x, full.sin(), full.cos())
    for d in range(4):
        a, b, c, s = x[:, d], x[:, d + 4], angle[:, d].cos(), angle[:, d].sin()
        torch.testing.assert_close(out[:, d], a * c - b * s)
        torch.testing.assert_close(out[:, d + 4], b * c + a * s)


def test_k_bias_is_masked(files, tmp_path):
    model, sd = load_dinov3(files["pth"]), files["sd"]
    bias = model.blocks[1].attn.qkv.bias
    assert torch.equal(bias[:128], sd["blocks.1.attn.qkv.bias"][:128])
    assert torch.equal(bias[128:256], torch.zeros(128)) and sd["blocks.1.attn.qkv.bias"][128:256].abs().min() > 0
    assert torch.equal(bias[256:], sd["blocks.1.attn.qkv.bias"][256:])
    bad = dict(sd, **{"blocks.0.attn.qkv.bias_mask": torch.full((384,), math.nan)})
    with pytest.raises(ValueError, match="bias_mask holds NaN"):
        dinov3_from_state_dict(bad)


def test_bf16_close_to_fp32(files, images):
    fp32, bf16 = load_dinov3(files["pth_bf16"]), load_dinov3(files["pth_bf16"], dtype=torch.bfloat16)
    assert bf16.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert bf16.rope_embed.periods.dtype == torch.float32  # RoPE tables stay fp32
    for x in images.values():
        ref, out = fp32(x), bf16(x)
        assert out.dtype == torch.bfloat16 and not torch.equal(out.float(), ref)
        assert (out.float() - ref).abs().max() / ref.std() < 0.1
        assert torch.nn.functional.cosine_similarity(out.float(), ref, dim=-1).min() > 0.999


def test_train_mode_does_not_augment(files, images):
    model = load_dinov3(files["pth"])
    x = images[(64, 64)]
    ref = model(x)
    assert torch.equal(model.train()(x), ref)  # no random RoPE coordinate rescaling, ever


@pytest.mark.parametrize("hw", [(40, 64), (64, 72), (8, 8)])
def test_size_not_multiple_of_16(files, hw):
    model = load_dinov3(files["pth"])
    with pytest.raises(ValueError, match=rf"multiples of 16, got {hw[0]}x{hw[1]}: resize or crop"):
        model(torch.zeros(1, 3, *hw))


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (3, 32, 32)])
def test_wrong_image_shape(files, shape):
    with pytest.raises(ValueError, match="expects images"):
        load_dinov3(files["pth"])(torch.zeros(shape))


class _Opaque:
    pass


def _write_not_dinov3(path, kind):
    t = torch.zeros(4, 4)
    if kind == "other_model":
        torch.save({"conv.weight": t, "fc.bias": torch.zeros(4)}, path)
    elif kind == "other_safetensors":
        save_file({"encoder.weight": t}, str(path))
    elif kind in ("garbage", "garbage_safetensors"):
        path.write_bytes(b"this is not a checkpoint at all" * 10)
    elif kind == "truncated":
        tiny.write_official_pth(path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "python_objects":  # e.g. hyper-parameters pickled as objects: weights_only refuses them
        torch.save({"state_dict": {"encoder.cls_token": t}, "hparams": _Opaque()}, path)
    elif kind == "list":
        torch.save([t, t], path)
    elif kind == "lightning_without_encoder":
        torch.save({"state_dict": {"decoder.conv_in.weight": t}, "epoch": 3}, path)
    elif kind in ("hf_wrong_model_type", "hf_gelu"):
        tiny.write_hf(path)
        cfg = json.loads((path / "config.json").read_text())
        cfg.update({"model_type": "vit"} if kind == "hf_wrong_model_type" else {"hidden_act": "gelu"})
        (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("kind, name, message", [
    ("other_model", "x.pth", "is not a DINOv3 checkpoint: expected keys like 'cls_token'"),
    ("other_safetensors", "x.safetensors", "is not a DINOv3 checkpoint"),
    ("garbage", "x.pth", "cannot read checkpoint: not a torch checkpoint, or corrupt or truncated"),
    ("garbage_safetensors", "x.safetensors", "cannot read checkpoint: not a safetensors file, or corrupt"),
    ("truncated", "x.pth", "cannot read checkpoint: not a torch checkpoint, or corrupt or truncated"),
    ("list", "x.pth", "holds a list, not a state dict"),
    ("python_objects", "x.ckpt", "holds Python objects besides tensors .*_Opaque.*re-save only its weights"),
    ("lightning_without_encoder", "x.ckpt", "Lightning checkpoint without `encoder.\\*` keys"),
    ("hf_wrong_model_type", "hf", "model_type 'vit', expected 'dinov3_vit'"),
    ("hf_gelu", "hf", "hidden_act='gelu'"),
])
def test_not_a_dinov3_checkpoint(tmp_path, kind, name, message):
    path = tmp_path / name
    _write_not_dinov3(path, kind)
    with pytest.raises(ValueError, match=message):
        load_dinov3(path)


class _Payload:
    """Unpickling it calls os.system (a module torch blocks outright, refused in other words)."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["payload", "namespace"])
def test_a_checkpoint_of_python_objects_gets_the_friendly_message_and_never_runs(tmp_path, kind):
    """torch words a refused global differently by version and by cause ("Unsupported global: GLOBAL
    argparse.Namespace", "unsupported GLOBAL posix.system whose module posix is blocked"): both get
    the message that says what to do, and the payload never runs."""
    path, marker = tmp_path / "x.ckpt", tmp_path / "payload-ran"
    hparams = _Payload(marker) if kind == "payload" else argparse.Namespace(lr=1e-4)
    torch.save({"state_dict": {"encoder.cls_token": torch.zeros(1, 1, 4)}, "hparams": hparams}, path)
    name = "posix.system" if kind == "payload" else "argparse.Namespace"
    with pytest.raises(ValueError) as e:
        load_dinov3(path)
    assert str(e.value).startswith(f"{path} holds Python objects besides tensors (torch refused "
                                   f"GLOBAL {name}); if you trust the file, re-save only its weights")
    assert not marker.exists()


@pytest.mark.parametrize("text", [
    "Weights only load failed. ...\n\nUnsupported global: GLOBAL a.B was not an allowed global by default.",
    "Weights only load failed. ...\n\nTrying to load unsupported GLOBAL a.B whose module a is blocked.",
    "Weights only load failed. ...\n\nunsupported global: global a.B"])
def test_refused_global_reads_every_wording(text):
    assert refused_global(RuntimeError(text)) == "GLOBAL a.B"
    assert refused_global(RuntimeError("PytorchStreamReader failed reading zip archive")) is None


def test_missing_file_or_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dinov3(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="folder without model.safetensors"):
        load_dinov3(tmp_path)


def test_key_problems_are_listed_together(files, tmp_path):
    sd = dict(files["sd"])
    del sd["blocks.1.mlp.w2.bias"]
    del sd["blocks.0.attn.qkv.bias_mask"]
    sd["head.weight"] = torch.zeros(10, 128)
    sd["norm.weight"] = torch.ones(129)
    tiny.write_official_pth(tmp_path / "bad.pth", state_dict=sd)
    with pytest.raises(ValueError) as err:
        load_dinov3(tmp_path / "bad.pth")
    msg = str(err.value)
    assert "\n" not in msg
    for part in ["missing:", "blocks.1.mlp.w2.bias", "blocks.0.attn.qkv.bias_mask", "unexpected: head.weight",
                 "wrong shape (file vs model): norm.weight [129] vs [128]"]:
        assert part in msg, (part, msg)


def test_hf_key_problems_are_listed(files, tmp_path):
    hf = tiny.official_to_hf(files["sd"])
    del hf["layer.1.attention.k_proj.weight"]
    hf["layer.0.attention.query.weight"] = torch.zeros(128, 128)  # an old draft's name
    (tmp_path / "hf").mkdir()
    save_file(hf, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(tiny.hf_config_dict(DINOv3Config.tiny())))
    with pytest.raises(ValueError, match=r"missing: layer\.1\.attention\.k_proj\.weight, "
                                         r"blocks\.1\.attn\.qkv\.weight.*unexpected: "
                                         r"layer\.0\.attention\.query\.weight"):
        load_dinov3(tmp_path / "hf")
