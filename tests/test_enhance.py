"""The prompt enhancer: Gemma-2's LM head, greedy cached decoding and tokenizer decode against
transformers (the oracle) on tiny random checkpoints in the official Hugging Face layout; the
official instruction and clean-up; SVGT2I.enhance_prompt and sample.py --enhance on the toy."""

import contextlib
import hashlib
import os
import random
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import transformers  # test-only oracle
from PIL import Image

import sample
import svgt2i
import toy
from gemma2 import Gemma2, Gemma2Config, Gemma2Tokenizer, KVCache
from plumbing import enhancer
from plumbing.enhancer import (ENHANCE_SYSTEM_PROMPT, enhance_instruction, enhance_prompt, postprocess_enhanced)
from plumbing.loading import load_gemma2
from svgt2i import SVGT2I, SYSTEM_PROMPTS
from tiny_gemma2 import caption_corpus, write_tiny_gemma_folder

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

CONFIGS = {
    # window 4, attention cap 3.0, and a final cap of 2.0: small enough to be non-linear here
    "w4": Gemma2Config.tiny(final_logit_softcapping=2.0),
    # H = 48, window 8 (a 3-token prompt starts inside it), the real final cap 30.0
    "w8": Gemma2Config.tiny(hidden_size=48, sliding_window=8, final_logit_softcapping=30.0),
}
MODES = ["eager_softcap", "sdpa_nocap"]  # ours: attn_softcap True / False


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random Gemma2ForCausalLM folders saved by transformers (sharded, `model.` keys, no
    lm_head). Post-norm offsets ~3 (see write_tiny_gemma_folder): with the tied head a random
    model otherwise repeats its last token forever, and greedy tests would prove little."""
    root = tmp_path_factory.mktemp("gemma2_lm")
    return {name: write_tiny_gemma_folder(root / name, seed=10 + i, config=cfg,
                                          tokenizer=(name == "w4"), post_norm_offset=3.0,
                                          max_position_embeddings=1024)["folder"]
            for i, (name, cfg) in enumerate(CONFIGS.items())}


def ours(folder, mode, dtype=torch.float32):
    return load_gemma2(folder, dtype=dtype, attn_softcap=(mode == "eager_softcap"))


def hf_lm(folder, mode, dtype=torch.float32):
    """transformers' Gemma2ForCausalLM: eager with the attention cap (transformers 5's default), or
    SDPA without it (4.57's default, SVG-T2I's pin). transformers 5 refuses to select SDPA for
    Gemma 2 (it cannot cap), so the loaded model is switched to it, with the cap set to None."""
    cfg = transformers.Gemma2Config.from_pretrained(folder)
    if mode == "sdpa_nocap":
        cfg.attn_logit_softcapping = None
    model = transformers.Gemma2ForCausalLM.from_pretrained(folder, config=cfg, dtype=dtype,
                                                           attn_implementation="eager")
    if mode == "sdpa_nocap":
        model.config._attn_implementation = "sdpa"
    return model.eval()


def hf_generate(model, ids, mask, n, eos=1, pad=1):
    """transformers' greedy generate, as the official enhancer calls it: (new ids, step logits)."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad, return_dict_in_generate=True,
                             output_logits=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)


def prompt(length, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (1, length), generator=g)
    ids[0, 0] = 2
    return ids


@contextlib.contextmanager
def sdpa_calls():
    """Record every F.scaled_dot_product_attention call: shapes, mask, is_causal, enable_gqa."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((q.shape, k.shape, attn_mask, is_causal, enable_gqa, scale))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, enable_gqa=enable_gqa)

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spy):
        yield calls


def same_calls(ours_calls, ref_calls):
    """Our SDPA calls are transformers 4.57's: the same mask (or None with is_causal / enable_gqa),
    and with a mask, key/value heads repeated. transformers 5 differs in one way, for one query with
    a mask: it folds the query heads into the query axis instead of repeating ("pack_gqa")."""
    assert len(ours_calls) == len(ref_calls) > 0
    for (q, k, m, causal, gqa, scale), (rq, rk, rm, rcausal, rgqa, rscale) in zip(ours_calls,
                                                                                  ref_calls):
        assert (causal, scale) == (rcausal, rscale) and (m is None) == (rm is None)
        if m is None:
            assert (q, k, gqa) == (rq, rk, rgqa) and gqa  # [B, nH, T, d], [B, nKV, S, d]
            continue
        assert torch.equal(m, rm) and not gqa and not rgqa and q[1] == k[1]  # repeated heads
        packed = q[2] == 1 and rq[1] == rk[1] == k[1] // 2 and rq[2] == 2  # 2 = heads per KV head
        assert (q, k) == (rq, rk) or packed, (q, k, rq, rk)


# -------------------------------------------------------------------------------------------------
# LM head


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(folders, name, mode):
    """Right-padded batch, T = 16 > window: every position's logits, fp32."""
    lengths = (16, 11, 5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 512, (3, 16), generator=g)
    mask = (torch.arange(16)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids[:, 0], ids[mask == 0] = 2, 0
    model = ours(folders[name], mode)
    assert model.config.final_logit_softcapping == CONFIGS[name].final_logit_softcapping
    with torch.no_grad():
        a = model.logits(ids, mask)
        b = hf_lm(folders[name], mode)(input_ids=ids, attention_mask=mask).logits
    assert a.shape == b.shape == (3, 16, 512) and a.dtype == b.dtype == torch.float32
    assert torch.equal(a, b), (a - b).abs().max()  # the same ops in the same order


def test_final_logit_softcapping_from_config(folders):
    assert Gemma2Config.from_json({}).final_logit_softcapping == 30.0  # the gemma-2-2b value
    assert Gemma2Config.from_json({"final_logit_softcapping": 30.0}).final_logit_softcapping == 30.0
    assert Gemma2Config.from_json({"final_logit_softcapping": None}).final_logit_softcapping is None
    assert Gemma2Config.from_json(folders["w4"]).final_logit_softcapping == 2.0
    model = ours(folders["w4"], "sdpa_nocap")
    h = torch.randn(5, 64) * 3
    raw = h @ model.embed_tokens.weight.T
    assert torch.allclose(model.lm_head(h), 2.0 * torch.tanh(raw / 2.0), atol=1e-6, rtol=0)
    assert (model.lm_head(h) - raw).abs().max() > 1.0  # the tiny cap is non-linear here
    model.config.final_logit_softcapping = None
    assert torch.equal(model.lm_head(h), F.linear(h, model.embed_tokens.weight))


# -------------------------------------------------------------------------------------------------
# Greedy decoding


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, length", [("w4", 3), ("w4", 12), ("w8", 12)])
def test_generate_matches_transformers(folders, name, length, mode):
    """Token for token, step logits and (SDPA) every attention call, for prompts shorter and longer
    than the window; prompt + new tokens is far longer than it. Nothing stops early."""
    n = 16
    ids = prompt(length, seed=length)
    model, ref = ours(folders[name], mode), hf_lm(folders[name], mode)
    with sdpa_calls() as ours_calls:
        new, logits = model.generate(ids, max_new_tokens=n, eos_token_id=1, return_logits=True)
    with sdpa_calls() as ref_calls:
        ref_new, ref_logits = hf_generate(ref, ids, torch.ones_like(ids), n)
    assert new.shape == (1, n) and new.dtype == torch.long  # no EOS: the test covers all 16 steps
    assert len(set(new[0].tolist())) >= 6, new  # not a degenerate repetition
    assert torch.equal(new, ref_new), (new, ref_new)
    assert logits.shape == ref_logits.shape == (1, n, 512)
    if mode == "eager_softcap":
        assert torch.equal(logits, ref_logits)
    else:  # transformers 5 packs GQA heads for one query (see same_calls): last-bit differences
        assert (logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()
    if mode == "sdpa_nocap":  # same kernels chosen: mask None + is_causal / enable_gqa, or a mask
        same_calls(ours_calls, ref_calls)
        assert any(c[2] is None for c in ours_calls) and any(c[2] is not None for c in ours_calls)
    else:
        assert not ours_calls


@pytest.mark.parametrize("mode", MODES)
def test_generate_bf16_matches_transformers(folders, mode):
    ids = prompt(12, seed=5)
    new, logits = ours(folders["w4"], mode, torch.bfloat16).generate(ids, max_new_tokens=16,
                                                                     return_logits=True)
    ref_new, ref_logits = hf_generate(hf_lm(folders["w4"], mode, torch.bfloat16), ids,
                                      torch.ones_like(ids), 16)
    assert new.shape == (1, 16) and torch.equal(new, ref_new)
    assert torch.equal(logits, ref_logits)  # bf16 logits: the same ops in the same order


@pytest.mark.parametrize("mode", MODES)
def test_generate_stops_at_eos(folders, mode):
    ids = prompt(7, seed=3)
    model, ref = ours(folders["w4"], mode), hf_lm(folders["w4"], mode)
    full = model.generate(ids, max_new_tokens=20)
    assert full.shape == (1, 20) and 1 not in full[0].tolist()
    eos = int(full[0, 6])
    stop = full[0].tolist().index(eos) + 1  # its first occurrence, at step 7 or before
    for eos_ids in (eos, [3, eos]):
        new = model.generate(ids, max_new_tokens=20, eos_token_id=eos_ids)
        assert torch.equal(new, full[:, :stop])  # the EOS itself is returned
        assert torch.equal(new, hf_generate(ref, ids, torch.ones_like(ids), 20, eos=eos_ids)[0])
    assert model.generate(ids, max_new_tokens=0).shape == (1, 0)


@pytest.mark.parametrize("mode", MODES)
def test_generate_left_padded_batch_matches_transformers(folders, mode):
    """Rows of lengths 12, 7, 3, left-padded; one row stops early and is then padded with 0."""
    lengths = (12, 7, 3)
    rows = [prompt(n, seed=20 + n)[0] for n in lengths]
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, 12 - len(r):], mask[b, 12 - len(r):] = r, 1
    model, ref = ours(folders["w8"], mode), hf_lm(folders["w8"], mode)
    alone = [model.generate(r[None], max_new_tokens=16)[0] for r in rows]
    eos = int(alone[1][5])  # row 1 stops at step 6 at the latest; rows 0 and 2 (probably) later
    new = model.generate(ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    ref_new = hf_generate(ref, ids, mask, 16, eos=eos, pad=0)[0]
    assert torch.equal(new, ref_new), (new, ref_new)
    assert new.shape[1] > 6 and (new[1, 6:] == 0).all()
    for b in range(3):  # left padding shifts nothing: each row is its own generation, then pads
        stop = alone[b][:new.shape[1]].tolist()
        stop = stop[:stop.index(eos) + 1] if eos in stop else stop
        assert new[b, :len(stop)].tolist() == stop and (new[b, len(stop):] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_cached_decoding_equals_recomputing(folders, mode):
    """Each step's logits equal a cache-free forward over prompt + tokens so far."""
    ids = prompt(12, seed=7)
    model = ours(folders["w4"], mode)
    new, logits = model.generate(ids, max_new_tokens=12, return_logits=True)
    with torch.no_grad():
        full = model.logits(torch.cat((ids, new[:, :-1]), dim=1))[:, 11:]
    assert new.shape == (1, 12)
    # fp32 round-off only: the cached and full forwards reduce in different orders (threads)
    assert torch.allclose(logits, full, atol=5e-5, rtol=0), (logits - full).abs().max()


def test_the_tiny_models_exercise_window_and_caps(folders):
    """The parity tests could not tell these apart if the tiny models made them no-ops."""
    ids = prompt(12, seed=12)
    model = ours(folders["w4"], "sdpa_nocap")
    new, logits = model.generate(ids, max_new_tokens=12, return_logits=True)
    seq = torch.cat((ids, new[:, :-1]), dim=1)
    nowin = Gemma2(Gemma2Config.tiny(sliding_window=None, final_logit_softcapping=2.0))
    nowin.load_state_dict(model.state_dict())
    capped = ours(folders["w4"], "eager_softcap")
    with torch.no_grad():
        # the window bites while decoding (the last layer's input passes through a sliding one)
        assert (nowin.logits(seq)[:, 11:] - logits).abs().max() > 0.1
        assert (capped.logits(seq)[:, 11:] - logits).abs().max() > 0.1  # attention cap
        h = model.encode(seq, layer=-1)
        raw = F.linear(h, model.embed_tokens.weight)
        assert (raw.argmax(-1) == model.lm_head(h).argmax(-1)).all()  # monotonic: same greedy picks
        assert (raw - model.lm_head(h)).abs().max() > 1.0  # but a non-linear final cap


def test_kv_cache_keeps_the_window():
    sliding, full = KVCache(window=4), KVCache()
    k = torch.arange(6.0).view(1, 1, 6, 1).expand(2, 3, 6, 5)
    for c in (sliding, full):
        kk, vv = c.update(k, k + 100)
        assert torch.equal(kk, k) and torch.equal(vv, k + 100)  # a prefill sees all its keys
    assert sliding.k[0, 0, :, 0].tolist() == [3.0, 4.0, 5.0] and full.k.shape[2] == 6
    kk, _ = sliding.update(k[:, :, :1] + 6, k[:, :, :1] + 106)  # position 6 sees 3, 4, 5, 6
    assert kk[0, 0, :, 0].tolist() == [3.0, 4.0, 5.0, 6.0]
    assert sliding.k[0, 0, :, 0].tolist() == [4.0, 5.0, 6.0]
    assert sliding.v[0, 0, :, 0].tolist() == [104.0, 105.0, 106.0]


def test_generate_errors(folders):
    model = ours(folders["w4"], "sdpa_nocap")
    ids = prompt(6)
    right = torch.tensor([[1, 1, 1, 1, 0, 0]])
    hole = torch.tensor([[0, 1, 1, 0, 1, 1]])
    for mask in (right, hole):
        with pytest.raises(ValueError, match="left-padded"):
            model.generate(ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must lie"):
        model.generate(ids + 600, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must be"):
        model.generate(ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.generate(ids, right[:, :3], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=-1)


# -------------------------------------------------------------------------------------------------
# Tokenizer decode


@pytest.fixture(scope="module")
def tokenizers(folders):
    """Ours, and transformers' Gemma tokenizer for the same model marking what google/gemma-2-2b
    marks special: <pad> <eos> <bos> <unk> and the turn markers (not <mask>)."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    model_file = os.path.join(folders["w4"], "tokenizer.model")
    vocab, _, merges = SentencePieceExtractor(model_file).extract()
    turns = [AddedToken(t, normalized=False, special=True)
             for t in ("<start_of_turn>", "<end_of_turn>")]
    hf = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False,
                        extra_special_tokens=turns, mask_token=None)
    return Gemma2Tokenizer(model_file), hf


ROUND_TRIP = ["", " ", "  a", "a  b   c ", "\t\n\n x", "A photo of a cat.", "Zürich café, crème",
              "東京の夜景", "emoji 🐱🚀 by bytes", "digits 1234567890", "<mask> token",
              "line\nbreaks\n\nhere"] + caption_corpus(40, seed=4)


def test_decode_round_trips(tokenizers):
    tok, hf = tokenizers
    for text in ROUND_TRIP:
        ids = tok.encode(text)
        assert tok.decode(ids) == text == hf.decode(ids, skip_special_tokens=True), text
        assert tok.decode(torch.tensor([2] + ids + [1])) == text  # BOS / EOS dropped


def test_decode_matches_transformers(tokenizers):
    """Random ids: specials, byte pieces in valid and invalid runs, normal pieces."""
    tok, hf = tokenizers
    rng = random.Random(0)
    byte = [i for i in range(tok.vocab_size) if tok.sp.id_to_piece(i).startswith("<0x")]
    invalid = 0
    for _ in range(400):
        ids = [rng.choice(byte) if rng.random() < 0.4 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(0, 14))]
        for skip in (True, False):
            assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), ids
        invalid += "\ufffd" in tok.decode(ids)
    assert invalid > 50  # the replacement rule was exercised


def test_decode_rules(tokenizers):
    tok, _ = tokenizers
    sp = tok.sp
    turn, mask = sp.piece_to_id("<start_of_turn>"), sp.piece_to_id("<mask>")
    a, space_of = sp.piece_to_id("a"), sp.piece_to_id("\u2581of")
    bx = {b: sp.piece_to_id(f"<0x{b:02X}>") for b in (0x41, 0xC3, 0xA9, 0xE6)}
    assert tok.decode([2, a, turn, 0, 3, 1]) == "a"  # every special dropped
    assert tok.decode([2, a, turn, 1], skip_special_tokens=False) == "<bos>a<start_of_turn><eos>"
    assert tok.decode([mask, space_of]) == "<mask> of"  # not special: kept; no prefix stripped
    assert tok.decode([bx[0xC3], bx[0xA9], bx[0x41]]) == "éA"  # a valid run of bytes
    assert tok.decode([bx[0x41], bx[0xE6], a, bx[0xA9]]) == "\ufffd\ufffda\ufffd"  # invalid runs
    with pytest.raises(ValueError, match="token ids"):
        tok.decode([tok.vocab_size])


# -------------------------------------------------------------------------------------------------
# The enhancer: text, clean-up, end to end


def test_instruction_and_system_prompts_are_the_official_text():
    # sha256 of instruction("") computed from the official sample_svg_t2i.py (l.36-53) by evaluating
    # its f-string with prompt = "", so any drift in the quoted instruction fails here
    digest = hashlib.sha256(enhance_instruction("").encode()).hexdigest()
    assert digest == "3c4f30e8cf58d92a188bf83ceb948e02897dacb9cdffad939e61e02d8207c2a6"
    text = enhance_instruction("two {red} cats")
    assert text.startswith("You are an assistant that rewrites image generation prompts.\n")
    assert text.endswith("\n\nUser prompt: two {red} cats\nEnhanced description:")
    assert text.count("\n") == 15
    assert SYSTEM_PROMPTS["align"] == (
        "You are an assistant designed to generate high-quality images with the highest degree of "
        "image-text alignment based on textual prompts. <Prompt Start> ")
    assert SYSTEM_PROMPTS["base"] == (
        "You are an assistant designed to generate high-quality images based on user prompts. "
        "<Prompt Start> ")


LONG = "word " * 60  # 300 characters
POSTPROCESS = [  # (decoded new text, expected); the original prompt is "ORIG"
    (" A red cat on a mat.", "A red cat on a mat."),
    ("", "ORIG"),
    ("  \n\t ", "ORIG"),
    ("\n\n  First line. \nSecond line", "First line."),
    ("one\r\ntwo", "one"),
    ("one\rtwo", "one\rtwo"),  # no "\n": no line split at all
    ("a\rb\nc", "a"),  # with a "\n", any line break separates
    ("Enhanced description: a cat", "a cat"),
    ("Enhanced: a cat", "a cat"),
    ("The PROMPT: a cat", "a cat"),
    ("Style: watercolor", "Style: watercolor"),  # not a label word
    ("A cat: fluffy, description: nice", "A cat: fluffy, description: nice"),
    ("x" * 40 + " prompt: late colon", "x" * 40 + " prompt: late colon"),  # colon after char 40
    ("Description:", "ORIG"),  # label, nothing after it
    ("Prompt: a, b: c", "a, b: c"),  # cut at the first colon only
    ("a, b, a, c, B, d, e", "a, b, c, d"),  # case-insensitive repeats dropped, first 4 kept
    ("a,,  ,b ,  c", "a, b, c"),
    (", , ,", ", , ,"),  # no clause at all: left as it was
    ("A Cat, a cat, a dog", "A Cat, a dog"),  # the first spelling wins
    (LONG, ("word " * 51).strip()),  # 256 characters, then back to the last space
    ("x" * 300, "x" * 256),  # no space: a hard cut
    (" " + "y" * 255 + " z", "y" * 255),  # stripped first: 257 characters, cut at the space
    ("Enhanced description:\nA boat, a boat, sea", "ORIG"),  # first line first: only a label
]


@pytest.mark.parametrize("decoded, expected", POSTPROCESS)
def test_postprocess(decoded, expected):
    assert postprocess_enhanced(decoded, "ORIG") == expected


def test_enhance_prompt_matches_the_transformers_pipeline(folders, tokenizers):
    """The official steps with transformers (its tokenizer call, generate, decode) and our clean-up,
    against enhance_prompt on our model: the default SDPA path, 196 new tokens at most."""
    tok, hf_tok = tokenizers
    text = "two red cats on a blue sofa, watercolor"
    ids = hf_tok(enhance_instruction(text), return_tensors="pt")
    assert ids["input_ids"][0].tolist() == [2] + tok.encode(enhance_instruction(text))
    model = ours(folders["w4"], "sdpa_nocap")
    got = enhance_prompt(tok, model, text)
    new, _ = hf_generate(hf_lm(folders["w4"], "sdpa_nocap"), ids["input_ids"],
                         ids["attention_mask"], 196)
    raw = hf_tok.decode(new[0], skip_special_tokens=True)
    assert raw.strip() and new.shape[1] > 20  # the clean-up gets real text to work on
    assert got == postprocess_enhanced(raw, text)


def test_pipeline_enhance_prompt(folders, tokenizers):
    """SVGT2I.enhance_prompt runs the pipeline's own Gemma (the toy DiT takes 64-wide captions,
    as w4's are); a list gives a list."""
    tok, model = tokenizers[0], ours(folders["w4"], "sdpa_nocap")
    pipe = SVGT2I.from_pretrained(toy.BUNDLE, folders["w4"], dtype=torch.float32)
    texts = ["two red cats", "a dog"]
    want = [enhance_prompt(tok, model, t, max_new_tokens=12) for t in texts]
    assert pipe.enhance_prompt(texts, max_new_tokens=12) == want
    assert pipe.enhance_prompt(texts[1], max_new_tokens=12) == want[1] != texts[1]


def test_cli_enhance_prints_conditions_and_records(folders, tmp_path, capsys, monkeypatch):
    """sample.py --enhance: the rewrite is printed, stored next to the original, and the image is
    the one conditioned on the "align" system prompt + the rewrite (12 new tokens, for time)."""
    monkeypatch.setattr(enhancer, "ENHANCE_MAX_NEW_TOKENS", 12)
    text, out = "two red circles on the left", str(tmp_path / "e.png")
    sample.main(["--toy", "--gemma", folders["w4"], "--enhance", "--prompt", text, "--steps", "3",
                 "--seed", "4", "--device", "cpu", "--out", out])
    pipe = SVGT2I.from_pretrained(toy.BUNDLE, folders["w4"], dtype=torch.float32)
    rewritten = pipe.enhance_prompt(text)
    assert rewritten != text and ENHANCE_SYSTEM_PROMPT == "align"
    assert f"enhanced prompt: {text!r} -> {rewritten!r}" in capsys.readouterr().err
    image = Image.open(out)
    assert image.text["prompt"] == text and image.text["enhanced_prompt"] == rewritten
    assert image.text["system_prompt"] == "align"
    want = pipe.generate([rewritten], height=64, width=64, seed=4, steps=3, cfg=4.0, shift=2.0,
                         system_prompt="align")[0]
    assert list(image.convert("RGB").getdata()) == list(want.getdata())


def test_cli_enhance_without_gemma_is_one_line(tmp_path, capsys):
    """A checkpoint folder with the DiT, autoencoder and statistics but no text encoder."""
    for name in ("ema.safetensors", "autoencoder.safetensors", "latent_stats.pt", "run.json"):
        os.symlink(os.path.join(toy.BUNDLE, name), tmp_path / name)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path), "--enhance", "--prompt", "a cat", "--out",
                     str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no gemma weights found" in err
    assert len(err.strip().splitlines()) == 1
