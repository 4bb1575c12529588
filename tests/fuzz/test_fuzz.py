"""A quick sample of the fuzz campaign (bench/fuzz.py runs the full one), and one test per fixed finding."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

import fuzz.harness
from fuzz import gguf_layout
from fuzz.harness import run_cases
from fuzz.seeds import build_seeds
from laformer import LaFormerError, LaFormerForCausalLM
from laformer.errors import CheckpointError, ConfigError, TokenizerError, TrainingError
from laformer.peft import load_adapter
from laformer.tokenizer import LaFormerTokenizer
from laformer.training.data import load_classification_data, load_instruction_data


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return build_seeds(tmp_path_factory.mktemp("seeds"))


def test_a_sample_of_the_campaign_only_loads_or_raises_laformer_errors(seeds, tmp_path):
    report = run_cases(range(150), 17, seeds, tmp_path, workers=2, timeout=60, memory_mb=1024)
    counts = report.counts()
    assert sum(sum(c.values()) for c in counts.values()) == 150 and set(counts) == {"gguf", "hf", "adapter", "data"}
    assert all(c["LaFormerError"] > 0 and c["loads"] > 0 for c in counts.values())  # both sides of every loader
    assert not report.findings(), report.distinct_findings()


def test_findings_are_reported_with_their_exception_and_place(seeds, tmp_path, monkeypatch):
    def make_case(index, campaign_seed, seeds, folder):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        target = "adapter" if index == 0 else "no-such-target"
        return fuzz.harness.Case(index, "hf", "an empty config", target, str(folder))

    monkeypatch.setattr(fuzz.harness, "make_case", make_case)
    report = run_cases([0, 1], 17, seeds, tmp_path / "work", workers=1)
    assert report.counts() == {"hf": {"LaFormerError": 1, "exception": 1}}
    ((case, outcome),) = report.findings()
    assert case.index == 1 and outcome["type"] == "KeyError" and "worker.py" in outcome["where"]
    assert not (tmp_path / "work" / "cases" / "case-000001").exists()  # each case's folder is removed after it


def _huge_chat(folder, seeds):
    path = folder / "chat.jsonl"
    path.write_text(seeds["chat"].read_text() + json.dumps({"prompt": "a " * 1_000_000, "response": "y"}) + "\n")
    return "instruction", path


def _huge_text(folder, seeds):
    path = folder / "train.jsonl"
    path.write_text(seeds["jsonl"].read_text() + json.dumps({"text": "a " * 1_000_000, "label": "good"}) + "\n")
    return "classification", path


def _classifier_claiming_a_huge_hidden_size(folder, seeds):
    path = shutil.copytree(seeds["hf"], folder / "model")
    _edit_json(path / "config.json", hidden_size=2**31 - 1, head_dim=8)
    return "classifier", path


@pytest.mark.parametrize("make, outcome", [
    (_huge_chat, "loads"),  # once a crash (the tokenizer over the 1 GiB limit) or a hang
    (_huge_text, "loads"),
    (_classifier_claiming_a_huge_hidden_size, "LaFormerError"),  # once a (2, 2**31 - 1) head allocated first
], ids=["huge-chat-message", "huge-text", "classifier-huge-hidden"])
def test_findings_that_once_blew_the_memory_limit(seeds, tmp_path, monkeypatch, make, outcome):
    def make_case(index, campaign_seed, seeds, folder):
        folder.mkdir(parents=True)
        target, path = make(folder, seeds)
        return fuzz.harness.Case(index, "data", make.__name__, target, str(path))

    monkeypatch.setattr(fuzz.harness, "make_case", make_case)
    # 256 MB: a fresh worker has more headroom than one deep in a campaign; uncut, a 2M-character text takes ~700 MB
    ((_, result),) = run_cases([0], 17, seeds, tmp_path / "work", workers=1, timeout=120, memory_mb=256).results
    assert result["outcome"] == outcome, result


# ---- regressions: each input below once escaped as something other than a LaFormerError ----------------------------


def _copy(seeds, name, tmp_path):
    return shutil.copytree(seeds[name], tmp_path / name)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, message", [
    ({"vocab_size": None}, "vocab_size must be int"),
    ({"num_attention_heads": 2**63}, "between 1 and"),  # once an overflow inside torch.empty
    ({"hidden_size": "32"}, "hidden_size must be int"),
    ({"rope_theta": float("nan")}, "finite positive"),
    ({"id2label": {"x": "a"}}, "id2label keys"),
], ids=["null", "huge", "string", "nan", "label-keys"])
def test_config_fields_of_the_wrong_type_or_size_are_config_errors(seeds, tmp_path, changes, message):
    folder = _copy(seeds, "hf", tmp_path)
    _edit_json(folder / "config.json", **changes)
    with pytest.raises(ConfigError, match=message):
        LaFormerForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("content", [b"[1]", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000],
                         ids=["list", "utf16", "nesting"])
def test_config_json_that_is_not_a_utf8_json_object_is_refused(seeds, tmp_path, content):
    folder = _copy(seeds, "hf", tmp_path)
    (folder / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match="config.json"):
        LaFormerForCausalLM.from_pretrained(folder)


def test_a_shard_index_pointing_outside_the_folder_is_refused(seeds, tmp_path):
    folder = _copy(seeds, "hf_sharded", tmp_path)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = "../../etc/passwd"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="file names in the same folder"):
        LaFormerForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("changes", [{"bos_token": 1.5}, {"model_max_length": "long"}, {"add_bos_token": "yes"}],
                         ids=["bos", "max-length", "add-bos"])
def test_tokenizer_config_fields_of_the_wrong_type_are_tokenizer_errors(seeds, tmp_path, changes):
    folder = _copy(seeds, "hf", tmp_path)
    _edit_json(folder / "tokenizer_config.json", **changes)
    with pytest.raises(TokenizerError, match=next(iter(changes))):
        LaFormerTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("changes, error, message", [
    ({"target_modules": float("nan")}, ConfigError, "target_modules must be"),
    ({"lora_dropout": []}, ConfigError, "lora_dropout must be"),
    ({"peft_type": []}, ConfigError, "peft_type"),
    ({"r": 10**12}, CheckpointError, "r=1000000000000"),  # refused before a (10**12, 32) matrix is allocated
], ids=["targets", "dropout", "peft-type", "huge-rank"])
def test_adapter_configs_of_the_wrong_type_or_size_are_refused_before_allocating(seeds, tmp_path, changes, error,
                                                                                 message):
    folder = _copy(seeds, "adapter", tmp_path)
    _edit_json(folder / "adapter_config.json", **changes)
    with pytest.raises(error, match=message):
        load_adapter(LaFormerForCausalLM.from_pretrained(seeds["hf"]), folder)


def test_an_adapter_config_that_is_not_utf8_is_refused(seeds, tmp_path):
    folder = _copy(seeds, "adapter", tmp_path)
    (folder / "adapter_config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        load_adapter(LaFormerForCausalLM.from_pretrained(seeds["hf"]), folder)


def _rewrite_gguf(seed, tmp_path, mutate):
    path = tmp_path / "m.gguf"
    path.write_bytes(mutate(gguf_layout.parse(seed.read_bytes())))
    return path


def test_a_gguf_tensor_with_an_empty_dimension_is_refused(seeds, tmp_path):
    def zero_dim(layout):
        buf = bytearray(layout.data)
        struct.pack_into("<Q", buf, layout.tensors[0].fields["dims"], 0)
        return bytes(buf)

    with pytest.raises(CheckpointError, match="no empty ones"):
        LaFormerForCausalLM.from_pretrained(_rewrite_gguf(seeds["gguf_f32"], tmp_path, zero_dim))


def _dup_tensor(layout):
    tensors = [layout.raw(t) for t in layout.tensors]
    return layout.rebuild([layout.raw(r) for r in layout.kvs], tensors[:1] + tensors)


def _dup_key(layout):
    kvs = [layout.raw(r) for r in layout.kvs]
    return layout.rebuild(kvs + [kvs[-1]], [layout.raw(t) for t in layout.tensors])


def _offset(value):
    def mutate(layout):
        buf = bytearray(layout.data)
        struct.pack_into("<Q", buf, layout.tensors[1].fields["offset"], value)
        return bytes(buf)
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (_dup_tensor, "twice"), (_dup_key, "metadata key .* twice"), (_offset(1), "not a multiple of the file's alignment"),
    (_offset(0), "share bytes"),
], ids=["duplicate-tensor", "duplicate-key", "misaligned-offset", "overlapping-tensors"])
def test_ggufs_that_llama_cpp_refuses_are_refused_not_loaded_as_garbage(seeds, tmp_path, mutate, message):
    # these once loaded: the later duplicate won, or a tensor's weights were read from another tensor's bytes
    with pytest.raises(CheckpointError, match=message):
        LaFormerForCausalLM.from_pretrained(_rewrite_gguf(seeds["gguf_q8_0"], tmp_path, mutate))


def test_a_layer_count_beyond_the_weights_is_refused_before_building_the_layers(seeds, tmp_path):
    # once a hang: 2**31 - 1 decoder layers built on the meta device, one Python object each
    def many_blocks(layout):
        kvs = [gguf_layout.encode_kv(r.key, r.kind, 2**31 - 1) if r.key == "llama.block_count" else layout.raw(r)
               for r in layout.kvs]
        return layout.rebuild(kvs, [layout.raw(t) for t in layout.tensors])

    with pytest.raises(CheckpointError, match="claims 2147483647 layers"):
        LaFormerForCausalLM.from_pretrained(_rewrite_gguf(seeds["gguf_f32"], tmp_path, many_blocks))
    folder = _copy(seeds, "hf", tmp_path)
    _edit_json(folder / "config.json", num_hidden_layers=2**31 - 1)
    with pytest.raises(CheckpointError, match="no tensors for layer 2147483646"):
        LaFormerForCausalLM.from_pretrained(folder)


def test_a_gguf_token_id_of_the_wrong_type_is_refused(seeds, tmp_path):
    def float_eos(layout):
        kvs = [gguf_layout.encode_kv(r.key, 6, 1.0) if r.key == "tokenizer.ggml.eos_token_id" else layout.raw(r)
               for r in layout.kvs]
        return layout.rebuild(kvs, [layout.raw(t) for t in layout.tensors])

    path = _rewrite_gguf(seeds["gguf_q8_0"], tmp_path, float_eos)
    with pytest.raises(LaFormerError, match="eos_token_id' must be an integer"):
        LaFormerTokenizer.from_pretrained(path)


@pytest.mark.parametrize("name, content, message", [
    ("train.jsonl", b'{"text": "good", "label": "a"}\n\xff\xfe\n', "not UTF-8"),
    ("train.tsv", b"text\tlabel\ngood\xff\ta\n", "not UTF-8"),
    ("train.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
    ("train.csv", b"text,label\n" + b"a" * 200_000 + b",x\n", "not valid CSV after line 1"),
], ids=["jsonl-utf8", "tsv-utf8", "jsonl-nesting", "csv-field-limit"])
def test_unreadable_data_files_are_training_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TrainingError, match=message):
        load_classification_data(path)


def test_chat_messages_whose_content_is_not_text_are_refused(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}))
    with pytest.raises(TrainingError, match="'messages' must be a list"):
        load_instruction_data(path)


def test_a_csv_row_with_extra_fields_names_its_columns(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,labels\ngood,a,extra\n")  # the extra field lands under the key None
    with pytest.raises(TrainingError, match="has no 'label' column"):
        load_classification_data(path)
