"""Gemma-2 text encoder, loader and tokenizer against transformers (the oracle), on tiny random checkpoints written
in the official Hugging Face layout."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # test-only oracle (requirements-test.txt)
from safetensors.torch import load_file, save_file

import gemma2
from gemma2 import Gemma2, Gemma2Config, Gemma2Tokenizer
from plumbing.loading import load_gemma2
from tiny_gemma2 import caption_corpus, hf_tokenizer, train_tiny_tokenizer, write_tiny_gemma_folder

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

CONFIGS = {
    "tiny": Gemma2Config.tiny(),
    # H = 48: sqrt(48) is not representable, so the embedding scale is rounded to bf16 before the multiply.
    # Its folder has the Hub's config.json spelling (no layer_types: both sides derive them).
    "h48": Gemma2Config.tiny(hidden_size=48, vocab_size=300),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma2")
    return {name: write_tiny_gemma_folder(root / name, seed=i, config=cfg, hub_style=(name == "h48"),
                                          tokenizer=(name == "tiny"))["folder"]
            for i, (name, cfg) in enumerate(CONFIGS.items())}


def batch(vocab_size, lengths=(16, 11, 5), seed=0):
    """A right-padded batch of unequal lengths: BOS first, random ids, pad 0. T = 16 > sliding window 4."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(4, vocab_size, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids[:, 0] = 2
    ids[mask == 0] = 0
    return ids, mask


def hf_model(folder, dtype, mode):
    """transformers' Gemma-2 base model: "eager_softcap" (transformers 5's default), "eager_nocap" (the same with
    attn_logit_softcapping=None), or "sdpa_nocap": transformers 4.57's default path that the SVG-T2I DiT was
    trained on. transformers 5 refuses to *select* sdpa for Gemma 2 (it cannot cap), so we switch the loaded
    model's config to it; with the cap set to None its sdpa integration runs as in 4.57."""
    cfg = transformers.Gemma2Config.from_pretrained(folder)
    if mode != "eager_softcap":
        cfg.attn_logit_softcapping = None
    model = transformers.AutoModel.from_pretrained(folder, config=cfg, dtype=dtype, attn_implementation="eager")
    if mode == "sdpa_nocap":
        model.config._attn_implementation = "sdpa"
    return model.eval()


def hf_hidden_states(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


def window_sees_real_key(mask, window):
    """[B, T] bool: positions whose sliding window holds at least one real (unpadded) key."""
    T = mask.shape[1]
    pos = torch.arange(T)
    in_window = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)  # [q, kv]
    return (in_window[None] & mask.bool()[:, None, :]).any(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Forward parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_softcap_on_is_bit_identical_to_transformers_eager(folders, name, dtype):
    ours = load_gemma2(folders[name], dtype=dtype, attn_softcap=True)
    ids, mask = batch(CONFIGS[name].vocab_size)
    with torch.no_grad():
        hs = ours.hidden_states(ids, mask)
    ref = hf_hidden_states(hf_model(folders[name], dtype, "eager_softcap"), ids, mask)
    assert len(hs) == len(ref) == CONFIGS[name].num_hidden_layers + 1
    for k, (a, b) in enumerate(zip(hs, ref)):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        assert torch.equal(a, b), f"hidden_states[{k}] max diff {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths, dropped", [((16, 11, 5), (False, False)), ((16, 16), (True, False)),
                                              ((3, 3), (True, True))], ids=["padded", "unpadded", "unpadded_short"])
def test_softcap_off_is_bit_identical_to_transformers_sdpa(folders, dtype, lengths, dropped):
    """The default path: what transformers 4.57 (SDPA, cap dropped) computed for the DiT's training features.
    Unpadded batches take the mask=None / is_causal / enable_gqa call; "unpadded_short" (T < window) also for the
    sliding layers."""
    ours = load_gemma2(folders["tiny"], dtype=dtype)
    assert ours.config.attn_softcap is False  # off by default
    ids, mask = batch(CONFIGS["tiny"].vocab_size, lengths)
    # transformers drops the mask (is_causal=True, enable_gqa: another kernel on GPU) exactly when nothing is
    # padded, and for sliding layers only if T < window; CPU results agree either way, so check the rule itself
    full, sliding = ours._masks(mask, mask.shape[1])
    assert (full is None, sliding is None) == dropped
    with torch.no_grad():
        hs = ours.hidden_states(ids, mask)
    sdpa = hf_model(folders["tiny"], dtype, "sdpa_nocap")
    ref = hf_hidden_states(sdpa, ids, mask)
    assert len(hs) == len(ref)
    for k, (a, b) in enumerate(zip(hs, ref)):
        assert torch.equal(a, b), f"hidden_states[{k}] max diff {(a.float() - b.float()).abs().max()}"
    if dtype == torch.bfloat16:  # the oracle really ran SDPA: eager rounds logits/probabilities to bf16, SDPA not
        eager = hf_hidden_states(hf_model(folders["tiny"], dtype, "eager_nocap"), ids, mask)
        assert not torch.equal(ref[-2], eager[-2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_softcap_off_matches_transformers_eager_without_cap(folders, name, dtype):
    """Against transformers eager with attn_logit_softcapping=None, every hidden state, at every position whose
    sliding window holds a real key. Not bit-identical in bf16 by design: eager rounds logits and probabilities to
    bf16, SDPA keeps them in fp32. Excluded positions: padded queries whose window holds only padding (only when
    T > window, i.e. T > 4096 for the real model); eager spreads them uniformly over all keys, SDPA returns 0."""
    ours = load_gemma2(folders[name], dtype=dtype)
    ids, mask = batch(CONFIGS[name].vocab_size)
    with torch.no_grad():
        hs = ours.hidden_states(ids, mask)
    ref = hf_hidden_states(hf_model(folders[name], dtype, "eager_nocap"), ids, mask)
    keep = window_sees_real_key(mask, CONFIGS[name].sliding_window)
    assert keep.all(-1)[0] and not keep.all()  # both kinds of positions exist in this batch
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # times the largest activation
    assert len(hs) == len(ref)
    for k, (a, b) in enumerate(zip(hs, ref)):
        a, b = a[keep].float(), b[keep].float()
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= tol * scale, f"hidden_states[{k}]: max diff {err} vs largest activation {scale}"


def test_the_tiny_config_exercises_cap_window_and_padding(folders):
    """The parity tests could not tell these apart if the tiny model made them no-ops."""
    ids, mask = batch(CONFIGS["tiny"].vocab_size)
    real = mask.bool()
    off = load_gemma2(folders["tiny"], dtype=torch.float32)
    on = load_gemma2(folders["tiny"], dtype=torch.float32, attn_softcap=True)
    with torch.no_grad():
        base = off.encode(ids, mask)
        assert (base - on.encode(ids, mask))[real].abs().max() > 0.1  # the cap is non-linear here
        nowin = Gemma2(Gemma2Config.tiny(sliding_window=None))
        nowin.load_state_dict(off.state_dict())
        assert (base - nowin.encode(ids, mask))[real].abs().max() > 0.1  # the window bites
        unmasked = off.encode(ids, torch.ones_like(mask))
        # causality hides right padding from real tokens; the mask shows in the padded positions' outputs
        assert torch.allclose(base[real], unmasked[real], atol=1e-5, rtol=0)
        assert (base - unmasked)[~real].abs().max() > 0.1
        # right padding does not change the real tokens' features
        alone = off.encode(ids[2:, :5], mask[2:, :5])
        assert torch.allclose(alone[0], base[2, :5], atol=1e-5, rtol=0)


def test_hidden_states_layout_and_early_stop(folders):
    model = load_gemma2(folders["tiny"], dtype=torch.float32)
    L = model.config.num_hidden_layers
    ids, mask = batch(CONFIGS["tiny"].vocab_size)
    calls = []
    hook = model.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        full = model.hidden_states(ids, mask)
        assert len(calls) == 1 and len(full) == L + 1
        for n in range(L):
            part = model.hidden_states(ids, mask, num_layers=n)
            assert len(part) == n + 1 and all(torch.equal(a, b) for a, b in zip(part, full))
        enc = model.encode(ids, mask)  # layer=-2: SVG-T2I's feature
        assert torch.equal(enc, full[-2]) and torch.equal(model(ids, mask), enc)
        assert len(calls) == 1  # neither num_layers < L nor encode(layer=-2) ran the last layer
        for layer in (0, 1, -1, -L - 1, L):
            assert torch.equal(model.encode(ids, mask, layer=layer), full[layer])
        hook.remove()
        # entry 0 is the scaled embedding; the last entry is the final norm of the last layer's raw output
        assert torch.equal(full[0], model.embed_tokens.weight[ids] * 8.0)  # sqrt(64)
        cos, sin = gemma2.rope_cos_sin(16, model.config, "cpu", torch.float32)
        full_mask = model._masks(mask, 16)[0]  # the last layer is a full-attention one
        assert torch.equal(full[-1], model.norm(model.layers[-1](full[-2], cos, sin, full_mask)))
    with pytest.raises(ValueError, match="layer"):
        model.encode(ids, mask, layer=L + 1)
    with pytest.raises(ValueError, match="num_layers"):
        model.hidden_states(ids, mask, num_layers=L + 1)
    with pytest.raises(ValueError, match="input_ids must lie"):
        model.encode(ids + 1000, mask)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.encode(ids, mask[:, :8])


# ---------------------------------------------------------------------------------------------------------------------
# Config and loader


def test_gemma2_2b_on_meta_device():
    cfg = Gemma2Config.gemma2_2b()
    with torch.device("meta"):
        model = Gemma2(cfg)
    assert sum(p.numel() for p in model.parameters()) == 2_614_341_888
    sd = model.state_dict()
    assert len(sd) == 288 and all(t.is_meta for t in sd.values())
    assert sd["layers.0.self_attn.q_proj.weight"].shape == (2048, 2304)
    assert sd["layers.0.self_attn.k_proj.weight"].shape == (1024, 2304)
    assert sd["layers.25.self_attn.o_proj.weight"].shape == (2304, 2048)
    assert sd["layers.3.mlp.down_proj.weight"].shape == (2304, 9216)
    assert cfg.layer_types[24] == "sliding_attention" and cfg.layer_types[25] == "full_attention"
    assert cfg.query_pre_attn_scalar ** -0.5 == 1 / 16 and cfg.attn_softcap is False


def test_config_from_json_spellings(folders, tmp_path):
    v5 = json.loads(Path(folders["tiny"], "config.json").read_text())
    assert "rope_parameters" in v5 and "dtype" in v5 and "layer_types" in v5
    cfg = Gemma2Config.from_json(folders["tiny"])
    assert cfg == CONFIGS["tiny"]
    hub = write_tiny_gemma_folder(tmp_path / "hub", hub_style=True, tokenizer=False)["folder"]
    hub_json = json.loads(Path(hub, "config.json").read_text())
    assert "rope_theta" in hub_json and "torch_dtype" in hub_json and "layer_types" not in hub_json
    assert Gemma2Config.from_json(os.path.join(hub, "config.json")) == cfg
    assert Gemma2Config.from_json(dict(hub_json, rope_theta=500.0)).rope_theta == 500.0
    assert Gemma2Config.from_json(v5, attn_softcap=True).attn_softcap is True
    assert Gemma2Config.from_json({}) == Gemma2Config.gemma2_2b()  # missing fields: the 2b values
    for bad, match in [({"model_type": "gemma3"}, "model_type"), ({"hidden_activation": "gelu"}, "hidden_activation"),
                       ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "RoPE"),
                       ({"num_hidden_layers": 3, "layer_types": ["full_attention"]}, "layer_types")]:
        with pytest.raises(ValueError, match=match):
            Gemma2Config.from_json(bad)


def _copy_without_weights(folder, dst):
    os.makedirs(dst)
    shutil.copy(os.path.join(folder, "config.json"), dst)
    return str(dst)


def _all_tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def test_loader_layouts(folders, tmp_path):
    folder = folders["tiny"]
    names = os.listdir(folder)
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 2
    raw = _all_tensors(folder)
    assert all(k.startswith("model.") for k in raw) and "lm_head.weight" not in raw
    assert all(t.dtype == torch.float32 for t in raw.values())

    sharded = load_gemma2(folder)  # bf16 by default, fp32 on disk
    sd = sharded.state_dict()
    assert all(t.dtype == torch.bfloat16 and not t.is_meta for t in sd.values())
    assert all(torch.equal(sd[k[len("model."):]], t.to(torch.bfloat16)) for k, t in raw.items())
    assert not sharded.training and not any(p.requires_grad for p in sharded.parameters())

    # one model.safetensors, un-prefixed keys (Gemma2Model.save_pretrained), plus an lm_head to ignore
    single = _copy_without_weights(folder, tmp_path / "single")
    flat = {k[len("model."):]: t for k, t in raw.items()}
    save_file(dict(flat, **{"lm_head.weight": raw["model.embed_tokens.weight"].clone()}),
              os.path.join(single, "model.safetensors"))
    loaded = load_gemma2(single, dtype=torch.float32)
    assert all(torch.equal(loaded.state_dict()[k], t) for k, t in flat.items())


def test_loader_errors(folders, tmp_path):
    folder = folders["tiny"]
    raw = _all_tensors(folder)

    def broken(name, tensors):
        d = _copy_without_weights(folder, tmp_path / name)
        save_file(tensors, os.path.join(d, "model.safetensors"))
        return d

    cases = [
        (broken("missing", {k: v for k, v in raw.items() if k != "model.layers.1.mlp.up_proj.weight"}),
         ValueError, "layers.1.mlp.up_proj.weight"),
        (broken("unexpected", dict(raw, **{"model.layers.9.foo.weight": torch.zeros(2)})),
         ValueError, "model.layers.9.foo.weight"),
        (broken("shape", dict(raw, **{"model.norm.weight": torch.zeros(63)})), ValueError, r"model.norm.weight \[63\]"),
        (str(tmp_path / "nowhere"), FileNotFoundError, "not found"),
        (_copy_without_weights(folder, tmp_path / "noweights"), FileNotFoundError, "model.safetensors"),
    ]
    corrupt = _copy_without_weights(folder, tmp_path / "corrupt")
    Path(corrupt, "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    cases.append((corrupt, ValueError, "cannot read"))
    noshard = str(tmp_path / "noshard")
    shutil.copytree(folder, noshard)
    victim = sorted(n for n in os.listdir(noshard) if n.startswith("model-"))[1]
    os.remove(os.path.join(noshard, victim))
    cases.append((noshard, FileNotFoundError, victim))
    misindexed = str(tmp_path / "misindexed")
    shutil.copytree(folder, misindexed)
    index_file = Path(misindexed, "model.safetensors.index.json")
    index = json.loads(index_file.read_text())
    wm = index["weight_map"]
    wm["model.norm.weight"] = next(f for f in sorted(set(wm.values())) if f != wm["model.norm.weight"])
    index_file.write_text(json.dumps(index))
    cases.append((misindexed, ValueError, r"absent: \['model.norm.weight'\]"))
    noconfig = str(tmp_path / "noconfig")
    shutil.copytree(folder, noconfig)
    os.remove(os.path.join(noconfig, "config.json"))
    cases.append((noconfig, FileNotFoundError, "config.json"))
    for path, exc, match in cases:
        with pytest.raises(exc, match=match) as e:
            load_gemma2(path)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer

EDGE_TEXTS = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", " \t \n ", "a", " a", "a ", "a  b", "a   b", "a    b  ", "  leading",
    "trailing   ", "A photo of a cat.", "Zürich café, crème brûlée", "東京の夜景", "красивый кот", "emoji 🐱🚀 by bytes",
    "digits 1234567890 and 3.14", "tab\tseparated\t\tvalues", "line\nbreaks\n\nhere",
    "<start_of_turn>user\nhi<end_of_turn>", "<mask> token <mask>", "<bos>", "<eos>", "<pad>", "<unk>",
    "a <bos> b<eos>c<pad>d<unk>e", "<<bos>>", "<bos", "bos>", "<BOS>", " <bos> ", "<eos><eos>",
    "a watercolor painting of a mountain river at sunset, cinematic lighting, highly detailed " * 12,  # truncated
]


@pytest.fixture(scope="module")
def tokenizers(folders, tmp_path_factory):
    model_file = os.path.join(folders["tiny"], "tokenizer.model")
    return Gemma2Tokenizer(model_file), hf_tokenizer(model_file, tmp_path_factory.mktemp("hf_tok"))


@pytest.mark.parametrize("max_length", [8, 16, 64, 512])
def test_tokenizer_matches_transformers(tokenizers, max_length):
    ours, hf = tokenizers
    texts = EDGE_TEXTS + caption_corpus(60, seed=1)
    for group in [texts] + [[t] for t in EDGE_TEXTS]:  # one big batch, and each text alone (no extra padding)
        ids, mask = ours(group, max_length=max_length)
        ref = hf(group, padding=True, pad_to_multiple_of=8, max_length=max_length, truncation=True,
                 return_tensors="pt")
        assert ids.dtype == mask.dtype == torch.long
        assert torch.equal(ids, ref["input_ids"]), group
        assert torch.equal(mask, ref["attention_mask"]), group
        assert ids.shape[1] % 8 == 0 and ids.shape[1] <= max_length and (ids[:, 0] == 2).all()


def test_tokenizer_edge_cases(tokenizers):
    ours, _ = tokenizers
    ids, mask = ours([""])
    assert ids.tolist() == [[2, 0, 0, 0, 0, 0, 0, 0]] and mask.tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]
    ids, _ = ours(["a <bos> b<eos><pad><unk>"])
    assert [2, 1, 0, 3] == [i for i in ids[0, 2:].tolist() if i in (0, 1, 2, 3)][:4]
    ids, mask = ours([EDGE_TEXTS[-1]], max_length=16)  # truncation counts BOS and appends nothing
    assert ids.shape == (1, 16) and mask.all() and ids[0, 0] == 2 and 1 not in ids[0].tolist()
    assert ours.encode("a  b") != ours.encode("a b")  # whitespace runs are kept


def test_tokenizer_feeds_the_model(folders, tokenizers):
    ours, _ = tokenizers
    model = load_gemma2(folders["tiny"], dtype=torch.float32)
    ids, mask = ours(["a cat", "a photo of a dog on a mountain river at sunset"])
    feats = model.encode(ids, mask)
    assert feats.shape == (2, ids.shape[1], 64) and torch.isfinite(feats).all()


def test_tokenizer_errors(tokenizers, tmp_path):
    ours, _ = tokenizers
    for bad in [12, 0, 7, 8.0, True]:
        with pytest.raises(ValueError, match="multiple of 8"):
            ours(["a"], max_length=bad)
    for bad in [[], [1, 2], None]:
        with pytest.raises(ValueError, match="list of strings"):
            ours(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        Gemma2Tokenizer(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Gemma2Tokenizer(garbage)
    wrong_ids = train_tiny_tokenizer(tmp_path / "ids", vocab_size=400, unk_id=0, pad_id=3)
    with pytest.raises(ValueError, match="ids 0-3"):
        Gemma2Tokenizer(wrong_ids)
    prefix = train_tiny_tokenizer(tmp_path / "prefix", vocab_size=400, add_dummy_prefix=True)
    with pytest.raises(ValueError, match="dummy prefix"):
        Gemma2Tokenizer(prefix)
