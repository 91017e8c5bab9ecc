"""Test helpers (not tests): a tiny Gemma-style sentencepiece tokenizer and a tiny random Gemma-2 checkpoint folder
in the official Hugging Face layout (config.json, model-0000k-of-0000N.safetensors + index, tokenizer.model).

transformers is used here as the independent oracle that writes the checkpoint; it is imported lazily so that
importing this module stays cheap."""

import json
import os
import random

import torch

import gemma2

# Pieces the Gemma tokenizer defines as user-defined symbols (sentencepiece matches them in raw text); Gemma puts
# <mask> at id 4, right after <pad> <eos> <bos> <unk>.
USER_DEFINED = ("<mask>", "<start_of_turn>", "<end_of_turn>")


def caption_corpus(n=400, seed=0):
    """Deterministic caption-like training text: whitespace runs, tabs, digits, accents, CJK, Cyrillic."""
    rng = random.Random(seed)
    words = ("a photo of the cat dog red blue green small large tree house river mountain sky sunset city street "
             "portrait woman man child painting oil watercolor sketch digital art lighting cinematic detailed "
             "beautiful ancient modern futuristic robot flower garden ocean wave cloud night star moon sun "
             "café naïve façade crème brûlée Zürich São Paulo 東京 夜景 猫 犬 красивый кот").split()
    seps = [" ", " ", " ", "  ", "   ", ", ", ". ", "\t", " - "]
    out = []
    for _ in range(n):
        k = rng.randint(3, 14)
        s = "".join(rng.choice(words) + (rng.choice(seps) if i < k - 1 else "") for i in range(k))
        if rng.random() < 0.3:
            s += f" {rng.randint(0, 99999)} px"
        if rng.random() < 0.2:
            s = " " + s
        out.append(s)
    return out


def train_tiny_tokenizer(path_prefix, texts=None, vocab_size=512, **trainer_options):
    """Train a small BPE sentencepiece model with Gemma's settings; returns the .model path.

    Gemma-like: pad 0, eos 1, bos 2, unk 3 (control / unknown), <mask> 4 and the turn markers user-defined, byte
    fallback, digits split, no dummy prefix, whitespace kept as is, identity normalisation. trainer_options
    override any sentencepiece trainer option (e.g. add_dummy_prefix=True to make a non-Gemma file)."""
    import sentencepiece as spm

    path_prefix = str(path_prefix)
    os.makedirs(os.path.dirname(path_prefix) or ".", exist_ok=True)
    texts = caption_corpus() if texts is None else list(texts)
    opts = dict(model_type="bpe", vocab_size=vocab_size, character_coverage=1.0, byte_fallback=True,
                split_digits=True, split_by_unicode_script=True, split_by_number=True, split_by_whitespace=True,
                allow_whitespace_only_pieces=True, treat_whitespace_as_suffix=False, add_dummy_prefix=False,
                remove_extra_whitespaces=False, normalization_rule_name="identity",
                pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                unk_piece="<unk>", user_defined_symbols=list(USER_DEFINED), num_threads=1, minloglevel=2)
    opts.update(trainer_options)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=path_prefix, **opts)
    return path_prefix + ".model"


def hf_tokenizer(model_file, save_dir=None):
    """The transformers GemmaTokenizer for a sentencepiece model, right padding (as SVG-T2I sets it).

    transformers 5 converts a .model file only with protobuf installed; without it we build the same tokenizer
    from transformers' own sentencepiece-only extractor (vocab + merges): Gemma's BPE with byte fallback, the
    `Replace(" ", "▁")` normaliser, BOS added, the user-defined pieces as (non-special) added tokens. If save_dir
    is given, the tokenizer is saved there (tokenizer.json, tokenizer_config.json) and reloaded with AutoTokenizer."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, GemmaTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    vocab, _, merges = SentencePieceExtractor(str(model_file)).extract()
    extra = [AddedToken(t, normalized=False, special=False) for t in USER_DEFINED if t != "<mask>"]  # <mask> is built in
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False,
                         extra_special_tokens=extra)
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
        tok = AutoTokenizer.from_pretrained(str(save_dir))
    tok.padding_side = "right"
    return tok


def hf_config(config, max_position_embeddings=64):
    """transformers Gemma2Config for one of ours (a transformers-5 config.json then spells out every field)."""
    from transformers import Gemma2Config as HFGemma2Config

    return HFGemma2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        query_pre_attn_scalar=config.query_pre_attn_scalar, sliding_window=config.sliding_window,
        rms_norm_eps=config.rms_norm_eps,  # layer_types: transformers derives them (an independent check of ours)
        attn_logit_softcapping=config.attn_logit_softcapping, hidden_activation="gelu_pytorch_tanh",
        final_logit_softcapping=config.final_logit_softcapping,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        max_position_embeddings=max_position_embeddings, initializer_range=0.2, pad_token_id=0, eos_token_id=1,
        bos_token_id=2)


def to_hub_style(config_json):
    """Rewrite a transformers-5 config.json in the spelling of the Hub's google/gemma-2-2b file: top-level
    rope_theta, torch_dtype, hidden_act next to hidden_activation, no layer_types / tie_word_embeddings."""
    with open(config_json) as f:
        d = json.load(f)
    d["rope_theta"] = d.pop("rope_parameters")["rope_theta"]
    d["torch_dtype"] = d.pop("dtype", "float32")
    d["hidden_act"] = d["hidden_activation"]
    for k in ("layer_types", "tie_word_embeddings", "use_bidirectional_attention"):
        d.pop(k, None)
    with open(config_json, "w") as f:
        json.dump(d, f, indent=2)


def write_tiny_gemma_folder(folder, seed=0, config=None, max_shard_size="100KB", hub_style=False, tokenizer=True,
                            post_norm_offset=0.0, max_position_embeddings=64):
    """Write a tiny random Gemma-2 in the official layout with transformers' Gemma2ForCausalLM.save_pretrained.

    Weights: transformers' init with initializer_range 0.2 (attention logits of order 1, so a small soft cap is
    non-linear), plus N(0, 0.3) RMSNorm offsets (their init is zero, which would hide a wrong (1 + w)).
    A small max_shard_size gives several shards + model.safetensors.index.json; keys carry `model.`, no lm_head.
    With tokenizer=True the folder also gets tokenizer.model (trained here, its vocab = config.vocab_size, which
    must then be >= ~400 for the corpus' characters + 256 byte pieces) and the transformers tokenizer files.
    hub_style=True rewrites config.json in the Hub's spelling. layer_types are left to transformers' derivation.
    post_norm_offset is added to the post-norm offsets: ~3 makes each layer's output outweigh the embedding in the
    residual stream, so that greedy decoding with the tied head does not just repeat its last token.
    Returns a dict: folder, config (ours), tokenizer_model (path or None)."""
    from transformers import Gemma2ForCausalLM

    folder = str(folder)
    config = gemma2.Gemma2Config.tiny() if config is None else config
    with torch.random.fork_rng():  # seed transformers' init without touching the caller's RNG
        torch.manual_seed(seed)
        model = Gemma2ForCausalLM(hf_config(config, max_position_embeddings)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (post_norm_offset if ".post_" in name else 0.0))
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if hub_style:
        to_hub_style(os.path.join(folder, "config.json"))
    tok_model = None
    if tokenizer:
        tok_model = train_tiny_tokenizer(os.path.join(folder, "tokenizer"), vocab_size=config.vocab_size)
        os.replace(tok_model, os.path.join(folder, "tokenizer.model"))
        os.remove(os.path.join(folder, "tokenizer.vocab"))
        tok_model = os.path.join(folder, "tokenizer.model")
        hf_tokenizer(tok_model).save_pretrained(folder)
    return {"folder": folder, "config": config, "tokenizer_model": tok_model}
