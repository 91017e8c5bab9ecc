"""
Tiny random frozen parts, written in the official layouts so that every loader and code path is the
real one: a DINOv3 `.pth`, an autoencoder (`encoder.*` + `decoder.*`) and a Gemma-2 Hugging Face
folder with a sentencepiece tokenizer trained on the captions. For train.py --model tiny, the toy
(toy.py) and the tests; random weights stand in for the pretrained ones.

You need not read this to learn SVG-T2I.
"""

import io
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from decoder import Decoder, DecoderConfig
from dinov3 import DINOv3, DINOv3Config, dinov3_official_state_dict
from gemma2 import Gemma2, Gemma2Config


def gemma2_hub_config(c):
    """A Gemma2Config as the Hub's config.json spells it."""
    return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "query_pre_attn_scalar": c.query_pre_attn_scalar, "sliding_window": c.sliding_window,
            "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
            "attn_logit_softcapping": c.attn_logit_softcapping,
            "final_logit_softcapping": c.final_logit_softcapping,
            "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "torch_dtype": "float32"}


def save_gemma2_folder(model, folder, tokenizer_file=None):
    """A Hugging Face style folder: config.json (Hub spelling), model.safetensors (`model.` keys)
    and tokenizer.model, which plumbing.loading.load_gemma2 and Gemma2Tokenizer read."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(gemma2_hub_config(model.config), f, indent=2)
    save_file({"model." + k: v.detach().float().contiguous()
               for k, v in model.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, os.path.join(folder, "tokenizer.model"))
    return folder


def train_tokenizer(texts, model_prefix, vocab_size=512):
    """Train a small sentencepiece BPE model with Gemma's conventions (the tiny and toy text
    encoders): <pad> 0, <eos> 1, <bos> 2, <unk> 3, byte fallback, digits split, no dummy prefix,
    whitespace kept. Writes and returns MODEL_PREFIX.model. The model is trained in memory, so it
    records no file name (sentencepiece would keep the path it was written to in its spec)."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
        split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", num_threads=1, minloglevel=2)
    with open(model_prefix + ".model", "wb") as f:
        f.write(buf.getvalue())
    return model_prefix + ".model"


def make_tiny_frozen(folder, texts, seed=0, dinov3_config=None, decoder_config=None,
                     gemma_config=None):
    """Write tiny random frozen parts into `folder`: a DINOv3 (`dinov3.pth`, original layout), an
    autoencoder (`autoencoder.safetensors`: `encoder.*` DINOv3 + `decoder.*`, random decoder) and a
    Gemma-2 folder (`text_encoder/`) with a sentencepiece tokenizer trained on `texts`. Random
    weights stand in for the pretrained ones: the point is that every loader and code path is the
    real one. Returns their paths."""
    import sentencepiece as spm

    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    dcfg = dinov3_config or DINOv3Config(dim=64, depth=2, n_heads=1, ffn_dim=128)
    dino_sd = dinov3_official_state_dict(DINOv3(dcfg))
    torch.save(dino_sd, os.path.join(folder, "dinov3.pth"))
    decoder = Decoder(decoder_config or DecoderConfig.tiny(z_channels=dcfg.dim))
    ae_sd = {**{"encoder." + k: v for k, v in dino_sd.items()},
             **{"decoder." + k: v.detach() for k, v in decoder.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in ae_sd.items()},
              os.path.join(folder, "autoencoder.safetensors"))
    tok = train_tokenizer(texts, os.path.join(folder, "tokenizer"))
    vocab = spm.SentencePieceProcessor(model_file=tok).get_piece_size()
    gcfg = gemma_config or Gemma2Config.tiny(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                             sliding_window=512)
    gemma_dir = save_gemma2_folder(Gemma2(gcfg), os.path.join(folder, "text_encoder"), tok)
    return {"autoencoder": os.path.join(folder, "autoencoder.safetensors"),
            "dinov3": os.path.join(folder, "dinov3.pth"), "gemma": gemma_dir}
