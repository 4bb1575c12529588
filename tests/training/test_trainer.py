"""The Trainer on tiny models: it learns, resumes exactly, accumulates exactly, and fails clearly."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import sentiment_examples, tiny_causal_lm, tiny_classifier, tiny_tokenizer

from laformer.errors import TrainingError
from laformer.peft import AdaLoraConfig, LoraConfig, get_peft_model, peft_training_hooks
from laformer.training import ClassificationDataset, InstructionDataset, Trainer, TrainingArguments, build_label_map
from laformer.training.schedules import LRSchedule, build_optimizer


pytestmark = pytest.mark.usefixtures("one_thread")


def sentiment_dataset(n: int = 48, seed: int = 0, **kwargs) -> ClassificationDataset:
    texts, labels = sentiment_examples(n, seed)
    label2id = build_label_map(labels)
    return ClassificationDataset(texts, [label2id[y] for y in labels], tiny_tokenizer(), max_length=16, **kwargs)


def args(tmp_path, **overrides) -> TrainingArguments:
    fields = dict(output_dir=str(tmp_path / "out"), learning_rate=3e-3, max_steps=6, batch_size=4, progress_bar=False,
                  report_to=[], logging_steps=2, save_total_limit=None)
    fields.update(overrides)
    return TrainingArguments(**fields)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_classifier_learns_and_writes_reports(tmp_path):
    model = tiny_classifier()
    run = args(tmp_path, max_steps=40, batch_size=8, eval_steps=20, weight_decay=0.01, report_to=["tensorboard"],
               lr_scheduler="linear", warmup_steps=4)
    result = Trainer(model, run, sentiment_dataset(64), sentiment_dataset(32, seed=1)).train()
    assert result["eval"]["accuracy"] >= 0.9
    out = tmp_path / "out"
    for name in ("metrics.json", "classification_report.txt", "confusion_matrix.png", "training_curves.png"):
        assert (out / name).stat().st_size > 0
    assert list((out / "runs").glob("events.out.tfevents.*"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_step"] in (20, 40) and any("train/loss" in h for h in metrics["history"])
    assert "positive" in (out / "classification_report.txt").read_text()


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    def run(folder, resume=False):
        model = tiny_classifier(seed=1)
        arguments = args(folder, max_steps=6, save_steps=2, dropout=0.1, lr_scheduler="cosine", warmup_steps=2)
        Trainer(model, arguments, sentiment_dataset(20)).train(resume_from=resume)
        return trainable(model)

    expected = run(tmp_path / "a")
    original = Trainer._optimizer_step
    calls = {"n": 0}

    def crash_at_step_5(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *a, **k)

    monkeypatch.setattr(Trainer, "_optimizer_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "out" / "checkpoints").iterdir())
    assert checkpoints == ["step-0000002", "step-0000004"]
    resumed = run(tmp_path / "b", resume=True)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0)


def test_corrupt_and_partial_checkpoints_are_refused(tmp_path):
    Trainer(tiny_classifier(), args(tmp_path, max_steps=2, save_steps=1), sentiment_dataset(8)).train()
    folder = tmp_path / "out" / "checkpoints" / "step-0000002"
    with open(folder / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(TrainingError, match="corrupt"):
        Trainer(tiny_classifier(), args(tmp_path, max_steps=4), sentiment_dataset(8)).train(resume_from=folder)
    (tmp_path / "out" / "checkpoints" / "step-0000001" / "manifest.json").unlink()
    with pytest.raises(TrainingError, match="partial"):
        Trainer(tiny_classifier(), args(tmp_path, max_steps=4), sentiment_dataset(8)).train(
            resume_from=tmp_path / "out" / "checkpoints" / "step-0000001")
    with pytest.raises(TrainingError, match="nothing to resume"):
        Trainer(tiny_classifier(), args(tmp_path / "new"), sentiment_dataset(8)).train(resume_from=True)
    Trainer(tiny_classifier(), args(tmp_path / "fresh", max_steps=1), sentiment_dataset(8)).train()
    other = tiny_classifier(labels=("a", "b", "c"))  # a head of another shape
    with pytest.raises(TrainingError, match="shape"):
        Trainer(other, args(tmp_path, max_steps=4), sentiment_dataset(8)).train(
            resume_from=tmp_path / "fresh" / "out" / "checkpoints" / "step-0000001")


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # Uneven micro-batches (5 + 3 examples) must still give the same step as one batch of 8.
    dataset = sentiment_dataset(8)
    big, accumulated = tiny_classifier(seed=2), tiny_classifier(seed=2)
    Trainer(big, args(tmp_path / "a", max_steps=1, batch_size=8), dataset).train()
    trainer = Trainer(accumulated, args(tmp_path / "b", max_steps=1, batch_size=5, gradient_accumulation_steps=2), dataset)
    trainer.train()
    for name, value in trainable(big).items():
        # Summation order differs between the two, so allow float32 rounding of the summed gradients.
        torch.testing.assert_close(trainable(accumulated)[name], value, rtol=1e-4, atol=1e-5)


def test_early_stopping_and_plateau_schedule(tmp_path):
    model = tiny_classifier()
    run = args(tmp_path, learning_rate=1e-9, max_steps=50, eval_steps=2, early_stopping_patience=2,
               metric_for_best_model="loss", lr_scheduler="plateau", plateau_patience=1)
    result = Trainer(model, run, sentiment_dataset(16), sentiment_dataset(8, seed=1)).train()
    assert result["stopped_early"] and result["step"] < 50

    optimizer = build_optimizer(tiny_classifier(), 1.0, 0.0)
    schedule = LRSchedule(optimizer, "plateau", total_steps=10, plateau_factor=0.5, plateau_patience=2)
    for metric in (0.5, 0.6, 0.4, 0.4):
        schedule.on_evaluate(metric)
    schedule.apply(5)
    assert schedule.last_lr == 0.5  # two evaluations without improvement halve the rate


def test_schedules_warm_up_then_decay():
    optimizer = build_optimizer(tiny_classifier(), 1.0, 0.1)
    cosine = LRSchedule(optimizer, "cosine", total_steps=10, warmup_steps=2)
    rates = [cosine.multiplier(s) for s in range(10)]
    assert rates[0] < rates[1] < rates[2] == 1.0 and rates[-1] < 0.1
    linear = LRSchedule(optimizer, "linear", total_steps=10, warmup_steps=0)
    assert linear.multiplier(5) == pytest.approx(0.5)


def test_weight_decay_spares_norms_and_embeddings():
    model = tiny_classifier()
    groups = build_optimizer(model, 1e-3, 0.1).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [names[id(p)] for p in groups[0]["params"]]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert not any("norm" in n or "embed" in n for n in decayed) and any("q_proj" in n for n in decayed)


def test_options_fgm_bf16_checkpointing_dropout_bucketing_run(tmp_path):
    dataset = sentiment_dataset(16)
    before = tiny_classifier()
    for options in ({"fgm_epsilon": 1.0}, {"bf16": True}, {"gradient_checkpointing": True, "dropout": 0.2},
                    {"bucket_by_length": True}):
        model = tiny_classifier()
        Trainer(model, args(tmp_path, max_steps=2, **options), dataset).train()
        assert any(not torch.equal(p, before.state_dict()[n]) for n, p in model.state_dict().items())
        assert not model.decoder.gradient_checkpointing
        assert not any(m._forward_hooks for m in model.modules())  # dropout hooks removed


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    a, b = tiny_classifier(seed=3), tiny_classifier(seed=3)
    Trainer(a, args(tmp_path / "a", max_steps=2), sentiment_dataset(8)).train()
    Trainer(b, args(tmp_path / "b", max_steps=2, gradient_checkpointing=True), sentiment_dataset(8)).train()
    for name, value in trainable(a).items():
        torch.testing.assert_close(trainable(b)[name], value)


def test_causal_lm_instruction_tuning_lowers_the_loss(tmp_path):
    conversations = [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]] * 8
    dataset = InstructionDataset(conversations, tiny_tokenizer())
    model = tiny_causal_lm()
    trainer = Trainer(model, args(tmp_path, max_steps=30, learning_rate=1e-2), dataset, dataset)
    before = trainer.evaluate()["loss"]
    result = trainer.train()
    assert result["eval"]["loss"] < 0.3 * before and "perplexity" in result["eval"]


def test_bad_arguments_and_data(tmp_path):
    with pytest.raises(TrainingError, match="lr_scheduler"):
        args(tmp_path, lr_scheduler="exponential")
    with pytest.raises(TrainingError, match="report_to"):
        args(tmp_path, report_to=["mlflow"])
    model = tiny_classifier()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable"):
        Trainer(model, args(tmp_path), sentiment_dataset(8))
    with pytest.raises(TrainingError, match="metric_for_best_model"):
        Trainer(tiny_classifier(), args(tmp_path, max_steps=1, metric_for_best_model="bleu"),
                sentiment_dataset(8), sentiment_dataset(4)).train()


def test_peft_lora_training_and_hooks(tmp_path):
    model = get_peft_model(tiny_classifier(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trainable(model)
    Trainer(model, args(tmp_path, max_steps=4), sentiment_dataset(16), hooks=peft_training_hooks(model)).train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, before[n]) for n, p in trainable(model).items() if "lora_B" in n)

    adalora = get_peft_model(tiny_classifier(), AdaLoraConfig(init_r=4, target_r=2, total_step=6,
                                                              target_modules=["q_proj", "v_proj"]))
    hooks = peft_training_hooks(adalora)
    layers = len(hooks.current_ranks())  # 2 layers x (q_proj, v_proj)
    assert hooks.init_budget == 4 * layers and hooks.rank_pattern is None
    Trainer(adalora, args(tmp_path / "ada", max_steps=6), sentiment_dataset(16), hooks=hooks).train()
    # the trainer called the hooks: the final step cut the budget from init_r to target_r per layer on average
    assert sum(sum(keep) for keep in hooks.rank_pattern.values()) == 2 * layers
    assert 0 < sum(hooks.current_ranks().values()) <= 2 * layers  # the pruned triplets are zero
    assert adalora.peft_config.rank_pattern == hooks.rank_pattern and len(hooks.rank_pattern) == layers


def test_classifier_padding_tail_changes_nothing():
    # The classifier drops all-padding columns; logits and gradients must equal those of unpadded rows.
    model = tiny_classifier()
    ids = torch.randint(2, 20, (3, 12))
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, length in enumerate((5, 3, 7)):
        mask[row, :length] = 1
    padded = model(ids, mask, labels=torch.tensor([0, 1, 0]))
    alone = torch.cat([model(ids[i : i + 1, : int(mask[i].sum())]).logits for i in range(3)])
    torch.testing.assert_close(padded.logits, alone)
    torch.testing.assert_close(model(ids, mask, output_hidden_states=True).logits, padded.logits)
    padded.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_adalora_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    """AdaLoRA's importance scores and rank masks live in the hooks: a resume must restore them too."""

    def run(folder, resume=False):
        model = get_peft_model(tiny_classifier(seed=1), AdaLoraConfig(
            init_r=6, target_r=1, tinit=0, tfinal=0, deltaT=1, beta1=0.3, beta2=0.3, total_step=6,
            target_modules=["q_proj", "v_proj"]))
        hooks = peft_training_hooks(model)
        Trainer(model, args(folder, max_steps=6, save_steps=2), sentiment_dataset(20), hooks=hooks).train(
            resume_from=resume)
        return trainable(model)

    expected = run(tmp_path / "a")
    original = Trainer._optimizer_step
    calls = {"n": 0}

    def crash_at_step_4(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *a, **k)

    monkeypatch.setattr(Trainer, "_optimizer_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    resumed = run(tmp_path / "b", resume=True)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0)


def test_weights_and_biases_receives_the_run(tmp_path, monkeypatch):
    """With ``report_to=["wandb"]`` the run's config, training and evaluation scalars reach W&B, then it finishes."""
    import importlib.machinery
    import sys
    import types

    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class Run:
        def log(self, metrics, step):
            calls["log"].append((step, dict(metrics)))

        def finish(self):
            calls["finish"].append(True)

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = args(tmp_path, max_steps=4, eval_steps=2, report_to=["wandb"], run_name="sst-lora")
    Trainer(tiny_classifier(), run, sentiment_dataset(16), sentiment_dataset(8, seed=1)).train()
    assert calls["init"][0]["name"] == "sst-lora" and calls["init"][0]["config"]["max_steps"] == 4
    logged = {name for _, metrics in calls["log"] for name in metrics}
    assert {"train/loss", "train/lr", "eval/accuracy", "eval/loss"} <= logged
    assert [step for step, m in calls["log"] if "eval/accuracy" in m] == [2, 4]
    assert calls["finish"] == [True]


def test_weights_and_biases_missing_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(TrainingError, match="pip install wandb"):
        Trainer(tiny_classifier(), args(tmp_path, report_to=["wandb"]), sentiment_dataset(8)).train()
