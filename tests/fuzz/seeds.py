"""Tiny valid inputs for the fuzzer to mutate: a few kilobytes each, so a case loads in milliseconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1]


def build_seeds(root: Path) -> dict[str, Path]:
    """Write every seed under ``root``; returns name -> path."""
    if str(_TESTS) not in sys.path:  # at the end: at the front, tests/peft would hide Hugging Face's peft
        sys.path.append(str(_TESTS))
    from tiny import byte_level_tokenizer, tiny_config

    from laformer import LaFormerForCausalLM, LaFormerForSequenceClassification
    from laformer.peft import LoraConfig, get_peft_model, save_adapter

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_level_tokenizer()
    config = tiny_config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = LaFormerForCausalLM.from_config(config, seed=0)
    seeds = {"gguf_f32": model.save_gguf(root / "tiny.f32.gguf", "f32", tokenizer=tokenizer),
             "gguf_q8_0": model.save_gguf(root / "tiny.q8_0.gguf", "q8_0", tokenizer=tokenizer)}
    hf = root / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    seeds["hf"] = hf
    seeds["hf_sharded"] = _shard(hf, root / "hf_sharded")
    classifier = LaFormerForSequenceClassification.from_pretrained(hf, id2label={0: "bad", 1: "fine", 2: "good"})
    classifier.save_pretrained(root / "hf_classifier")
    tokenizer.save_pretrained(root / "hf_classifier")
    seeds["hf_classifier"] = root / "hf_classifier"
    adapted = get_peft_model(LaFormerForCausalLM.from_pretrained(hf), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    save_adapter(adapted, root / "adapter")
    seeds["adapter"] = root / "adapter"
    rows = [{"text": f"this is a {w} film", "label": w} for w in ("good", "bad", "fine", "dull")]
    seeds["jsonl"] = _write(root / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    seeds["csv"] = _write(root / "train.csv", "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    seeds["tsv"] = _write(root / "train.tsv", "text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    chats = [{"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]},
             {"prompt": "say yes", "response": "yes"}]
    seeds["chat"] = _write(root / "chat.jsonl", "".join(json.dumps(c) + "\n" for c in chats))
    return seeds


def _shard(folder: Path, out: Path) -> Path:
    """``folder``'s weights split over two safetensors files with an index, as big checkpoints are saved."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    (out / "model.safetensors").unlink()
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
