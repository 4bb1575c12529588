"""The Trainer under ``torchrun``: 2 CPU processes (gloo) reach the weights and validation metrics of 1 process with
the same global batch (each rank scores part of the validation set; the shares are gathered). DDP trains the whole
classifier; FSDP2, each rank holding half of every parameter, trains a LoRA one and keeps the best checkpoint."""

from __future__ import annotations

import textwrap

import pytest
import torch
from tiny import run_two_processes, sentiment_examples, tiny_classifier, tiny_tokenizer

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
    strategy = sys.argv[1].rsplit("/", 1)[-1]
    model, result = train(sys.argv[1], per_process_batch=2, distributed=strategy)
    weights = trainable_state(model)  # gathered from the shards, on every rank
    assert (strategy == "fsdp") == any(hasattr(p, "device_mesh") for p in model.parameters())  # sharded or not
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
    model, learning_rate = tiny_classifier(seed=5), 3e-3
    if distributed == "fsdp":  # LoRA, at the ten times larger learning rate it is usually given
        model, learning_rate = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")), 3e-2
    arguments = TrainingArguments(output_dir=output_dir, learning_rate=learning_rate, max_steps=4,
                                  batch_size=per_process_batch, gradient_accumulation_steps=2, eval_batch_size=2,
                                  eval_steps=2, report_to=[], progress_bar=False, distributed=distributed)
    result = Trainer(model, arguments, dataset, validation).train()
    return model, result


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(strategy, tmp_path):
    run_two_processes(WORKER, tmp_path / strategy)
    distributed = torch.load(tmp_path / strategy / "weights.pt")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, single_result = train(str(tmp_path / "single"), per_process_batch=4, distributed=strategy)
    finally:
        torch.set_num_threads(threads)
    trained = {n: p.detach() for n, p in single.named_parameters() if p.requires_grad}
    assert set(distributed) == set(trained)
    for name, param in trained.items():
        torch.testing.assert_close(distributed[name], param, rtol=1e-4, atol=1e-5, msg=name)
    for rank in (0, 1):  # both ranks see the whole validation set's metrics
        evaluation = torch.load(tmp_path / strategy / f"eval-{rank}.pt")
        assert evaluation["accuracy"] == single_result["eval"]["accuracy"]
        assert evaluation["confusion_matrix"] == single_result["eval"]["confusion_matrix"]
        assert abs(evaluation["loss"] - single_result["eval"]["loss"]) < 1e-4


def test_unknown_strategy_and_fgm_with_fsdp_are_clear_errors():
    with pytest.raises(TrainingError, match="unknown"):
        check_strategy("zero3", 0.0)
    with pytest.raises(TrainingError, match="FGM"):
        check_strategy("fsdp", 0.1)
