"""The tokenizer: a thin layer over Hugging Face `tokenizers` (Rust), built from a GGUF file or a `tokenizer.json`.

From a GGUF, the vocabulary, merges and special ids in its metadata are rebuilt into the same `tokenizers` pipeline
the model's original `tokenizer.json` has (pre-tokenizer regex chosen by `tokenizer.ggml.pre`, as llama.cpp does).

Conventions follow transformers so code written against it works unchanged: `__call__` returns a `BatchEncoding`,
lists unless `return_tensors="pt"`; the pad token is the file's pad id, else the eos token.
"""

from __future__ import annotations

import json
import warnings
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jinja2
import torch
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from laformer.errors import CheckpointError, TokenizerError
from laformer.formats.gguf import read_gguf_metadata
from laformer.formats.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT
from laformer.formats.registry import resolve
from laformer.validation import read_json

# --------------------------------------------------------------------------------------------------------------------
# Building a `tokenizers.Tokenizer` from GGUF metadata, in the shape of the model's own tokenizer.json

# llama.cpp's `tokenizer.ggml.pre` names the regex the merges were learned with (llama-vocab.cpp); same ids need it.
_GPT2_PRE = ("gpt2", "default", "mpt", "olmo", "jais")
_DIGITS_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")  # \p{N} split first
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "falcon3", "dbrx", "smaug-bpe", "pixtral", "falcon-h1", "lfm2")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen", "megrez")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    split = {**dict.fromkeys(_LLAMA3_PRE, LLAMA3_SPLIT), **dict.fromkeys(_QWEN2_PRE, QWEN2_SPLIT)}.get(pre)
    if split is not None:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in _GPT2_PRE and pre is not None:
        warnings.warn(f"unknown GGUF pre-tokenizer {pre!r}; splitting text with the GPT-2 regex, so token ids may "
                      "differ from llama.cpp's for this model", stacklevel=3)
    return gpt2


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that spells it in byte-level vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(extra)}


def _byte_level_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    spell = _byte_alphabet()
    alphabet = set(spell.values())
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; adding it would grow the vocab.
    _add_gguf_added_tokens(tok, meta, lambda t: set(t) <= alphabet)
    return tok


def _sentencepiece_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    elif "tokenizer.ggml.scores" in meta:
        merges = _merges_from_scores(vocab, dict(zip(tokens, map(float, meta["tokenizer.ggml.scores"]))))
    else:
        raise TokenizerError("this SentencePiece GGUF has neither tokenizer.ggml.merges nor tokenizer.ggml.scores; "
                             "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix_space = meta.get("tokenizer.ggml.add_space_prefix", True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix_space else []))
    _add_gguf_added_tokens(tok, meta, lambda t: True)
    return tok


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece files store scores, not merges: every split of a token into two known tokens, best score first.

    Same order as transformers' `generate_merges`, so ids match its GGUF loading.
    """
    merges = []
    for token, score in scores.items():
        pairs = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]])))
    merges.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_gguf_added_tokens(tok: Tokenizer, meta: dict[str, Any], allowed: Callable[[str], bool]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so text never splits them."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", ())
    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, types) if kind == _CONTROL and allowed(t)]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types) if kind == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)


# --------------------------------------------------------------------------------------------------------------------
# Chat templates, rendered the way transformers renders them so prompts match token for token


@lru_cache(maxsize=16)
def _compile_chat_template(template: str) -> jinja2.Template:
    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it just renders."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template does not parse (line {e.lineno}: {e.message}); "
                             "fix the template or pass another with chat_template=...") from e


# --------------------------------------------------------------------------------------------------------------------
# The tokenizer


class BatchEncoding(dict):
    """`input_ids` and `attention_mask`, readable as keys or attributes (like transformers' BatchEncoding)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> "BatchEncoding":
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


class StreamDecoder:
    """Turns token ids into text one at a time, holding back bytes until they form whole UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._reset()

    def step(self, token_id: int) -> str:
        """The text `token_id` completes ("" while a character is still incomplete)."""
        token_id = int(token_id)
        if not 0 <= token_id < self._size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary [0, {self._size}); check that the "
                                 "ids come from this tokenizer's model")
        self._ids.append(token_id)
        chunk = self._stream.step(self._tokenizer, token_id)
        if chunk:
            self._text.append(chunk)
        return chunk or ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD), then start over."""
        emitted = "".join(self._text)
        full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        self._reset()
        return full[len(emitted):] if full.startswith(emitted) else ""

    def _reset(self) -> None:
        self._stream = decoders.DecodeStream(skip_special_tokens=self._skip)
        self._ids, self._text = [], []


_NO_LIMIT = int(1e30)  # transformers' "no model_max_length" value
_PADDING = {False: None, None: None, "do_not_pad": None,
            True: "longest", "longest": "longest", "max_length": "max_length"}


class LaFormerTokenizer:
    """Text to ids and back, padding, chat templates and streaming decode for LLaMA-family models.

    Special tokens (bos/eos) are added by the underlying tokenizer's post-processor, so `tokenizer.json` saved from
    here encodes identically in transformers. `padding_side` is "right" (training); generation pads on the left.
    """

    def __init__(self, tokenizer: Tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 unk_token: str | None = None, pad_token: str | None = None, add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None, chat_template: str | None = None,
                 model_max_length: int = _NO_LIMIT, padding_side: str = "right"):
        self._tokenizer = tokenizer
        self._special: dict[str, str | None] = {}
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("unk_token", unk_token)):
            self._set_special(name, token)
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        if add_bos_token is None and add_eos_token is None:  # keep the post-processor tokenizer.json came with
            probe = tokenizer.encode("", add_special_tokens=True).ids
            self.add_bos_token = bool(probe) and probe[0] == self.bos_token_id
            self.add_eos_token = bool(probe) and probe[-1] == self.eos_token_id
        else:
            self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
            self._set_post_processor()

    # ---- loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "LaFormerTokenizer":
        """From a registry name, a GGUF file, or a folder with `tokenizer.json` (+ `tokenizer_config.json`)."""
        try:
            path = resolve(name_or_path)
        except CheckpointError as e:
            raise TokenizerError(str(e)) from e
        if path.is_dir():
            return cls._from_folder(path)
        if path.name == "tokenizer.json":
            return cls._from_folder(path.parent)
        return cls._from_gguf(path)

    @classmethod
    def _from_gguf(cls, path: Path) -> "LaFormerTokenizer":
        try:
            meta = read_gguf_metadata(path)
        except CheckpointError as e:
            raise TokenizerError(f"{e} (or pass a folder holding tokenizer.json)") from e
        kind = meta.get("tokenizer.ggml.model")
        if kind is None or "tokenizer.ggml.tokens" not in meta:
            raise TokenizerError(f"{path} has no tokenizer metadata (tokenizer.ggml.model/tokens); pass a GGUF "
                                 "converted with its tokenizer, or a folder with tokenizer.json")
        builders = {"gpt2": _byte_level_from_gguf, "llama": _sentencepiece_from_gguf}
        if kind not in builders:
            raise TokenizerError(f"{path} uses tokenizer model {kind!r}; supported: {sorted(builders)} "
                                 "(byte-level BPE and SentencePiece BPE); use a tokenizer.json folder instead")
        tokens = meta["tokenizer.ggml.tokens"]

        def token(key: str) -> str | None:
            index = meta.get(f"tokenizer.ggml.{key}")
            if index is None:
                return None
            if not 0 <= index < len(tokens):
                raise TokenizerError(f"{path}: tokenizer.ggml.{key}={index} is outside the vocabulary of "
                                     f"{len(tokens)} tokens; fix the metadata (gguf-set-metadata) or re-convert")
            return tokens[index]

        sentencepiece = kind == "llama"  # llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise
        arch = meta.get("general.architecture")
        return cls(builders[kind](meta), bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
                   unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", sentencepiece)),
                   add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"),
                   model_max_length=int(meta.get(f"{arch}.context_length", _NO_LIMIT)))

    @classmethod
    def _from_folder(cls, folder: Path) -> "LaFormerTokenizer":
        file = folder / "tokenizer.json"
        if not file.is_file():
            hint = (" (it has a SentencePiece tokenizer.model: convert it once with transformers, "
                    "AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
                    if (folder / "tokenizer.model").is_file() else "")
            raise TokenizerError(f"no tokenizer.json in {folder}{hint}; save one with save_pretrained() or pass "
                                 "the model's GGUF file")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"{file} is not a valid tokenizer.json ({e}); re-save it from its source") from e
        config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        _check_config_types(config, folder)
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        specials = {name: _token_content(config.get(name)) for name in ("bos_token", "eos_token", "unk_token",
                                                                          "pad_token")}
        max_length = config.get("model_max_length")
        return cls(tokenizer, **specials, add_bos_token=config.get("add_bos_token"),
                   add_eos_token=config.get("add_eos_token"), chat_template=template,
                   model_max_length=int(max_length) if max_length is not None else _NO_LIMIT,
                   padding_side=config.get("padding_side", "right"))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (transformers can load them)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(directory / "tokenizer.json"))
        specials = {name: token for name, token in self._special.items() if token is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": self.add_bos_token,
                  "add_eos_token": self.add_eos_token, "model_max_length": self.model_max_length,
                  "padding_side": self.padding_side, "clean_up_tokenization_spaces": False}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                         encoding="utf-8")
        (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n",
                                                           encoding="utf-8")
        return directory

    # ---- special tokens

    def _set_special(self, name: str, token: str | None) -> None:
        if token is not None and self._tokenizer.token_to_id(token) is None:
            raise TokenizerError(f"{name} {token!r} is not in the vocabulary; pick an existing token "
                                 "(see convert_ids_to_tokens) or add it to tokenizer.json")
        self._special[name] = token

    def _set_post_processor(self) -> None:
        """bos/eos as a TemplateProcessing post-processor, in the exact form transformers builds."""
        add_bos = self.add_bos_token and self.bos_token is not None
        add_eos = self.add_eos_token and self.eos_token is not None
        bos, eos = self.bos_token, self.eos_token
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        special = [(bos, self.bos_token_id)] * add_bos + [(eos, self.eos_token_id)] * add_eos
        self._tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                      special_tokens=special)

    bos_token = property(lambda self: self._special["bos_token"])
    eos_token = property(lambda self: self._special["eos_token"])
    unk_token = property(lambda self: self._special["unk_token"])
    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    unk_token_id = property(lambda self: self._id(self.unk_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))

    @property
    def pad_token(self) -> str | None:
        return self._special["pad_token"]

    @pad_token.setter
    def pad_token(self, token: str | None) -> None:
        self._set_special("pad_token", token)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of bos, eos, unk and pad (deduplicated, in that order), as in transformers."""
        ids = (self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id)
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tokenizer

    def __repr__(self) -> str:
        return (f"LaFormerTokenizer(vocab={len(self)}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, add_bos={self.add_bos_token}, padding_side={self.padding_side!r})")

    # ---- encoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes one string, got {type(text).__name__}; use tokenizer(list) "
                                 "for batches")
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = None,
                 padding: bool | str = False, truncation: bool = False, max_length: int | None = None,
                 padding_side: str | None = None, add_special_tokens: bool = True) -> BatchEncoding:
        """Encode one text or a batch. `truncation=True` cuts to `max_length` (else `model_max_length`), keeping
        bos/eos; `padding=True`/"longest" pads to the longest row, "max_length" to `max_length`."""
        single = isinstance(text, str)
        texts = [text] if single else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise TokenizerError("the tokenizer takes a string or a list of strings; convert other inputs with str()")
        if padding not in _PADDING:
            raise TokenizerError(f"padding={padding!r} is not one of False, True, 'longest', 'max_length'")
        padding = _PADDING[padding]
        if return_tensors not in (None, "pt"):
            raise TokenizerError(f"return_tensors={return_tensors!r} is not supported; use None (lists) or 'pt'")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise TokenizerError(f"padding_side={side!r} must be 'left' or 'right'")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise TokenizerError(f"max_length={max_length!r} must be a positive int (or None)")
        if padding == "max_length" and max_length is None:
            raise TokenizerError("padding='max_length' needs max_length=N; or use padding=True to pad to the "
                                 "longest text of the batch")
        limit = max_length or (self.model_max_length if self.model_max_length < _NO_LIMIT else None)
        limit = limit if truncation else None
        ids = self._encode_batch(texts, add_special_tokens, limit)
        target = max(map(len, ids), default=0) if padding == "longest" else max_length if padding else None
        rows, masks = [], []
        for row in ids:
            extra = max(0, target - len(row)) if target is not None else 0
            if extra and self.pad_token_id is None:
                raise TokenizerError("padding needs a pad token and this tokenizer has neither pad nor eos; "
                                     "set tokenizer.pad_token to an existing token")
            pad, ones = [self.pad_token_id] * extra, [1] * len(row)
            rows.append(pad + row if side == "left" else row + pad)
            masks.append([0] * extra + ones if side == "left" else ones + [0] * extra)
        if return_tensors == "pt":
            if len({len(r) for r in rows}) > 1:
                raise TokenizerError("the texts have different lengths, so they cannot form one tensor; pass "
                                     "padding=True (and truncation=True with max_length to bound the length)")
            return BatchEncoding(input_ids=torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1),
                                 attention_mask=torch.tensor(masks, dtype=torch.long).reshape(len(rows), -1))
        if single:
            return BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=rows, attention_mask=masks)

    def _encode_batch(self, texts: list[str], add_special_tokens: bool, max_length: int | None) -> list[list[int]]:
        if max_length is None:
            return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]
        n_special = self._tokenizer.num_special_tokens_to_add(False) if add_special_tokens else 0
        if max_length <= n_special:
            raise TokenizerError(f"max_length={max_length} leaves no room for text next to the {n_special} special "
                                 "token(s) added; raise max_length or pass add_special_tokens=False")
        out = []
        for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False):
            encoding.truncate(max_length - n_special)
            if add_special_tokens:
                encoding = self._tokenizer.post_process(encoding)
            out.append(encoding.ids)
        return out

    # ---- decoding

    def decode(self, ids: int | Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Iterable[int]] | torch.Tensor,
                     skip_special_tokens: bool = False) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        rows = [self._check_ids(row) for row in sequences]
        return self._tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids: int | Iterable[int] | torch.Tensor) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise TokenizerError(f"decode() takes one sequence but got a tensor of shape {tuple(ids.shape)}; "
                                     "use batch_decode() for batches")
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, int):
            ids = [ids]
        ids = list(ids)
        if not all(isinstance(i, int) for i in ids):
            raise TokenizerError("decode() takes a flat sequence of int ids; use batch_decode() for batches")
        if ids and (min(ids) < 0 or max(ids) >= len(self)):
            bad = next(i for i in ids if not 0 <= i < len(self))
            raise TokenizerError(f"token id {bad} is outside the vocabulary [0, {len(self)}); check that the ids "
                                 "come from this tokenizer's model")
        return ids

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(self._check_ids(ids)[0])
        return [self._tokenizer.id_to_token(i) for i in self._check_ids(ids)]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """Unknown tokens map to the unk id (None without an unk token), as in transformers."""
        if isinstance(tokens, str):
            found = self._tokenizer.token_to_id(tokens)
            return found if found is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder for generation: `.step(id)` returns the new text, `.flush()` the rest."""
        return StreamDecoder(self._tokenizer, skip_special_tokens)

    # ---- chat

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, return_tensors: str | None = None,
                            chat_template: str | None = None, **template_kwargs: Any) -> str | list[int] | torch.Tensor:
        """Render a conversation with the model's Jinja chat template (as transformers does).

        Returns the prompt's ids (no bos/eos added: the template writes them), as a (1, T) tensor when
        `return_tensors="pt"`, or with `tokenize=False` the prompt text; the default is Hugging Face's (transformers
        5 wraps the ids in a dict, ``return_dict=True``; this returns them as they are).
        Extra keyword arguments reach the template.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise TokenizerError("this tokenizer has no chat template; pass chat_template='...' (a Jinja string) "
                                 "or load a model whose files carry one")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise TokenizerError("messages must be a list of dicts like {'role': 'user', 'content': 'hi'}")
        if return_tensors not in (None, "pt"):
            raise TokenizerError(f"return_tensors={return_tensors!r} is not supported; use None or 'pt'")
        context = {"tools": None, "documents": None, **self._special, **template_kwargs}
        try:
            text = _compile_chat_template(template).render(messages=[dict(m) for m in messages],
                                                           add_generation_prompt=add_generation_prompt, **context)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"the chat template rejected these messages: {e}; fix the messages (roles, "
                                 "order) or pass another chat_template") from e
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return torch.tensor([ids], dtype=torch.long) if return_tensors == "pt" else ids


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return read_json(path, TokenizerError)


def _check_config_types(config: dict[str, Any], folder: Path) -> None:
    """The tokenizer_config.json fields we read, each of the JSON type transformers writes."""
    def fits(name: str, value: Any) -> bool:
        if name.startswith("add_"):
            return value is None or isinstance(value, bool)
        if name.endswith("_token"):
            return value is None or isinstance(value, str) or isinstance(value, dict) and isinstance(value.get("content"), str)
        if name == "chat_template":
            return value is None or isinstance(value, str) or isinstance(value, list) and all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value)
        if name == "model_max_length":
            return value is None or isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        return value in ("left", "right")

    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token", "chat_template",
                 "model_max_length", "padding_side"):
        if name in config and not fits(name, config[name]):
            raise TokenizerError(f"{folder}: tokenizer_config.json has {name}={config[name]!r}, which is not a valid "
                                 "value for that field; fix it or re-save the tokenizer")


def _token_content(token: str | dict | None) -> str | None:
    """Special tokens in tokenizer_config.json are strings or serialized AddedTokens ({"content": ...})."""
    return token.get("content") if isinstance(token, dict) else token
