"""A fuzz worker: loads one case per request under a memory limit and reports how it ended, one JSON line each.

``python worker.py SEEDS_JSON MEMORY_MB`` reads case lines ``{"target": ..., "path": ...}`` on stdin. The import
cost (torch, laformer) is paid once per worker; each target runs once on its seed before the memory limit is set,
so the limit measures what a case allocates rather than lazy imports.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
import warnings
from pathlib import Path

import torch

from laformer import LaFormerError, LaFormerForCausalLM, LaFormerForSequenceClassification
from laformer.peft import load_adapter
from laformer.tokenizer import LaFormerTokenizer
from laformer.training.data import (ClassificationDataset, InstructionDataset, build_label_map, encode_labels,
                                    load_classification_data, load_instruction_data)

SEEDS: dict[str, Path] = {}


def _use(model: torch.nn.Module) -> None:
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long))


def load_model(path: Path) -> None:
    _use(LaFormerForCausalLM.from_pretrained(path))
    LaFormerTokenizer.from_pretrained(path)("hi there")


def load_classifier(path: Path) -> None:
    _use(LaFormerForSequenceClassification.from_pretrained(path))
    LaFormerTokenizer.from_pretrained(path)("hi there")


def load_lora(path: Path) -> None:
    _use(load_adapter(LaFormerForCausalLM.from_pretrained(SEEDS["hf"]), path))


def load_classification(path: Path) -> None:
    texts, labels = load_classification_data(path)
    ClassificationDataset(texts, encode_labels(labels, build_label_map(labels), path), _tokenizer(), max_length=64)


def load_instructions(path: Path) -> None:
    InstructionDataset(load_instruction_data(path), _tokenizer(), max_length=64)


def _tokenizer() -> LaFormerTokenizer:
    return LaFormerTokenizer.from_pretrained(SEEDS["hf"])


TARGETS = {"gguf": load_model, "hf": load_model, "classifier": load_classifier, "adapter": load_lora,
           "classification": load_classification, "instruction": load_instructions}
WARM_UP = {"gguf": "gguf_q8_0", "hf": "hf_sharded", "classifier": "hf_classifier", "adapter": "adapter",
           "classification": "csv", "instruction": "chat"}


def run(target: str, path: Path) -> dict:
    try:
        TARGETS[target](path)
    except LaFormerError as exc:
        return {"outcome": "LaFormerError", "type": type(exc).__name__, "message": str(exc)[:400]}
    except Exception as exc:  # noqa: BLE001 - anything else is what the fuzzer looks for
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if "laformer" in f.filename] or frames
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}" if ours else "?"
        memory = isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)
        return {"outcome": "memory" if memory else "exception", "type": type(exc).__name__, "where": where,
                "message": str(exc)[:400]}
    return {"outcome": "loads"}


def main() -> None:
    SEEDS.update({k: Path(v) for k, v in json.loads(Path(sys.argv[1]).read_text()).items()})
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the library prints goes to stderr, not into the protocol
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    for target, seed in WARM_UP.items():
        outcome = run(target, SEEDS[seed])
        if outcome["outcome"] != "loads":
            raise SystemExit(f"seed {seed} does not load: {outcome}")
    with open("/proc/self/status") as f:
        size_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize"))
    limit = (size_kb * 1024) + int(sys.argv[2]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    protocol.write("ready\n")
    protocol.flush()
    for line in sys.stdin:
        case = json.loads(line)
        protocol.write(json.dumps(run(case["target"], Path(case["path"]))) + "\n")
        protocol.flush()


if __name__ == "__main__":
    main()
