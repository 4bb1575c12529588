"""FSDP2 under ``torchrun``: 2 CPU processes (gloo), each holding half of every parameter, train a LoRA classifier to
the same weights and validation metrics as 1 process with the same global batch, and keep the best checkpoint."""

from __future__ import annotations

import textwrap

import pytest
import torch
from _training_helpers import run_two_processes, sentiment_examples, tiny_classifier, tiny_tokenizer

from laformer.errors import TrainingError
from laformer.peft import LoraConfig, get_peft_model
from laformer.training import ClassificationDataset, Trainer, TrainingArguments, build_label_map
from laformer.training.distributed import check_strategy

WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from training.test_distributed import train
    from laformer.training.trainer import trainable_state
    model, result = train(sys.argv[1], per_process_batch=2, distributed="fsdp")
    weights = trainable_state(model)  # gathered from the shards, on every rank
    assert any(hasattr(p, "device_mesh") for p in model.parameters())  # it was sharded
    if dist.get_rank() == 0:
        torch.save(weights, sys.argv[1] + "/weights.pt")
    torch.save(result["eval"], f"{sys.argv[1]}/eval-{dist.get_rank()}.pt")
    dist.destroy_process_group()
    """
)


def train(output_dir: str, per_process_batch: int, distributed: str = "ddp"):
    texts, labels = sentiment_examples(16)
    label2id = build_label_map(labels)
    dataset = ClassificationDataset(texts, [label2id[y] for y in labels], tiny_tokenizer(), max_length=16)
    val_texts, val_labels = sentiment_examples(11, seed=1)  # odd: the ranks get unequal shares
    validation = ClassificationDataset(val_texts, [label2id[y] for y in val_labels], tiny_tokenizer(), max_length=16)
    torch.manual_seed(0)
    model = get_peft_model(tiny_classifier(seed=5), LoraConfig(r=4, target_modules="all-linear"))
    arguments = TrainingArguments(output_dir=output_dir, learning_rate=3e-2, max_steps=4, batch_size=per_process_batch,
                                  gradient_accumulation_steps=2, eval_batch_size=2, eval_steps=2, report_to=[],
                                  progress_bar=False, distributed=distributed)
    result = Trainer(model, arguments, dataset, validation).train()
    return model, result


def test_two_process_fsdp_equals_single_process(tmp_path):
    run_two_processes(WORKER, tmp_path / "fsdp")
    sharded = torch.load(tmp_path / "fsdp" / "weights.pt")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, single_result = train(str(tmp_path / "single"), per_process_batch=4)
    finally:
        torch.set_num_threads(threads)
    trained = {n: p.detach() for n, p in single.named_parameters() if p.requires_grad}
    assert set(sharded) == set(trained)
    for name, param in trained.items():
        torch.testing.assert_close(sharded[name], param, rtol=1e-4, atol=1e-5, msg=name)
    for rank in (0, 1):
        evaluation = torch.load(tmp_path / "fsdp" / f"eval-{rank}.pt")
        assert evaluation["confusion_matrix"] == single_result["eval"]["confusion_matrix"]
        assert abs(evaluation["loss"] - single_result["eval"]["loss"]) < 1e-4


def test_unknown_strategy_and_fgm_with_fsdp_are_clear_errors():
    with pytest.raises(TrainingError, match="unknown"):
        check_strategy("zero3", 0.0)
    with pytest.raises(TrainingError, match="FGM"):
        check_strategy("fsdp", 0.1)
