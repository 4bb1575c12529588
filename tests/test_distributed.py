"""The Trainer under ``torchrun``: 2 CPU processes (gloo) reach the weights and the evaluation of 1 process with the
same global batch (each rank scores half of the validation set; the shares are gathered)."""

from __future__ import annotations

import textwrap

import torch
from _training_helpers import run_two_processes, sentiment_examples, tiny_classifier, tiny_tokenizer

from laformer.training import ClassificationDataset, Trainer, TrainingArguments, build_label_map

WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from test_distributed import train
    model, result = train(sys.argv[1], per_process_batch=2)
    if dist.get_rank() == 0:
        torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, sys.argv[1] + "/weights.pt")
    torch.save(result["eval"], f"{sys.argv[1]}/eval-{dist.get_rank()}.pt")
    dist.destroy_process_group()
    """
)


def train(output_dir: str, per_process_batch: int):
    texts, labels = sentiment_examples(16)
    label2id = build_label_map(labels)
    dataset = ClassificationDataset(texts, [label2id[y] for y in labels], tiny_tokenizer(), max_length=16)
    val_texts, val_labels = sentiment_examples(11, seed=1)  # odd: the ranks get unequal shares
    validation = ClassificationDataset(val_texts, [label2id[y] for y in val_labels], tiny_tokenizer(), max_length=16)
    model = tiny_classifier(seed=5)
    arguments = TrainingArguments(output_dir=output_dir, learning_rate=3e-3, max_steps=3, batch_size=per_process_batch,
                                  gradient_accumulation_steps=2, eval_batch_size=2, report_to=[], progress_bar=False)
    result = Trainer(model, arguments, dataset, validation).train()
    return model, result


def test_two_process_ddp_equals_single_process(tmp_path):
    run_two_processes(WORKER, tmp_path / "ddp")
    distributed = torch.load(tmp_path / "ddp" / "weights.pt")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, single_result = train(str(tmp_path / "single"), per_process_batch=4)
    finally:
        torch.set_num_threads(threads)
    for name, param in single.named_parameters():
        torch.testing.assert_close(distributed[name], param.detach(), rtol=1e-4, atol=1e-6)
    for rank in (0, 1):  # both ranks see the whole validation set's metrics
        evaluation = torch.load(tmp_path / "ddp" / f"eval-{rank}.pt")
        assert evaluation["accuracy"] == single_result["eval"]["accuracy"]
        assert evaluation["confusion_matrix"] == single_result["eval"]["confusion_matrix"]
        assert abs(evaluation["loss"] - single_result["eval"]["loss"]) < 1e-4
