"""Gemma-2 (google/gemma-2-2b) as SVG-T2I's text encoder, and its tokenizer.

SVG-T2I feeds the DiT with `hidden_states[-2]` of the base Gemma-2 model (no LM head): the raw
residual stream after the second-to-last decoder layer, for a right-padded batch that starts with
BOS. This file is the decoder (embedding x sqrt(H), 26 sandwich-normed layers, final norm), the key
map of the Hugging Face checkpoint folder (the plumbing's load_gemma2 reads it), and a
plain-sentencepiece tokenizer that reproduces the Hugging Face tokenizer as SVG-T2I calls it.

Every op is written in the order Hugging Face runs it, so that features match bit for bit
in fp32 and bf16.

For the prompt enhancer (plumbing.enhancer, the official sampler's --system_type enhance) the
model also has the tied LM head with its final soft-cap, greedy decoding with a KV cache as
transformers' generate, and the tokenizer decodes.
"""

import json
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


# -------------------------------------------------------------------------------------------------
# Config


@dataclass
class Gemma2Config:
    """Gemma-2 hyper-parameters; the defaults are google/gemma-2-2b's config.json."""

    vocab_size: int = 256000
    hidden_size: int = 2304  # H
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4  # GQA: query heads 2g and 2g+1 share key/value head g
    head_dim: int = 256  # not hidden_size / num_attention_heads (288): q is 8 * 256 = 2048 wide
    query_pre_attn_scalar: float = 256  # the attention scale is this ** -0.5, not head_dim ** -0.5
    sliding_window: int | None = 4096  # sliding layers see keys kv with q - window < kv <= q
    layer_types: tuple | None = None  # None: even layers sliding, odd layers full attention
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    attn_logit_softcapping: float | None = 50.0  # the cap in config.json; used only if attn_softcap
    # LM head only (generation): logits = cap * tanh(logits / cap); None: no cap
    final_logit_softcapping: float | None = 30.0
    # The soft-capping switch. Gemma 2 as specified (and transformers >= 5, eager) squashes
    # attention logits with cap * tanh(logits / cap). But the released SVG-T2I DiT was trained on
    # features from transformers 4.57 (the version SVG-T2I pins), whose default attention for Gemma
    # 2 is SDPA, and that path silently drops the cap. So the default is off: plain
    # F.scaled_dot_product_attention, called the way transformers' SDPA path calls it, which gives
    # the features the DiT saw. attn_softcap=True runs the eager soft-capped math instead.
    attn_softcap: bool = False

    def __post_init__(self):
        L = self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = tuple("full_attention" if i % 2 else "sliding_attention"
                                     for i in range(L))
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != L or not set(self.layer_types) <= {"sliding_attention",
                                                                       "full_attention"}:
            raise ValueError(f"layer_types must list {L} entries of "
                             f"'sliding_attention'/'full_attention', got {list(self.layer_types)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def gemma2_2b(cls, **overrides):
        """google/gemma-2-2b (the defaults above are its config.json values)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides):
        """A ~200k-parameter model for tests that still exercises every path: GQA, head_dim != H /
        heads, query_pre_attn_scalar != head_dim, both layer types with a window that bites at T >
        4, and a cap small enough to be non-linear."""
        cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=3.0)
        return cls(**{**cfg, **overrides})

    @classmethod
    def from_json(cls, path_or_dict, **overrides):
        """Read a Hugging Face config.json (a dict, the file, or the folder holding it).

        Accepts the Hub spelling (top-level `rope_theta`, `torch_dtype`, `hidden_act`, no
        `layer_types`) and newer ones (`rope_parameters`, `dtype`, explicit `layer_types`). Missing
        fields take the gemma-2-2b values, as they do in transformers. `overrides` set fields that
        are not in the file, e.g. attn_softcap=True."""
        if isinstance(path_or_dict, dict):
            d, where = path_or_dict, "config"
        else:
            where = str(path_or_dict)
            if os.path.isdir(where):
                where = os.path.join(where, "config.json")
            if not os.path.isfile(where):
                raise FileNotFoundError(f"Gemma-2 config not found: {where} (pass the model "
                                        "folder or its config.json)")
            try:
                with open(where) as f:
                    d = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
        if d.get("model_type", "gemma2") != "gemma2":
            raise ValueError(f"{where}: model_type is {d['model_type']!r}, expected 'gemma2'")
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"{where}: hidden_activation {act!r} is not supported (Gemma 2 uses "
                             "'gelu_pytorch_tanh')")
        if d.get("attention_bias") or d.get("use_bidirectional_attention"):
            raise ValueError(f"{where}: attention_bias / use_bidirectional_attention are not "
                             "Gemma-2-2b settings")
        rope = d.get("rope_parameters") or {}
        if d.get("rope_scaling") or rope.get("rope_type", "default") != "default":
            raise ValueError(f"{where}: only default RoPE is supported, got "
                             f"{d.get('rope_scaling') or rope}")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name != "attn_softcap"}
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        # Ignored: dtype / torch_dtype (the loader's dtype argument decides),
        # max_position_embeddings, token ids, tie_word_embeddings (Gemma 2's head is the
        # embedding), cache and dropout fields.
        return cls(**{**kw, **overrides})


# -------------------------------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: in fp32, weight stored as an offset from 1, cast back *after* the
    weight multiply."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(T, config, device, dtype):
    """cos, sin [T, head_dim] for positions 0..T-1, computed in fp32 and then cast to
    the model dtype.

    Positions ignore the padding mask, which is right for right-padded batches. inv_freq is
    computed on the CPU, as transformers does when it builds its buffer, so the tables are the same
    on every device."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # [d/2]
    pos = torch.arange(T, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq.to(device)[None, :]  # [T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # halves layout, not interleaved pairs
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Gemma2Attention(nn.Module):
    """Causal GQA self-attention with RoPE; soft-capped eager math or SDPA
    (see Gemma2Config.attn_softcap)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        H, d = config.hidden_size, config.head_dim
        nH, nKV = config.num_attention_heads, config.num_key_value_heads
        self.n_rep = nH // nKV
        self.scaling = config.query_pre_attn_scalar ** -0.5
        self.q_proj = nn.Linear(H, nH * d, bias=False)
        self.k_proj = nn.Linear(H, nKV * d, bias=False)
        self.v_proj = nn.Linear(H, nKV * d, bias=False)
        self.o_proj = nn.Linear(nH * d, H, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        # x: [B, T, H]; cos, sin: [T, d] or [B, 1, T, d]; mask: [B, 1, T, T] bool (True = may
        # attend), or None for plain causal. With a KVCache there are S keys, cached then new:
        # mask [B, 1, T, S], or None only if T == 1 or S == T.
        B, T, _ = x.shape
        d = self.config.head_dim
        q = self.q_proj(x).view(B, T, -1, d).transpose(1, 2)  # [B, nH, T, d]
        k = self.k_proj(x).view(B, T, -1, d).transpose(1, 2)  # [B, nKV, T, d]
        v = self.v_proj(x).view(B, T, -1, d).transpose(1, 2)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        if cache is not None:  # decoding: cached keys (rotated) and values come first
            k, v = cache.update(k, v)  # [B, nKV, S, d]

        if self.config.attn_softcap:
            k = k.repeat_interleave(self.n_rep, dim=1)
            v = v.repeat_interleave(self.n_rep, dim=1)
            s = torch.matmul(q, k.transpose(2, 3)) * self.scaling  # [B, nH, T, T or S]
            cap = self.config.attn_logit_softcapping
            if cap is not None:  # divide, tanh, multiply: three ops, as in the reference math
                s = s / cap
                s = torch.tanh(s)
                s = s * cap
            # the mask is added after the cap, as the dtype's finite minimum rather than -inf
            bias = torch.zeros(mask.shape, dtype=s.dtype, device=s.device)
            bias = bias.masked_fill(~mask, torch.finfo(s.dtype).min)
            s = s + bias
            p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)  # fp32, cast before @ v
            o = torch.matmul(p, v)
        elif mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scaling,
                                               enable_gqa=self.n_rep > 1)
        else:
            k = k.repeat_interleave(self.n_rep, dim=1)
            v = v.repeat_interleave(self.n_rep, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        o = o.transpose(1, 2).contiguous().reshape(B, T, -1)  # [B, T, nH * d]
        return self.o_proj(o)


class Gemma2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma2DecoderLayer(nn.Module):
    """Two residual blocks, each sandwiched between a pre-norm and a post-norm
    (four RMSNorms per layer)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        H, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(H, eps)
        self.self_attn = Gemma2Attention(config)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.mlp = Gemma2MLP(config)
        self.post_feedforward_layernorm = RMSNorm(H, eps)

    def forward(self, x, cos, sin, mask, cache=None):
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + self.post_attention_layernorm(a)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x


class KVCache:
    """One layer's rotated keys and values for cached decoding, kept as transformers'
    DynamicCache keeps them: all tokens for a full layer, the last window - 1 for a sliding one
    (the next query q sees keys q - window < kv <= q, and brings its own). update() returns what
    the new queries attend to: the kept keys, then the new ones; a prompt longer than the window
    gets all its keys, and the mask does the rest."""

    def __init__(self, window=None):
        self.window = window  # None: a full-attention layer
        self.k = self.v = None  # [B, nKV, kept, d]

    def update(self, k, v):
        if self.k is not None:
            k, v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)  # [B, nKV, S, d]
        start = 0 if self.window is None else max(k.shape[2] - (self.window - 1), 0)
        self.k, self.v = k[:, :, start:], v[:, :, start:]
        return k, v


class Gemma2(nn.Module):
    """Gemma-2; its LM head (lm_head, generate) is the embedding, tied. Parameter names are the
    checkpoint keys without the `model.` prefix."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma2DecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def _masks(self, attention_mask, T):
        """Boolean masks [B, 1, T, T] (True = may attend) for full and sliding layers; None
        means plain causal.

        Padding is masked by key only: padded queries still attend to the real keys before them, so
        their outputs are finite (and unused downstream). The SDPA path drops a mask exactly when
        transformers does (no padding, and for sliding layers T < window), since mask=None +
        is_causal runs a different kernel."""
        keep = attention_mask.bool()  # [B, T]
        pos = torch.arange(T, device=keep.device)
        causal = pos[None, :] <= pos[:, None]                                  # [Tq, Tkv]
        full = causal[None, None] & keep[:, None, None, :]                     # [B, 1, Tq, Tkv]
        window = self.config.sliding_window
        sliding = full if window is None else full & (pos[None, :] > pos[:, None] - window)
        if not self.config.attn_softcap and bool(keep.all()):
            full = None
            if window is None or T < window:
                sliding = None
        return full, sliding

    def _trunk(self, input_ids, attention_mask, num_layers):
        """Yield the scaled embeddings, then the raw output of each of the first num_layers
        decoder layers."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                             f"shape {tuple(input_ids.shape)}")
        V = self.config.vocab_size
        if input_ids.numel() and not (0 <= int(input_ids.min()) and int(input_ids.max()) < V):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        T = input_ids.shape[1]
        w = self.embed_tokens.weight
        # sqrt(H) as an fp32 scalar rounded to the model dtype *before* the multiply
        # (48.0 exactly for H = 2304)
        x = F.embedding(input_ids, w) * torch.tensor(self.config.hidden_size ** 0.5,
                                                     device=w.device).to(w.dtype)
        yield x
        if num_layers == 0:
            return
        cos, sin = rope_cos_sin(T, self.config, w.device, w.dtype)
        full, sliding = self._masks(attention_mask, T)
        for layer in self.layers[:num_layers]:
            x = layer(x, cos, sin, sliding if layer.is_sliding else full)
            yield x

    def _check_num_layers(self, num_layers):
        L = self.config.num_hidden_layers
        if num_layers is None:
            return L
        if not 0 <= num_layers <= L:
            raise ValueError(f"num_layers must be in [0, {L}], got {num_layers}")
        return num_layers

    def hidden_states(self, input_ids, attention_mask=None, num_layers=None):
        """The tuple transformers returns as `hidden_states`: L + 1 tensors [B, T, H], in
        the model dtype.

        Entry 0 is the scaled embedding, entry k (1 <= k < L) the raw output of layer k-1, and
        entry L the *final-normed* output of the last layer (its raw output is not returned, as in
        transformers). num_layers=n < L runs only the first n layers and returns the first n + 1
        entries of that same tuple."""
        n = self._check_num_layers(num_layers)
        hs = list(self._trunk(input_ids, attention_mask, n))
        if n == self.config.num_hidden_layers:
            hs[-1] = self.norm(hs[-1])
        return tuple(hs)

    def encode(self, input_ids, attention_mask=None, layer=-2):
        """hidden_states(...)[layer], running only the layers it needs and keeping no other entry.
        The default -2 (what SVG-T2I uses) is the raw output of the second-to-last layer: the last
        layer is skipped."""
        L = self.config.num_hidden_layers
        if not -(L + 1) <= layer <= L:
            raise ValueError(f"layer must index a tuple of {L + 1} hidden states, got {layer}")
        k = layer % (L + 1)
        x = None
        for x in self._trunk(input_ids, attention_mask, k):
            pass
        return self.norm(x) if k == L else x

    forward = encode

    # LM head and greedy decoding (Gemma2ForCausalLM), for the prompt enhancer

    def lm_head(self, h):
        """Logits [..., V] of final-normed hidden states h [..., H], as Gemma2ForCausalLM: the tied
        head (the embedding), then cap * tanh(logits / cap), in the model dtype. In bf16 the cap
        rounds and can tie near-maxima, so it can change greedy choices: it is kept, op for op."""
        logits = F.linear(h, self.embed_tokens.weight)
        cap = self.config.final_logit_softcapping
        if cap is not None:  # divide, tanh, multiply, as in the reference
            logits = logits / cap
            logits = torch.tanh(logits)
            logits = logits * cap
        return logits

    def logits(self, input_ids, attention_mask=None):
        """[B, T, V]: Gemma2ForCausalLM(input_ids, attention_mask).logits (no cache)."""
        return self.lm_head(self.encode(input_ids, attention_mask, layer=-1))

    def _cached_masks(self, keep, T):
        """Masks for T new queries after S - T cached tokens; keep [B, S] masks padded keys.

        Full layers see all S keys ([B, 1, T, S]); sliding layers the keys their KVCache holds,
        from max(S - T - (window - 1), 0) on. None where transformers' SDPA path drops the mask:
        nothing padded, T == 1 or all keys new, and (sliding) fewer keys than the window. The
        eager soft-capped path always gets a mask."""
        S = keep.shape[1]
        qpos = torch.arange(S - T, S, device=keep.device)
        kpos = torch.arange(S, device=keep.device)
        causal = kpos[None, :] <= qpos[:, None]  # [T, S]
        full = causal[None, None] & keep[:, None, None, :]  # [B, 1, T, S]
        window = self.config.sliding_window
        start = 0 if window is None else max(S - T - (window - 1), 0)
        sliding = full[..., start:]
        if window is not None:
            sliding = sliding & (kpos[None, start:] > qpos[:, None] - window)
        if not self.config.attn_softcap:
            n = S - start  # keys of a sliding layer
            if (T == 1 or S == T) and bool(keep.all()):
                full = None
            fits = window is None or n < window
            if (T == 1 or n == T) and fits and bool(keep[:, start:].all()):
                sliding = None
        return full, sliding

    def _cached_step(self, input_ids, positions, keep, caches):
        """Run new tokens [B, T] at RoPE positions [B, T] through all layers, extending the caches
        (a KVCache per layer); keep [B, S] masks padded keys so far, the new tokens last.
        Returns the final-normed hidden state of the last position, [B, 1, H]."""
        w = self.embed_tokens.weight
        scale = torch.tensor(self.config.hidden_size ** 0.5, device=w.device).to(w.dtype)
        x = F.embedding(input_ids, w) * scale  # as in _trunk
        cos, sin = rope_cos_sin(int(positions.max()) + 1, self.config, w.device, w.dtype)
        cos, sin = cos[positions][:, None], sin[positions][:, None]  # [B, 1, T, d]
        full, sliding = self._cached_masks(keep, input_ids.shape[1])
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cos, sin, sliding if layer.is_sliding else full, cache)
        return self.norm(x[:, -1:])

    def _check_prompt(self, input_ids, attention_mask):
        """keep [B, T] bool for generate(); prompts must be unpadded or left-padded."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, T], T >= 1, got {tuple(input_ids.shape)}")
        V = self.config.vocab_size
        if not (0 <= int(input_ids.min()) and int(input_ids.max()) < V):
            raise ValueError(f"input_ids must lie in [0, {V}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                             f"shape {tuple(input_ids.shape)}")
        keep = attention_mask.bool()
        # New tokens follow the last column, so right padding would leave pads inside the text
        # (and transformers versions disagree on the positions after it); batches pad left.
        if not bool(keep[:, -1].all()) or bool((keep[:, :-1] & ~keep[:, 1:]).any()):
            raise ValueError("generate() needs unpadded or left-padded prompts: every "
                             "attention_mask row must be 0s, then 1s")
        return keep

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=196, eos_token_id=1,
                 pad_token_id=None, return_logits=False):
        """Greedy decoding with a KV cache: the new ids [B, N], N <= max_new_tokens, that
        transformers' Gemma2ForCausalLM.generate(do_sample=False) puts after the prompt.

        A row stops at its first id in eos_token_id (an int or a list; that EOS is returned, as in
        transformers), then holds pad_token_id (default: the first EOS id) until all rows stop.
        RoPE positions are cumsum(attention_mask) - 1, so left padding does not shift a row; keys
        are masked by padding, causality and the window, in sequence-index space. With
        return_logits=True, also each step's logits [B, N, V] in fp32 (as output_logits)."""
        keep = self._check_prompt(input_ids, attention_mask)
        n_max = max_new_tokens
        if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {n_max!r}")
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        eos = torch.tensor(eos, device=input_ids.device)
        pad = int(eos[0]) if pad_token_id is None else int(pad_token_id)
        B = input_ids.shape[0]
        out, seen = input_ids.new_empty(B, 0), []
        positions = (keep.long().cumsum(-1) - 1).masked_fill(~keep, 1)  # pads at 1, as in 4.57
        window = self.config.sliding_window
        caches = [KVCache(window if layer.is_sliding else None) for layer in self.layers]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        step = input_ids  # the whole prompt first (prefill), then one token at a time
        for _ in range(n_max):
            h = self._cached_step(step, positions, keep, caches)  # [B, 1, H]
            logits = self.lm_head(h)[:, -1].float()  # [B, V]
            seen += [logits] if return_logits else []
            nxt = logits.argmax(-1)  # [B]; the first of equal maxima, as in transformers
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out = torch.cat((out, nxt[:, None]), dim=1)
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
            step, positions = nxt[:, None], positions[:, -1:] + 1
            keep = torch.cat((keep, keep.new_ones(B, 1)), dim=1)
        if not return_logits:
            return out
        V = self.config.vocab_size
        return out, (torch.stack(seen, 1) if seen else torch.zeros(B, 0, V, device=out.device))


# -------------------------------------------------------------------------------------------------
# The key map (plumbing.loading.load_gemma2 reads the Hugging Face folder)


def gemma2_keymap(sd):
    """A Hugging Face Gemma-2 state dict -> ours: strip `model.`
    (Gemma2ForCausalLM, the official files; a Gemma2Model file has no prefix) and drop
    `lm_head.weight`, which is tied to `embed_tokens`."""
    return {k.removeprefix("model."): v for k, v in sd.items() if k != "lm_head.weight"}


# -------------------------------------------------------------------------------------------------
# Tokenizer


class Gemma2Tokenizer:
    """The Gemma tokenizer on plain sentencepiece, reproducing the Hugging Face tokenizer as
    SVG-T2I calls it: `tokenizer(texts, padding=True, pad_to_multiple_of=8, max_length=M,
    truncation=True)` with right padding.

    BOS first, no EOS, truncation to max_length tokens counting BOS, right padding with <pad> (0)
    to a multiple of 8. Text is encoded as is (no dummy prefix, whitespace kept). The one place raw
    sentencepiece differs from Hugging Face: HF matches the literal strings "<pad>", "<eos>",
    "<bos>", "<unk>" in text as special tokens, while sentencepiece never matches control symbols
    from text; we split those out first, as HF does."""

    PAD, EOS, BOS, UNK = 0, 1, 2, 3
    SPECIAL = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    _special_re = re.compile("(" + "|".join(map(re.escape, SPECIAL)) + ")")

    def __init__(self, model_file):
        import sentencepiece as spm  # runtime dependency of the tokenizer only

        model_file = str(model_file)
        if os.path.isdir(model_file):
            model_file = os.path.join(model_file, "tokenizer.model")
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"Gemma tokenizer not found: {model_file} (pass "
                                    "tokenizer.model or its folder)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_file)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_file}: not a sentencepiece model ({e})") from None
        pieces = [self.sp.id_to_piece(i) for i in range(min(4, self.sp.get_piece_size()))]
        if pieces != list(self.SPECIAL):
            raise ValueError(f"{model_file}: ids 0-3 are {pieces}, expected {list(self.SPECIAL)} "
                             f"(not a Gemma tokenizer)")
        if self.sp.encode("a", out_type=str)[0].startswith("▁"):
            raise ValueError(f"{model_file}: adds a dummy prefix space, so it is not a Gemma "
                             "tokenizer")
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text):
        """Token ids of one text, without BOS."""
        ids = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:  # odd entries are the captured special literals
                ids.append(self.SPECIAL[part])
            elif part:
                ids += self.sp.encode(part, out_type=int)
        return ids

    # What Hugging Face's decode(skip_special_tokens=True) drops for google/gemma-2-2b: the
    # tokens its tokenizer marks special (ids 0-3, and the chat-turn markers 106 and 107). Other
    # added pieces such as <mask> or <unused0> are not special there: they decode to their text.
    SKIPPED_ON_DECODE = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
    _byte_piece = re.compile(r"<0x[0-9A-Fa-f]{2}>")

    def decode(self, ids, skip_special_tokens=True):
        """Text of token ids (a list or 1-D tensor), as Hugging Face's Gemma tokenizer decodes:
        "▁" -> " " in every piece, no prefix space removed, no clean-up of spaces; a run of byte
        pieces is read as UTF-8, and a run that is not valid UTF-8 gives one U+FFFD per byte (the
        `tokenizers` ByteFallback rule; sentencepiece's own decode differs there).
        skip_special_tokens=False keeps the special tokens as text, e.g. "<bos>"."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if ids and not all(0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got "
                             f"[{min(ids)}, {max(ids)}]")
        skip = set()
        if skip_special_tokens:  # a piece the model lacks maps to <unk>, skipped anyway
            skip = {self.sp.piece_to_id(p) for p in self.SKIPPED_ON_DECODE}
        out, run = [], bytearray()
        for piece in [self.sp.id_to_piece(i) for i in ids if i not in skip] + [None]:
            if piece is not None and self._byte_piece.fullmatch(piece):
                run.append(int(piece[3:5], 16))
                continue
            if run:  # a byte run ends: one UTF-8 text, or a replacement character per byte
                try:
                    out.append(run.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(run))
                run = bytearray()
            if piece is not None:
                out.append(piece.replace("▁", " "))
        return "".join(out)

    def __call__(self, texts, max_length=512):
        """texts: list of str -> (input_ids [B, T] int64, attention_mask [B, T] int64), T a
        multiple of 8."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not texts \
                or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8 \
                or max_length % 8:
            raise ValueError("max_length must be a positive multiple of 8 (padding is to a "
                             f"multiple of 8), got {max_length!r}")
        seqs = [([self.BOS] + self.encode(t))[:max_length] for t in texts]
        T = -(-max(map(len, seqs)) // 8) * 8  # the longest, rounded up to a multiple of 8
        ids = torch.full((len(seqs), T), self.PAD, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[b, :len(s)] = 1
        return ids, mask
