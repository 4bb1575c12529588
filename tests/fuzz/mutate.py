"""Fuzz cases: each is one seed input with one random mutation, written into its own folder.

Case ``i`` of a campaign depends only on (campaign seed, i), so any finding is reproduced by its number.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fuzz import gguf_layout as gl

CATEGORIES = ("gguf", "hf", "adapter", "data")
ABSURD_INTS = [0, 1, 2**31 - 1, 2**32 - 1, 2**32, 10**12, 2**62, 2**63 - 1, 2**64 - 1]
WRONG_VALUES: list[Any] = [None, "abc", "12", [], [1, 2], {}, {"a": 1}, True, False, 1.5, -1, 0, -(10**12), 10**12,
                           2**31 - 1, 2**63, 1e308, float("nan"), "😀" * 3]


@dataclass
class Case:
    index: int
    category: str
    mutation: str
    target: str
    path: str


def make_case(index: int, campaign_seed: int, seeds: dict[str, Path], folder: Path) -> Case:
    """Case ``index`` of the campaign, its input written into the new, empty ``folder``."""
    rng = random.Random(campaign_seed * 1_000_003 + index)
    category = CATEGORIES[index % len(CATEGORIES)]
    folder.mkdir(parents=True)
    target, path, mutation = _MAKERS[category](rng, seeds, folder)
    return Case(index, category, mutation, target, str(path))


# ---- GGUF -------------------------------------------------------------------------------------------------------


def _gguf(rng: random.Random, seeds: dict[str, Path], folder: Path) -> tuple[str, Path, str]:
    seed = seeds[rng.choice(["gguf_f32", "gguf_q8_0"])]
    data = seed.read_bytes()
    layout = gl.parse(data)
    name = rng.choice(list(_GGUF_MUTATIONS))
    mutated, detail = _GGUF_MUTATIONS[name](rng, layout)
    out = folder / "model.gguf"
    out.write_bytes(mutated)
    return "gguf", out, f"{name}{detail} ({seed.name})"


def _flip(rng: random.Random, data: bytes, lo: int, hi: int, count: int) -> tuple[bytes, str]:
    buf = bytearray(data)
    at = sorted(rng.randrange(lo, hi) for _ in range(count))
    for i in at:
        buf[i] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
    return bytes(buf), f" at {at}"


def _put(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


def _truncate(rng, layout):
    cut = rng.randrange(len(layout.data))
    return layout.data[:cut], f" to {cut} bytes"


def _flip_in(section: str) -> Callable:
    def mutate(rng, layout):
        lo, hi = layout.section(section)
        return _flip(rng, layout.data, lo, hi, rng.randint(1, 8))
    return mutate


def _absurd_count(rng, layout):
    field, value = rng.choice([("n_tensors", 8), ("n_kv", 16)]), rng.choice(ABSURD_INTS)
    return _put(layout.data, field[1], "<Q", value), f" {field[0]}={value}"


def _absurd_string_length(rng, layout):
    strings = [r.fields["key_length"] for r in layout.kvs] + [r.fields["value"] for r in layout.kvs if r.kind == gl.STRING]
    strings += [r.fields["name_length"] for r in layout.tensors]
    at, value = rng.choice(strings), rng.choice(ABSURD_INTS)
    return _put(layout.data, at, "<Q", value), f" at {at} = {value}"


def _absurd_array_count(rng, layout):
    arrays = [r for r in layout.kvs if r.kind == gl.ARRAY]
    record, value = rng.choice(arrays), rng.choice(ABSURD_INTS)
    return _put(layout.data, record.fields["value"] + 4, "<Q", value), f" {record.key}={value}"


def _absurd_dims(rng, layout):
    record = rng.choice(layout.tensors)
    if rng.random() < 0.3:
        value = rng.choice([0, 5, 64, 2**31, 2**32 - 1])
        return _put(layout.data, record.fields["n_dims"], "<I", value), f" n_dims={value}"
    dim = rng.randrange(record.fields["n_dims_value"])
    value = rng.choice(ABSURD_INTS + [3, 33, 64, 10**6])
    return _put(layout.data, record.fields["dims"] + 8 * dim, "<Q", value), f" dim {dim}={value}"


def _wrong_kv_type(rng, layout):
    record, kind = rng.choice(layout.kvs), rng.choice(list(range(14)) + [2**31, 2**32 - 1])
    return _put(layout.data, record.fields["type"], "<I", kind), f" {record.key}: type {record.kind}->{kind}"


def _wrong_tensor_type(rng, layout):
    record, kind = rng.choice(layout.tensors), rng.choice(list(range(42)) + [2**31])
    return _put(layout.data, record.fields["type"], "<I", kind), f" type={kind}"


def _bad_tensor_offset(rng, layout):
    record, value = rng.choice(layout.tensors), rng.choice(ABSURD_INTS + [1, 31, 33, 4096])
    return _put(layout.data, record.fields["offset"], "<Q", value), f" offset={value}"


def _bad_metadata_value(rng, layout):
    """A llama.* number set to zero, negative, huge or not-a-number, keeping its type."""
    numeric = [r for r in layout.kvs if r.kind in gl.SCALAR_FORMATS and r.key.startswith(("llama.", "general.align",
                                                                                             "tokenizer.ggml."))]
    record = rng.choice(numeric)
    fmt = gl.SCALAR_FORMATS[record.kind]
    if fmt in "fd":
        value: Any = rng.choice([0.0, -1.0, float("inf"), float("nan"), 1e30, -1e-30])
    elif fmt == "?":
        value = rng.choice([True, False])
    else:
        bits = struct.calcsize(fmt) * 8
        value = rng.choice([0, 1, 3, 2 ** (bits - 1) - 1] + ([-1, -(2 ** (bits - 1))] if fmt.islower() else [2**bits - 1]))
    kvs = [gl.encode_kv(r.key, r.kind, value) if r is record else layout.raw(r) for r in layout.kvs]
    return layout.rebuild(kvs, [layout.raw(t) for t in layout.tensors]), f" {record.key}={value}"


def _retyped_metadata_value(rng, layout):
    """A llama.* key holding a value of another type (a string, or a float where an int belongs)."""
    record = rng.choice([r for r in layout.kvs if r.key.startswith(("llama.", "general."))])
    kind, value = rng.choice([(gl.STRING, "12"), (gl.STRING, "abc"), (6, 2.5), (7, True), (12, -3.0), (4, 7)])
    kvs = [gl.encode_kv(r.key, kind, value) if r is record else layout.raw(r) for r in layout.kvs]
    return layout.rebuild(kvs, [layout.raw(t) for t in layout.tensors]), f" {record.key}={value!r}"


def _records(rng, layout):
    """Drop, duplicate or rename whole key/value or tensor records."""
    kvs, tensors = [layout.raw(r) for r in layout.kvs], [layout.raw(t) for t in layout.tensors]
    action = rng.choice(["drop_kv", "dup_kv", "drop_tensor", "dup_tensor", "rename_tensor"])
    if action in ("drop_kv", "dup_kv"):
        i = rng.randrange(len(kvs))
        kvs[i:i + 1] = [] if action == "drop_kv" else [kvs[i], kvs[i]]
        return layout.rebuild(kvs, tensors), f" {action} {layout.kvs[i].key}"
    i = rng.randrange(len(tensors))
    if action == "drop_tensor":
        del tensors[i]
    elif action == "dup_tensor":
        tensors.insert(i, tensors[i])
    else:
        name = rng.choice(["blk.99.attn_q.weight", "blk.0.attn_q.bias", "output.weight", "token_embd.weight", "x" * 300])
        length = struct.unpack_from("<Q", tensors[i])[0]
        tensors[i] = gl.encode_string(name) + tensors[i][8 + length:]
    return layout.rebuild(kvs, tensors), f" {action} #{i}"


def _not_gguf(rng, layout):
    body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    return rng.choice([b"", b"GGUF", b"GGUF" + body, body, b"not a model\n" * 10]), ""


_GGUF_MUTATIONS = {
    "truncate": _truncate, "flip_header": _flip_in("header"), "flip_metadata": _flip_in("metadata"),
    "flip_tensor_info": _flip_in("tensor_info"), "flip_data": _flip_in("data"), "absurd_count": _absurd_count,
    "absurd_string_length": _absurd_string_length, "absurd_array_count": _absurd_array_count,
    "absurd_dims": _absurd_dims, "wrong_kv_type": _wrong_kv_type, "wrong_tensor_type": _wrong_tensor_type,
    "bad_tensor_offset": _bad_tensor_offset, "bad_metadata_value": _bad_metadata_value,
    "retyped_metadata_value": _retyped_metadata_value, "records": _records, "not_gguf": _not_gguf,
}


# ---- JSON and safetensors files shared by HF and adapter folders ----------------------------------------------------


def _mutate_json(rng: random.Random, path: Path, keys: list[str] | None = None) -> str:
    text = path.read_text()
    action = rng.choice(["value", "value", "value", "drop", "truncate", "not_object", "bytes"])
    if action == "truncate":
        path.write_text(text[: rng.randrange(len(text))])
        return "truncate"
    if action == "not_object":
        value = rng.choice([[], [1], "text", 3, None])
        path.write_text(json.dumps(value))
        return f"replaced by {value!r}"
    if action == "bytes":
        path.write_bytes(b"\xff\xfe" + text.encode()[: rng.randrange(1, len(text))] + b"\x80\x00")
        return "invalid utf-8"
    data = json.loads(text)
    key = rng.choice(keys or sorted(data))
    if action == "drop":
        data.pop(key, None)
        path.write_text(json.dumps(data))
        return f"drop {key}"
    value = rng.choice(WRONG_VALUES)
    data[key] = value
    path.write_text(json.dumps(data))  # NaN and 2**63 are written as JSON readers accept them (Python's do)
    return f"{key}={value!r}"


def _mutate_safetensors(rng: random.Random, path: Path) -> str:
    data = path.read_bytes()
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    action = rng.choice(["truncate", "header_length", "flip_header", "dtype", "shape", "offsets", "drop", "absurd_shape"])
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    if action == "truncate":
        cut = rng.randrange(len(data))
        path.write_bytes(data[:cut])
        return f"truncate to {cut}"
    if action == "header_length":
        value = rng.choice(ABSURD_INTS + [length - 1, length + 1, len(data)])
        path.write_bytes(struct.pack("<Q", value) + data[8:])
        return f"header length {value}"
    if action == "flip_header":
        flipped, detail = _flip(rng, data, 8, 8 + length, rng.randint(1, 6))
        path.write_bytes(flipped)
        return "flip header" + detail
    entry = header[name]
    if action == "dtype":
        entry["dtype"] = rng.choice(["F99", "I4", "", 7, None, "F64", "BOOL", "U8"])
    elif action == "shape":
        entry["shape"] = rng.choice([[], [0], [-1], [1, 2, 3], entry["shape"][::-1], [s + 1 for s in entry["shape"]],
                                     "12", [1.5]])
    elif action == "absurd_shape":
        entry["shape"] = rng.choice([[10**12], [2**31, 2**31], [2**62, 4], [2**64 - 1]])
    elif action == "offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, start], [0, 10**12], [start, end + 1], [-1, end], [start], "x"])
    else:
        del header[name]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return f"{action} {name}"


def _wrong_shape(rng: random.Random, path: Path) -> str:
    """A valid safetensors file in which one tensor has another shape."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    name = rng.choice(sorted(tensors))
    shape = list(tensors[name].shape)
    dim = rng.randrange(len(shape))
    shape[dim] = rng.choice([1, shape[dim] + 1, shape[dim] * 2])
    tensors[name] = torch.zeros(shape, dtype=tensors[name].dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return f"{name} shape {tuple(shape)}"


# ---- Hugging Face folders ---------------------------------------------------------------------------------------

CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "id2label", "label2id",
               "model_type", "hidden_act", "laformer", "rope_parameters", "initializer_range"]


def _hf(rng: random.Random, seeds: dict[str, Path], folder: Path) -> tuple[str, Path, str]:
    """A mutated causal LM folder (loaded as a causal LM or as a classifier with a new head), or a classifier's."""
    seed = rng.choice(["hf", "hf", "hf", "hf_sharded", "hf_classifier"])
    sharded, target = seed == "hf_sharded", "hf" if seed != "hf_classifier" and rng.random() < 0.7 else "classifier"
    out = folder / "model"
    shutil.copytree(seeds[seed], out)
    weights = sorted(out.glob("*.safetensors"))
    action = rng.choice(["config", "config", "config", "safetensors", "safetensors", "wrong_shape", "tokenizer",
                         "missing"] + (["index"] if sharded else []))
    if action == "config":
        detail = _mutate_json(rng, out / "config.json", CONFIG_KEYS)
    elif action == "safetensors":
        file = rng.choice(weights)
        detail = f"{file.name}: {_mutate_safetensors(rng, file)}"
    elif action == "wrong_shape":
        detail = _wrong_shape(rng, rng.choice(weights))
    elif action == "tokenizer":
        file = out / rng.choice(["tokenizer.json", "tokenizer_config.json"])
        detail = f"{file.name}: {_mutate_json(rng, file)}"
    elif action == "index":
        detail = _mutate_index(rng, out / "model.safetensors.index.json")
    else:
        victim = rng.choice(weights + [out / "config.json", out / "tokenizer.json"])
        victim.unlink()
        detail = f"without {victim.name}"
    return target, out, f"{action}: {detail} ({seed} as {target})"


def _mutate_index(rng: random.Random, path: Path) -> str:
    index = json.loads(path.read_text())
    names = sorted(index["weight_map"])
    choice = rng.choice(["missing_shard", "escape", "not_dict", "drop_map", "value_type", "json"])
    if choice == "missing_shard":
        index["weight_map"][rng.choice(names)] = "model-00009-of-00009.safetensors"
    elif choice == "escape":
        index["weight_map"][rng.choice(names)] = rng.choice(["../../../etc/passwd", "/etc/hostname", ""])
    elif choice == "not_dict":
        index["weight_map"] = rng.choice([[], "x", 3, None])
    elif choice == "drop_map":
        del index["weight_map"]
    elif choice == "value_type":
        index["weight_map"][rng.choice(names)] = rng.choice([3, None, [], {}])
    else:
        return "index: " + _mutate_json(rng, path)
    path.write_text(json.dumps(index))
    return f"index {choice}"


# ---- PEFT adapter folders ---------------------------------------------------------------------------------------

ADAPTER_KEYS = ["r", "lora_alpha", "lora_dropout", "target_modules", "peft_type", "bias", "modules_to_save",
                "fan_in_fan_out", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                "init_lora_weights", "task_type", "base_model_name_or_path", "inference_mode"]


def _adapter(rng: random.Random, seeds: dict[str, Path], folder: Path) -> tuple[str, Path, str]:
    out = folder / "adapter"
    shutil.copytree(seeds["adapter"], out)
    weights = out / "adapter_model.safetensors"
    action = rng.choice(["config", "config", "config", "safetensors", "wrong_shape", "missing"])
    if action == "config":
        detail = _mutate_json(rng, out / "adapter_config.json", ADAPTER_KEYS)
    elif action == "safetensors":
        detail = _mutate_safetensors(rng, weights)
    elif action == "wrong_shape":
        detail = _wrong_shape(rng, weights)
    else:
        victim = rng.choice([weights, out / "adapter_config.json"])
        victim.unlink()
        detail = f"without {victim.name}"
    return "adapter", out, f"{action}: {detail}"


# ---- training and evaluation data -------------------------------------------------------------------------------


def _data(rng: random.Random, seeds: dict[str, Path], folder: Path) -> tuple[str, Path, str]:
    seed = seeds[rng.choice(["jsonl", "csv", "tsv", "chat"])]
    target = "instruction" if seed.name.startswith("chat") else "classification"
    out = folder / seed.name
    text = seed.read_text()
    action = rng.choice(["truncate", "flip", "bytes", "line", "line", "field", "field", "huge", "nesting", "empty"])
    if action == "truncate":
        cut = rng.randrange(len(text))
        out.write_text(text[:cut])
        detail = f"to {cut}"
    elif action == "flip":
        flipped, detail = _flip(rng, text.encode(), 0, len(text.encode()), rng.randint(1, 6))
        out.write_bytes(flipped)
    elif action == "bytes":
        garbage = rng.choice([b"\xff\xfe\x00", b"\x00" * 5, b"\xef\xbb\xbf", b"\r\r\n", b'"', b"\x80abc"])
        at = rng.randrange(len(text))
        out.write_bytes(text[:at].encode() + garbage + text[at:].encode())
        detail = f"{garbage!r} at {at}"
    elif action == "line":
        line = rng.choice(["{", "[]", "3", "null", '"text"', "{}", '{"text": "x"}', '{"label": "good"}', ",,,,",
                           "a\tb\tc\td", '"unterminated', "text"])
        lines = text.splitlines()
        lines.insert(rng.randrange(1, len(lines) + 1), line)
        out.write_text("\n".join(lines) + "\n")
        detail = repr(line)
    elif action == "field" and seed.suffix == ".jsonl":
        rows = [json.loads(x) for x in text.splitlines()]
        row = rng.choice(rows)
        key = rng.choice(sorted(row) + ["role", "content"])
        if key in ("role", "content") and "messages" in row:
            row["messages"][rng.randrange(len(row["messages"]))][key] = rng.choice(WRONG_VALUES)
        else:
            row[key] = rng.choice(WRONG_VALUES)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        detail = f"{key} changed"
    elif action in ("field", "huge"):
        size = rng.choice([200_000, 2_000_000])
        big = "a " * (size // 2) if action == "huge" else "x"
        out.write_text(text + (json.dumps({"text": big, "label": "good", "prompt": big, "response": "y"}) + "\n"
                               if seed.suffix == ".jsonl" else f'"{big}",good\n'))
        detail = f"{len(big)} characters"
    elif action == "nesting":
        depth = rng.choice([1000, 100_000])
        out.write_text(text + "[" * depth + "]" * depth + "\n")
        detail = f"depth {depth}"
    else:
        out.write_text(rng.choice(["", "\n", "text,label\n", "\ufeff"]))
        detail = "empty"
    return target, out, f"{action} {detail} ({seed.name})"


_MAKERS = {"gguf": _gguf, "hf": _hf, "adapter": _adapter, "data": _data}
