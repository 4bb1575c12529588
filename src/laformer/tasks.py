"""Task recipes: fine-tune a classifier or an instruction-following model into a self-contained folder,
load it back, classify texts and evaluate. The CLI's finetune/classify/evaluate commands are thin faces
over these functions.

An output folder holds ``laformer_finetune.json`` (task, method, base model, labels), the tokenizer files,
either full weights (``config.json`` + ``model.safetensors``, a Hugging Face folder) or a PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors`` with the classifier head), and the run's
``metrics.json``, plots and TensorBoard events.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from laformer.errors import TokenizerError, TrainingError
from laformer.formats.registry import DEFAULT_MODEL
from laformer.training.arguments import TrainingArguments

META_NAME = "laformer_finetune.json"
METHODS = ("lora", "adalora", "adapter", "prefix", "full")
TASKS = ("classification", "causal-lm")


def peft_config(method: str, **options: Any):
    """The PEFT config for ``method`` (None for full fine-tuning); ``options`` are that config's fields."""
    if method not in METHODS:
        raise TrainingError(f"unknown fine-tuning method {method!r}; use one of {METHODS}")
    if method == "full":
        return None
    from laformer import peft

    cls = {"lora": peft.LoraConfig, "adalora": peft.AdaLoraConfig, "adapter": peft.AdapterConfig,
           "prefix": peft.PrefixConfig}[method]
    fields = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in options.items() if k in fields and v is not None})


def prepare_model(model: torch.nn.Module, method: str, **options: Any) -> tuple[torch.nn.Module, Any]:
    """Attach the PEFT method (or unfreeze everything for ``full``); returns the model and its training hooks."""
    config = peft_config(method, **options)
    if config is None:
        for param in model.parameters():
            param.requires_grad_(True)
        return model, None
    from laformer import peft

    model = peft.get_peft_model(model, config)
    return model, peft.peft_training_hooks(model)


def finetune_classification(
    train_path: str | Path,
    args: TrainingArguments,
    *,
    model_name: str | Path = DEFAULT_MODEL,
    validation_path: str | Path | None = None,
    method: str = "lora",
    peft_options: dict[str, Any] | None = None,
    text_column: str = "text",
    label_column: str = "label",
    max_length: int | None = None,
    preset: str = "default",
    augment: Any = None,
    back_translate_count: int = 0,
    resume: bool | str = False,
) -> dict[str, Any]:
    """Fine-tune ``model_name`` as a sequence classifier; the folder ``args.output_dir`` gets everything.

    ``max_length`` None: chosen from the training texts' token lengths by the ``preset``'s percentile and cap."""
    from laformer.model import LaFormerForSequenceClassification
    from laformer.tokenizer import LaFormerTokenizer
    from laformer.training import ClassificationDataset, Trainer, build_label_map, load_classification_data
    from laformer.training.data import encode_labels, encode_texts
    from laformer.training.recipes import choose_max_length, get_preset

    tokenizer = LaFormerTokenizer.from_pretrained(model_name)
    texts, labels = load_classification_data(train_path, text_column, label_column)
    label2id = build_label_map(labels)
    train_ids = encode_labels(labels, label2id, train_path)
    if back_translate_count:
        texts, train_ids = add_back_translations(model_name, tokenizer, texts, train_ids, back_translate_count)
    if max_length is None:
        recipe = get_preset(preset)
        lengths = [len(ids) for ids in encode_texts(tokenizer, texts, max_length=recipe.length_cap)]
        max_length = choose_max_length(lengths, recipe.length_percentile, recipe.length_cap)
    train = ClassificationDataset(texts, train_ids, tokenizer, max_length, augment=augment, seed=args.seed)
    evaluation = None
    if validation_path is not None:
        val_texts, val_labels = load_classification_data(validation_path, text_column, label_column)
        evaluation = ClassificationDataset(val_texts, encode_labels(val_labels, label2id, validation_path), tokenizer, max_length)
    id2label = {i: name for name, i in label2id.items()}
    model = LaFormerForSequenceClassification.from_pretrained(model_name, id2label=id2label,
                                                              pad_token_id=tokenizer.pad_token_id)
    model, hooks = prepare_model(model, method, **(peft_options or {}))
    result = Trainer(model, args, train, evaluation, hooks=hooks).train(resume_from=resume)
    save_finetuned(model, tokenizer, args.output_dir, {
        "task": "classification", "method": method, "base_model": str(model_name), "labels": list(id2label.values()),
        "max_length": max_length, "text_column": text_column, "label_column": label_column,
    })
    return result


def finetune_causal_lm(
    train_path: str | Path,
    args: TrainingArguments,
    *,
    model_name: str | Path = DEFAULT_MODEL,
    validation_path: str | Path | None = None,
    method: str = "lora",
    peft_options: dict[str, Any] | None = None,
    max_length: int = 512,
    resume: bool | str = False,
) -> dict[str, Any]:
    """Instruction-tune on ``{"prompt","response"}`` or ``{"messages"}`` rows, the loss on responses only."""
    from laformer.model import LaFormerForCausalLM
    from laformer.tokenizer import LaFormerTokenizer
    from laformer.training import InstructionDataset, Trainer, load_instruction_data

    tokenizer = LaFormerTokenizer.from_pretrained(model_name)
    train = InstructionDataset(load_instruction_data(train_path), tokenizer, max_length)
    evaluation = None
    if validation_path is not None:
        evaluation = InstructionDataset(load_instruction_data(validation_path), tokenizer, max_length)
    model = LaFormerForCausalLM.from_pretrained(model_name, pad_token_id=tokenizer.pad_token_id)
    model, hooks = prepare_model(model, method, **(peft_options or {}))
    result = Trainer(model, args, train, evaluation, hooks=hooks).train(resume_from=resume)
    save_finetuned(model, tokenizer, args.output_dir, {
        "task": "causal-lm", "method": method, "base_model": str(model_name), "max_length": max_length,
    })
    return result


def add_back_translations(
    model_name: str | Path, tokenizer: Any, texts: list[str], labels: list[int], count: int
) -> tuple[list[str], list[int]]:
    """The data plus back-translated paraphrases of its first ``count`` examples, made by the base model."""
    from laformer.model import LaFormerForCausalLM
    from laformer.training.augment import back_translate

    generator = LaFormerForCausalLM.from_pretrained(model_name)
    paraphrases = back_translate(generator, tokenizer, texts[:count])
    return texts + paraphrases, labels + labels[:count]


def save_finetuned(model: torch.nn.Module, tokenizer: Any, output_dir: str | Path, meta: dict[str, Any]) -> None:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if getattr(model, "peft_config", None) is not None:
        from laformer.peft import save_adapter

        save_adapter(model, output_dir)
    else:
        model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / META_NAME).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def load_finetuned(path: str | Path, dtype: torch.dtype | str = torch.float32) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, meta) from a folder written by ``finetune_*``."""
    from laformer.model import LaFormerForCausalLM, LaFormerForSequenceClassification
    from laformer.tokenizer import LaFormerTokenizer

    path = Path(path)
    meta_path = path / META_NAME
    if not meta_path.is_file():
        raise TrainingError(f"{path} is not a fine-tuned model folder (no {META_NAME}); pass the --output folder "
                            "of `laformer finetune`")
    meta = json.loads(meta_path.read_text())
    cls = LaFormerForSequenceClassification if meta["task"] == "classification" else LaFormerForCausalLM
    tokenizer = LaFormerTokenizer.from_pretrained(path)
    if meta["method"] == "full":
        model = cls.from_pretrained(path, dtype)
    else:
        from laformer.peft import load_adapter

        overrides = {"id2label": dict(enumerate(meta["labels"]))} if meta["task"] == "classification" else {}
        model = load_adapter(cls.from_pretrained(meta["base_model"], dtype, **overrides), path)
    model.tokenizer = tokenizer
    return model.eval(), tokenizer, meta


@torch.no_grad()
def classify(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16, max_length: int | None = None,
    bf16: bool | None = False,
) -> list[dict[str, Any]]:
    """For each text: ``{"label", "score", "probabilities": {label: p}}`` from a sequence classifier.

    ``bf16`` True: under bfloat16 autocast; None: so where the hardware runs it natively (twice as fast there)."""
    from laformer.training.data import PaddingCollator, encode_texts
    from laformer.training.recipes import native_bf16

    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise TokenizerError("classify needs a tokenizer: pass tokenizer=..., or load the model with "
                             "laformer.tasks.load_finetuned, which attaches one")
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise TrainingError("no texts to classify; pass at least one")
    names = [model.config.id2label[i] for i in range(model.config.num_labels)] if model.config.id2label else None
    names = names or [str(i) for i in range(model.config.num_labels)]
    ids = encode_texts(tokenizer, texts, max_length=max_length or None)
    collate = PaddingCollator(pad_token_id=tokenizer.pad_token_id or 0)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    results: list[dict[str, Any]] = [{} for _ in ids]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    autocast = native_bf16() if bf16 is None else bf16
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([{"input_ids": ids[i]} for i in chunk])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).logits
        probs = logits.float().softmax(-1)
        for i, row in zip(chunk, probs.cpu()):
            best = int(row.argmax())
            results[i] = {"label": names[best], "score": float(row[best]),
                          "probabilities": {name: float(p) for name, p in zip(names, row)}}
    model.train(was_training)
    return results


def evaluate_classifier(
    model: torch.nn.Module, tokenizer: Any, data_path: str | Path, text_column: str = "text",
    label_column: str = "label", batch_size: int = 16, max_length: int | None = None, bf16: bool | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1, the classification report and confusion matrix on a labelled file; ``bf16`` None scores
    under the autocast the classification recipe trains and validates with (:func:`classify`)."""
    from laformer.training.data import encode_labels, load_classification_data
    from laformer.training.reporting import classification_summary, require_train_extra

    require_train_extra("evaluate_classifier")
    texts, labels = load_classification_data(data_path, text_column, label_column)
    label2id = {name: i for i, name in model.config.id2label.items()} if model.config.id2label else {}
    truth = encode_labels(labels, {str(k): v for k, v in label2id.items()}, data_path)
    predictions = classify(model, tokenizer, texts, batch_size, max_length, bf16)
    preds = [label2id[p["label"]] for p in predictions]
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return classification_summary(truth, preds, names)


@torch.no_grad()
def evaluate_causal_lm(model: torch.nn.Module, tokenizer: Any, data_path: str | Path, batch_size: int = 8,
                       max_length: int = 512) -> dict[str, float]:
    """Response-token loss and perplexity on instruction data."""
    import math

    from laformer.training.data import InstructionDataset, PaddingCollator, load_instruction_data
    from laformer.training.trainer import count_targets

    dataset = InstructionDataset(load_instruction_data(data_path), tokenizer, max_length)
    collate = PaddingCollator(pad_token_id=tokenizer.pad_token_id or 0)
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        n = count_targets(batch["labels"])
        total, count = total + model(**batch).loss.item() * n, count + n
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
