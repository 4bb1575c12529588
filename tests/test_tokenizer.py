"""LaFormerTokenizer: parity with transformers on the default model, padding, chat templates, streaming, saving,
a SentencePiece GGUF built here, and the errors bad input raises."""

from __future__ import annotations

import json

import pytest
import torch

from laformer.errors import TokenizerError
from laformer.tokenizer import BatchEncoding, LaFormerTokenizer, _byte_alphabet
from tiny import byte_level_tokenizer

SAMPLE = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 3.14, isn't it?",
    "我爱自然语言处理，今天天气很好。",
    "def f(x):\n\treturn x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "Emoji: 😀🎉👍🏽 and flags 🇫🇷 family 👨‍👩‍👧",
    "tabs\tand\t\tmany     spaces",
    "  leading and trailing spaces  ",
    "\n\nnewlines\n\n\nhere\r\nwindows",
    "<|im_start|>user\nhi<|im_end|>",
    "text with <|endoftext|> inside",
    "Ünïcödé àçcénts, Ελληνικά, русский, العربية",
    "numbers 1234567 and 3.5e-10",
    "",
    " ",
]

SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "lo", "llo", "▁he", "▁hello", "▁w", "or",
              "▁wor", "ld", "▁world"]
SPM_TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"


def spm_metadata(tokenizer_model="llama", tokens=True, add_bos=True, add_space_prefix=None) -> dict:
    """A GGUF's tokenizer metadata only: SentencePiece pieces with scores, byte tokens <0x00>..<0xFF>."""
    metadata = dict(context_length=64)
    if tokens:
        vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
        metadata.update(tokenizer_model=tokenizer_model, token_list=vocab,
                        token_scores=[0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))],
                        token_types=[2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES), bos_token_id=1, eos_token_id=2,
                        unk_token_id=0, add_bos_token=add_bos)
        if add_space_prefix is not None:
            metadata["add_space_prefix"] = add_space_prefix
        metadata["chat_template"] = SPM_TEMPLATE
    return metadata


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory, write_gguf):
    return write_gguf(tmp_path_factory.mktemp("spm") / "tiny.gguf", spm_metadata())


@pytest.fixture(scope="module")
def spm(spm_gguf):
    return LaFormerTokenizer.from_pretrained(spm_gguf)


# ---- the default model, against transformers


def test_default_tokenizer_metadata(default_tokenizer):
    tok = default_tokenizer
    assert (tok.vocab_size, len(tok)) == (49152, 49152)
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2)
    assert tok.all_special_ids == [1, 2, 0]
    assert not tok.add_bos_token and tok.padding_side == "right" and tok.model_max_length == 8192
    assert "<|im_start|>" in tok.chat_template


def test_registry_name_loads_the_same_tokenizer(default_tokenizer):
    tok = LaFormerTokenizer.from_pretrained("smollm2-135m-instruct")
    assert tok.encode(SAMPLE[1]) == default_tokenizer.encode(SAMPLE[1])


def test_ids_match_transformers(default_tokenizer, hf_gguf_reference):
    _, hf = hf_gguf_reference
    for text in SAMPLE:
        assert default_tokenizer.encode(text) == hf(text).input_ids, text
        assert default_tokenizer.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert default_tokenizer(SAMPLE).input_ids == hf(SAMPLE).input_ids


def test_digits_after_whitespace_follow_llama_cpp(default_tokenizer):
    """SmolLM2's pre-tokenizer ("smollm" in llama.cpp) splits every digit off before the GPT-2 regex runs, so a
    run of spaces before a number stays one token. transformers' GGUF loader skips that step and gives
    ['Ġ', 'Ġ', '1', '2'] here; we follow llama.cpp and the model's original tokenizer.json."""
    assert default_tokenizer.convert_ids_to_tokens(default_tokenizer.encode("  12")) == ["ĠĠ", "1", "2"]
    assert default_tokenizer.convert_ids_to_tokens(default_tokenizer.encode("a 12")) == ["a", "Ġ", "1", "2"]


def test_decode_round_trips_and_matches_transformers(default_tokenizer, hf_gguf_reference):
    _, hf = hf_gguf_reference
    for text in SAMPLE:
        ids = default_tokenizer.encode(text)
        assert default_tokenizer.decode(ids) == text
        assert default_tokenizer.decode(torch.tensor(ids)) == text
        assert default_tokenizer.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    rows = default_tokenizer(SAMPLE[:3], padding=True, return_tensors="pt").input_ids
    assert default_tokenizer.batch_decode(rows, skip_special_tokens=True) == SAMPLE[:3]


def test_token_conversions(default_tokenizer):
    tok = default_tokenizer
    assert tok.convert_ids_to_tokens(1) == "<|im_start|>"
    assert tok.convert_ids_to_tokens([28120, 2]) == ["hello", "<|im_end|>"]
    assert tok.convert_tokens_to_ids(["hello", "<|im_end|>"]) == [28120, 2]
    assert tok.convert_tokens_to_ids("no-such-token-xyz") == tok.unk_token_id == 0


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "Salut ! 😀"},
     {"role": "user", "content": "你好吗？"}],
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(default_tokenizer, hf_gguf_reference, add_generation_prompt):
    _, hf = hf_gguf_reference
    for messages in CONVERSATIONS:
        ours = default_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                     tokenize=False)
        theirs = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert ours == theirs
        ids = default_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)  # tokenized
        assert ids == hf.encode(theirs, add_special_tokens=False)
        assert ids == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)["input_ids"]
    tensor = default_tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=True, return_tensors="pt")
    assert tensor.shape[0] == 1 and tensor.dtype == torch.long


def test_chat_template_features():
    """transformers' rendering environment: trim/lstrip blocks, tojson without HTML escaping, loop controls,
    strftime_now, raise_exception, special tokens and extra keyword arguments."""
    tok = byte_level_tokenizer()
    template = ("{% for m in messages %}\n  {% if m['role'] == 'bad' %}{{ raise_exception('no bad role') }}"
                "{% endif %}{{ m | tojson }}{% break %}\n{% endfor %}{{ eos_token }}{{ extra }}"
                "{{ strftime_now('%Y') | length }}")
    text = tok.apply_chat_template([{"role": "user", "content": "<&>"}, {"role": "user"}],
                                   chat_template=template, extra="!", tokenize=False)
    assert text == '{"role": "user", "content": "<&>"}</s>!4'
    with pytest.raises(TokenizerError, match="no bad role"):
        tok.apply_chat_template([{"role": "bad", "content": ""}], chat_template=template)


# ---- padding and truncation


def test_padding_sides_and_masks(default_tokenizer):
    tok = default_tokenizer
    short, long = tok.encode("hi"), tok.encode("hello there my friend")
    right = tok(["hi", "hello there my friend"], padding=True, return_tensors="pt")
    assert isinstance(right, BatchEncoding) and right.input_ids.shape == (2, len(long))
    assert right.input_ids[0].tolist() == short + [2] * (len(long) - len(short))
    assert right.attention_mask[0].tolist() == [1] * len(short) + [0] * (len(long) - len(short))
    assert right["input_ids"] is right.input_ids
    left = tok(["hi", "hello there my friend"], padding="longest", padding_side="left", return_tensors="pt")
    assert left.input_ids[0].tolist() == [2] * (len(long) - len(short)) + short
    assert left.attention_mask[0].tolist() == [0] * (len(long) - len(short)) + [1] * len(short)
    assert left.attention_mask[1].tolist() == [1] * len(long)
    assert left.to("cpu") is left


def test_padding_side_attribute(spm):
    spm.padding_side = "left"
    try:
        batch = spm(["hello", "hello world"], padding=True)
        assert batch.input_ids[0][0] == spm.pad_token_id == spm.eos_token_id
    finally:
        spm.padding_side = "right"


def test_max_length_padding_and_truncation(default_tokenizer):
    tok = default_tokenizer
    batch = tok(["hi", SAMPLE[1]], padding="max_length", truncation=True, max_length=6, return_tensors="pt")
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, 6)
    assert batch.input_ids[1].tolist() == tok.encode(SAMPLE[1])[:6]
    assert batch.attention_mask.sum(1).tolist() == [len(tok.encode("hi")), 6]
    assert tok(SAMPLE[1], truncation=True, max_length=4).input_ids == tok.encode(SAMPLE[1])[:4]
    single = tok("hi")
    assert single.input_ids == tok.encode("hi") and single.attention_mask == [1] * len(single.input_ids)
    assert tok("hi", return_tensors="pt").input_ids.shape == (1, len(single.input_ids))
    assert tok([], padding=True).input_ids == []


def test_truncation_defaults_to_model_max_length(spm):
    assert len(spm("hello " * 100, truncation=True).input_ids) == spm.model_max_length == 64
    unbounded = byte_level_tokenizer()  # no model_max_length: truncation=True without max_length keeps everything
    assert unbounded("abcabc", truncation=True).input_ids == unbounded.encode("abcabc")


def test_truncation_keeps_bos(spm):
    full = spm.encode("hello world hello world")
    assert full[0] == spm.bos_token_id
    assert spm("hello world hello world", truncation=True, max_length=3).input_ids == full[:3]
    no_special = spm("hello world hello world", truncation=True, max_length=2, add_special_tokens=False)
    assert no_special.input_ids == full[1:3]


# ---- streaming


@pytest.mark.parametrize("text", ["Emoji 😀🎉👍🏽 done", "我爱自然语言处理", "mixed: café 🇫🇷 ok <|im_end|>"])
def test_stream_decoder_matches_full_decode(default_tokenizer, text):
    ids = default_tokenizer.encode(text)
    stream = default_tokenizer.stream_decoder()
    pieces = [stream.step(i) for i in ids]
    assert "".join(pieces) + stream.flush() == default_tokenizer.decode(ids, skip_special_tokens=True)
    assert "\ufffd" not in "".join(pieces)


def test_stream_decoder_holds_back_incomplete_characters(default_tokenizer):
    ids = default_tokenizer.encode("a😀")
    byte_tokens = ids[1:]
    assert len(byte_tokens) > 1, "the emoji should span several byte-level tokens"
    stream = default_tokenizer.stream_decoder()
    assert stream.step(ids[0]) == "a"
    assert [stream.step(i) for i in byte_tokens[:-1]] == [""] * (len(byte_tokens) - 1)
    assert stream.flush() == "\ufffd"  # the character never completed
    assert stream.step(ids[0]) == "a"  # flush starts over


# ---- save and load


def test_save_load_round_trip_and_transformers_reads_it(default_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    default_tokenizer.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                     "special_tokens_map.json"}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["padding_side"] == "right" and config["chat_template"]
    ours = LaFormerTokenizer.from_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLE + ["  12 and\t\t34"]:
        ids = default_tokenizer.encode(text)
        assert ours.encode(text) == ids and theirs(text).input_ids == ids, text
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
        theirs.bos_token, theirs.eos_token, theirs.pad_token, theirs.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert ours.chat_template == default_tokenizer.chat_template
    for messages in CONVERSATIONS:
        assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_save_load_keeps_bos_for_transformers(spm, tmp_path):
    transformers = pytest.importorskip("transformers")
    spm.save_pretrained(tmp_path)
    ours = LaFormerTokenizer.from_pretrained(tmp_path / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["hello world", " hello  world", "héllo 你"]:
        assert ours.encode(text) == theirs(text).input_ids == spm.encode(text)
    assert ours.add_bos_token and ours.model_max_length == 64


def test_folder_without_flags_keeps_its_post_processor(spm, tmp_path):
    spm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["add_bos_token"], config["add_eos_token"]
    config["bos_token"] = {"content": "<s>", "special": True}  # the older AddedToken form
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = LaFormerTokenizer.from_pretrained(tmp_path)
    assert tok.add_bos_token and tok.bos_token == "<s>" and tok.encode("hello")[0] == 1


# ---- SentencePiece ("llama") GGUF


def test_sentencepiece_gguf_matches_transformers(spm, spm_gguf):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(spm_gguf.parent, gguf_file=spm_gguf.name)
    assert spm.encode("hello world") == [1, spm.convert_tokens_to_ids("▁hello"), spm.convert_tokens_to_ids("▁world")]
    for text in ["hello world", " hello  world", "héllo wörld 你", "hello</s>world", "", "\n", "dwell"]:
        assert spm.encode(text) == theirs(text).input_ids, text
        assert spm.decode(spm.encode(text), skip_special_tokens=True) == theirs.decode(
            theirs(text).input_ids, skip_special_tokens=True)
    assert spm.convert_ids_to_tokens(spm.encode("é", add_special_tokens=False)) == ["▁", "<0xC3>", "<0xA9>"]
    messages = [{"role": "user", "content": "hi"}]
    rendered = spm.apply_chat_template(messages, tokenize=False)
    assert rendered == theirs.apply_chat_template(messages, tokenize=False) == "<s>[user] hi</s>"


def test_sentencepiece_without_space_prefix(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "np.gguf", spm_metadata(add_bos=False, add_space_prefix=False))
    tok = LaFormerTokenizer.from_pretrained(path)
    assert tok.convert_ids_to_tokens(tok.encode("hello world")) == ["he", "llo", "▁world"]
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_pickles_for_dataloader_workers(spm):
    import pickle

    clone = pickle.loads(pickle.dumps(spm))
    assert clone.encode("hello world") == spm.encode("hello world") and clone.pad_token == spm.pad_token
    batch = pickle.loads(pickle.dumps(spm(["hello", "hello world"], padding=True, return_tensors="pt")))
    assert isinstance(batch, BatchEncoding) and batch.input_ids.shape == (2, 3)


def test_stream_decoder_byte_fallback(spm):
    ids = spm.encode("hello 你 world", add_special_tokens=False)
    stream = spm.stream_decoder()
    assert "".join(stream.step(i) for i in ids) + stream.flush() == "hello 你 world"


def byte_level_metadata(pre: str) -> dict:
    """A tiny byte-level BPE tokenizer (tokens spelled in GPT-2's byte alphabet), with control and user-defined
    tokens."""
    alphabet = list(_byte_alphabet().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "12 3", "Ċ Ċ", "Ġ Ġ", "' s"]
    tokens = alphabet + [m.replace(" ", "") for m in merges] + ["<|begin_of_text|>", "<|end_of_text|>", "<think>"]
    return dict(tokenizer_model="gpt2", tokenizer_pre=pre, token_list=tokens,
                token_types=[1] * (len(tokens) - 3) + [3, 3, 4], token_merges=merges,
                bos_token_id=len(tokens) - 3, eos_token_id=len(tokens) - 2, add_bos_token=True)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2"])
def test_byte_level_gguf_pre_tokenizers_match_transformers(tmp_path, pre, write_gguf):
    """Llama-3 splits numbers in groups of three, Qwen2 digit by digit, GPT-2 not at all."""
    transformers = pytest.importorskip("transformers")
    path = write_gguf(tmp_path / f"{pre}.gguf", byte_level_metadata(pre))
    ours = LaFormerTokenizer.from_pretrained(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the world's 12345 word\n\n  x", "  123 <think>the</think><|end_of_text|>", "héllo 你好 😀",
                 "\t\t1\r\n"]:
        assert ours.encode(text) == theirs(text).input_ids, text
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == text.replace("<|end_of_text|>", "")
    assert ours.add_bos_token and ours.encode("")[0] == ours.bos_token_id


def test_unknown_pre_tokenizer_warns(tmp_path, write_gguf):
    with pytest.warns(UserWarning, match="unknown GGUF pre-tokenizer 'mystery'"):
        LaFormerTokenizer.from_pretrained(write_gguf(tmp_path / "m.gguf", byte_level_metadata("mystery")))


# ---- errors


def test_loading_errors(tmp_path, write_gguf):
    with pytest.raises(TokenizerError, match="neither an existing path"):
        LaFormerTokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        LaFormerTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match="SentencePiece tokenizer.model"):
        LaFormerTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        LaFormerTokenizer.from_pretrained(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(TokenizerError, match="not a GGUF file"):
        LaFormerTokenizer.from_pretrained(tmp_path / "weights.bin")
    with pytest.raises(TokenizerError, match="no tokenizer metadata"):
        LaFormerTokenizer.from_pretrained(write_gguf(tmp_path / "bare.gguf", spm_metadata(tokens=False)))
    with pytest.raises(TokenizerError, match="tokenizer model 'bert'"):
        LaFormerTokenizer.from_pretrained(write_gguf(tmp_path / "bert.gguf", spm_metadata(tokenizer_model="bert")))


def test_argument_errors():
    tok = byte_level_tokenizer()
    cases = [
        (dict(text=["abc", "a"], return_tensors="pt"), "different lengths"),
        (dict(text="abc", padding="max_length"), "needs max_length"),
        (dict(text="abc", truncation=True, max_length=0), "positive int"),
        (dict(text="abc", max_length=2.5), "positive int"),
        (dict(text="abc", padding="longer"), "padding='longer'"),
        (dict(text="abc", return_tensors="np"), "return_tensors='np'"),
        (dict(text="abc", padding=True, padding_side="middle"), "'left' or 'right'"),
        (dict(text=["abc", 3]), "string or a list of strings"),
    ]
    for kwargs, message in cases:
        with pytest.raises(TokenizerError, match=message):
            tok(**kwargs)
    with pytest.raises(TokenizerError, match="encode\\(\\) takes one string"):
        tok.encode(["abc"])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([3, 99])
    with pytest.raises(TokenizerError, match="batch_decode"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.stream_decoder().step(99)
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        tok.pad_token = "<unk>"  # a token the vocabulary lacks
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TokenizerError, match="list of dicts"):
        tok.apply_chat_template("hi", chat_template="{{ messages }}")
    with pytest.raises(TokenizerError, match="does not parse"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{% for %}")


def test_truncation_too_short_for_special_tokens(spm):
    with pytest.raises(TokenizerError, match="no room for text"):
        spm("hello", truncation=True, max_length=1)


def test_padding_without_pad_token():
    tok = byte_level_tokenizer()
    tok.pad_token = None
    tok._special["eos_token"] = None
    with pytest.raises(TokenizerError, match="needs a pad token"):
        tok(["ab", "a"], padding=True)
