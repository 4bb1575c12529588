"""A laformer tokenizer as llama.cpp's ``tokenizer.ggml.*`` metadata (the inverse of ``laformer.tokenizer``'s GGUF
loading): the token list, merges or scores, token types, special ids, ``add_bos`` and the chat template.

Two vocabulary families exist in llama.cpp: byte-level BPE (``gpt2``; GPT-2, Llama 3, SmolLM) and SentencePiece-
style BPE with byte fallback (``llama``; Llama 2, Mistral, TinyLlama). Both are read from the Hugging Face
``tokenizers`` pipeline the tokenizer runs on, so what llama.cpp gets is what laformer encodes with.
"""

from __future__ import annotations

import json
import re
from typing import Any

from laformer.errors import TokenizerError

# The split regexes of llama.cpp's `llama-bpe` and `qwen2` pre-tokenizers (llama-vocab.cpp): laformer.tokenizer builds
# them from `tokenizer.ggml.pre`, and ``_pre_tokenizer_name`` names them back.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp token types (llama-vocab.h)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def tokenizer_metadata(tokenizer: Any, vocab_size: int, eos_token_ids: list[int] | None = None) -> dict[str, Any]:
    """``tokenizer.ggml.*`` and ``tokenizer.chat_template`` keys for a ``LaFormerTokenizer``.

    ``vocab_size`` is the model's embedding rows: a shorter vocabulary is padded with unused tokens (as llama.cpp's
    converter does); ``eos_token_ids`` beyond the tokenizer's eos (a chat model's end-of-turn) become ``eot``.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(f"the tokenizer is a {model.get('type')} model; GGUF export supports BPE vocabularies "
                             "(byte-level or SentencePiece-style), which every LLaMA-family model uses")
    sentencepiece = bool(model.get("byte_fallback"))
    tokens, types = _tokens_and_types(model["vocab"], spec.get("added_tokens", []), vocab_size, sentencepiece)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama" if sentencepiece else "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    if sentencepiece:  # llama.cpp's SentencePiece tokenizer merges the best-scored pair first: score = -merge rank
        rank = {m.replace(" ", ""): i for i, m in reversed(list(enumerate(merges)))}
        meta["tokenizer.ggml.scores"] = [-float(rank.get(t, len(merges))) for t in tokens]
        meta["tokenizer.ggml.add_space_prefix"] = _prepends_space(spec)
    else:
        meta["tokenizer.ggml.pre"] = _pre_tokenizer_name(spec.get("pre_tokenizer"))
        meta["tokenizer.ggml.add_space_prefix"] = False
    specials = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unknown": tokenizer.unk_token_id,
                "padding": tokenizer.pad_token_id}
    extra_eos = [i for i in (eos_token_ids or []) if i != tokenizer.eos_token_id]
    if extra_eos:
        specials["eot"] = extra_eos[0]
    for name, token_id in specials.items():
        if token_id is not None:
            meta[f"tokenizer.ggml.{name}_token_id"] = int(token_id)
    meta["tokenizer.ggml.add_bos_token"] = bool(tokenizer.add_bos_token)
    meta["tokenizer.ggml.add_eos_token"] = bool(tokenizer.add_eos_token)
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def _tokens_and_types(
    vocab: dict[str, int], added: list[dict[str, Any]], vocab_size: int, sentencepiece: bool
) -> tuple[list[str], list[int]]:
    by_id: dict[int, tuple[str, int]] = {}
    for token, index in vocab.items():
        kind = NORMAL
        if sentencepiece and _BYTE_TOKEN.fullmatch(token):
            kind = BYTE
        by_id[index] = (token, kind)
    for token in added:
        by_id[token["id"]] = (token["content"], CONTROL if token.get("special") else USER_DEFINED)
    if max(by_id) >= vocab_size:
        raise TokenizerError(f"the tokenizer has token id {max(by_id)} but the model's embedding has only "
                             f"{vocab_size} rows; export the model with the tokenizer it was trained with")
    tokens, types = [], []
    for index in range(vocab_size):
        token, kind = by_id.get(index, (f"[PAD{index}]", UNUSED))
        tokens.append(token)
        types.append(kind)
    return tokens, types


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for the pre-tokenizers ``laformer.tokenizer`` builds (and HF's own)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"]:
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds[:1] == ["Split"]:
        pattern = steps[0].get("pattern", {}).get("Regex")
        names = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
        if pattern in names:
            return names[pattern]
    raise TokenizerError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp "
                         "name laformer knows (gpt2, smollm, llama-bpe, qwen2); llama.cpp would split text "
                         "differently, so export a model whose tokenizer uses one of these")


def _prepends_space(spec: dict[str, Any]) -> bool:
    """SentencePiece's leading "▁": a Metaspace pre-tokenizer (laformer's) or a Prepend normalizer (Llama 2's)."""
    def steps(part: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
        return (part or {}).get(key, [part] if part else [])

    metaspace = any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never"
                    for s in steps(spec.get("pre_tokenizer"), "pretokenizers"))
    return metaspace or any(s.get("type") == "Prepend" for s in steps(spec.get("normalizer"), "normalizers"))
