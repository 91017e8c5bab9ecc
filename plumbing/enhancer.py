"""
The official prompt enhancer (sample.py --enhance, SVGT2I.enhance_prompt): the text encoder, as a
causal LM, continues a fixed instruction greedily; the new text is cleaned up by the official rules,
and the DiT is conditioned on the "align" system prompt + the result. The instruction and the rules
are data the output depends on, kept verbatim (the sampler's --system_type enhance:
generate_enhanced_prompt in KlingTeam/SVG-T2I svg_t2i/sample_svg_t2i.py, l.24-118, and its call,
l.382-395; svg_generate.py pairs it with "base").

You need not read this to learn SVG-T2I.
"""

import torch

# The instruction, verbatim: data the output depends on. enhance_instruction ends it with the
# user prompt and "Enhanced description:" (no space after it: the model writes one).
ENHANCE_INSTRUCTION = (
    "You are an assistant that rewrites image generation prompts.\n"
    "Given a user prompt, rewrite it into a more detailed and concrete visual description.\n"
    "You MUST strictly preserve:\n"
    "- the main subject(s) and their roles;\n"
    "- the number of each entity (do not change counts like 'one', 'two', 'three');\n"
    "- explicit attributes (e.g. colors, sizes, poses) that appear in the user prompt;\n"
    "- explicit spatial relationships (left/right, front/behind, on top of, in the background, "
    "etc.);\n"
    "- explicit style or format constraints (e.g. '3D render', 'line art', 'pixel art', "
    "'photograph').\n"
    "You may only add a few plausible visual details (textures, lighting, background context) "
    "that do NOT contradict any part of the original prompt.\n"
    "Avoid repeating the same subject or action multiple times; keep the description concise.\n"
    "Do not remove or alter any constraints given in the user prompt.\n"
    "Do NOT mention the words 'User Prompt' or 'Enhanced Prompt' in your answer.\n"
    "Output only the enhanced description as one or two sentences.\n\n")
ENHANCE_MAX_NEW_TOKENS = 196
ENHANCE_SYSTEM_PROMPT = "align"  # sample_svg_t2i.py's choice for --system_type enhance


def enhance_instruction(prompt):
    """The text the model continues: the instruction, the user prompt as is, the answer cue."""
    return ENHANCE_INSTRUCTION + "User prompt: " + prompt + "\nEnhanced description:"


def postprocess_enhanced(decoded, prompt):
    """The official clean-up of the decoded new text, in its order: strip; if there is a "\n",
    the first non-empty line; a label before a ':' in the first 40 characters that names
    "enhanced", "description" or "prompt" is dropped; comma clauses stripped, empty ones and
    repeats (ignoring case) dropped, at most 4 kept, joined by ", "; at most 256 characters, cut
    back to the last space; strip. An empty result falls back to `prompt`."""
    text = decoded.strip()
    if "\n" in text:   # then every line break str.splitlines knows separates lines
        text = next((line.strip() for line in text.splitlines() if line.strip()), text)
    if ":" in text[:40]:
        head, tail = text.split(":", 1)
        if any(w in head.lower() for w in ("enhanced", "description", "prompt")):
            text = tail.strip()
    kept, seen = [], set()
    for clause in (c.strip() for c in text.split(",")):
        if clause and clause.lower() not in seen and len(kept) < 4:
            kept.append(clause)
            seen.add(clause.lower())
    text = ", ".join(kept) if kept else text       # only commas and spaces: left as it was
    if len(text) > 256:
        text = text[:256]
        text = text.rsplit(" ", 1)[0] if " " in text else text
    return text.strip() or prompt


def enhance_prompt(tokenizer, model, text, max_new_tokens=None):
    """Rewrite one prompt with Gemma-2 (a Gemma2Tokenizer and gemma2.Gemma2) as the official
    sampler does: BOS + the instruction, no chat template, no padding; greedy decoding with
    the model's attention (SVG-T2I's transformers 4.57 runs SDPA without the attention cap, our
    default) until <eos> (id 1: the official call's eos_token_id replaces the model's stop
    list) or max_new_tokens; the new tokens decoded without special tokens, then cleaned up."""
    max_new_tokens = max_new_tokens or ENHANCE_MAX_NEW_TOKENS
    device = model.embed_tokens.weight.device
    ids = torch.tensor([[tokenizer.BOS] + tokenizer.encode(enhance_instruction(text))],
                       device=device)
    new = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.EOS)
    return postprocess_enhanced(tokenizer.decode(new[0], skip_special_tokens=True), text)
