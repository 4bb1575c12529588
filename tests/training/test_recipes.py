"""The classification recipe's pieces: presets, the data-driven max length, the warm-up + cosine schedule, the
evaluation rhythm, early stopping and the best checkpoint by validation macro-F1; then the default recipe end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import save_tiny_base, sentiment_examples, tiny_classifier, tiny_tokenizer, write_sentiment_jsonl

from laformer.cli import main
from laformer.errors import TrainingError
from laformer.peft import LoraConfig, get_peft_model
from laformer.training import ClassificationDataset, Trainer, build_label_map
from laformer.training.recipes import (
    PRESETS,
    choose_max_length,
    classification_arguments,
    get_preset,
    lora_options,
    native_bf16,
)
from laformer.training.schedules import LRSchedule
from laformer.training.trainer import evaluation_points

pytestmark = pytest.mark.usefixtures("one_thread")


def dataset(n: int, seed: int = 0, flip: bool = False) -> ClassificationDataset:
    texts, labels = sentiment_examples(n, seed)
    label2id = build_label_map(["negative", "positive"])
    ids = [1 - label2id[y] if flip else label2id[y] for y in labels]
    return ClassificationDataset(texts, ids, tiny_tokenizer(), max_length=16)


def quiet(tmp_path, preset="default", **overrides):
    return classification_arguments(str(tmp_path), preset, report_to=[], progress_bar=False, **overrides)


# -- choices made from the data ------------------------------------------------------------------------

def test_max_length_covers_the_percentile_not_the_outlier():
    lengths = [10] * 90 + [40] * 9 + [3000]
    assert choose_max_length(lengths, percentile=0.95, cap=256) == 40
    assert choose_max_length(lengths, percentile=1.0, cap=256) == 256  # the cap wins over a 3,000-token outlier
    assert choose_max_length([2, 3], percentile=0.95, cap=256, floor=8) == 8
    with pytest.raises(TrainingError, match="no examples"):
        choose_max_length([])


def test_presets_order_cost_and_capacity():
    fast, default, best = (get_preset(n) for n in ("fast", "default", "best"))
    assert fast.epochs < default.epochs < best.epochs
    assert best.lora_r > fast.lora_r and best.target_modules == "all-linear" and best.train_norms
    assert "input_layernorm" in lora_options("best")["modules_to_save"]
    assert lora_options("default")["modules_to_save"] == ("score",)
    with pytest.raises(TrainingError, match="unknown preset"):
        get_preset("medium")
    assert set(PRESETS) == {"fast", "default", "best"}


def test_default_arguments_are_epoch_based_and_select_by_macro_f1(tmp_path):
    args = quiet(tmp_path)
    assert args.max_steps == -1 and args.num_epochs == get_preset("default").epochs
    assert args.metric_for_best_model == "macro_f1" and args.load_best_model_at_end
    assert args.early_stopping_patience == get_preset("default").early_stopping_patience
    assert quiet(tmp_path, learning_rate=0.5).learning_rate == 0.5  # overrides win


def test_bf16_autocast_where_the_hardware_runs_it_natively(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for avx512_bf16, amx, expected in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert native_bf16() is expected and quiet(tmp_path).bf16 is expected
    assert quiet(tmp_path, bf16=True).bf16  # an explicit choice wins


def test_long_texts_are_cut_at_the_default_cap():
    # Chinese reviews through a byte-level BPE: a 95th percentile of 422 tokens. Batches of 16 at 256 tokens
    # peaked at 9.8 GB; the default caps at 128 (transformers' usual classification length).
    default = get_preset("default")
    lengths = list(range(50, 450))
    assert choose_max_length(lengths, default.length_percentile, default.length_cap) == default.length_cap == 128


def test_warmup_then_cosine_to_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = LRSchedule(optimizer, "cosine", total_steps=100, warmup_steps=10)
    rates = [schedule.multiplier(step) for step in range(101)]
    assert rates[0] < rates[5] < rates[9] <= 1.0  # rising during warm-up
    assert rates[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # then decaying
    assert rates[55] == pytest.approx(0.5, abs=0.01) and rates[100] == pytest.approx(0.0, abs=1e-9)


# -- the trainer's side of the recipe -------------------------------------------------------------------

def test_default_recipe_warms_up_then_decays_by_cosine(tmp_path):
    # The learning rates the trainer actually used under the default preset: a constant rate, a linear decay or no
    # warm-up each fail one of these.
    preset = get_preset("default")
    args = quiet(tmp_path, batch_size=4, logging_steps=1, early_stopping_patience=None)
    Trainer(tiny_classifier(), args, dataset(64)).train()
    rates = [row["train/lr"] for row in json.loads((tmp_path / "metrics.json").read_text())["history"]
             if "train/lr" in row]
    total = 3 * 16
    warmup = math.ceil(preset.warmup_ratio * total)
    assert len(rates) == total and warmup >= 2
    assert rates[0] < rates[warmup - 1] <= preset.learning_rate  # rising during warm-up
    peak = rates.index(max(rates))
    assert max(rates) == pytest.approx(preset.learning_rate, rel=0.05)
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1 :]))  # then only decaying
    quarter = peak + (total - peak) // 4
    assert rates[quarter] / max(rates) > 0.8  # cosine: ~0.85 a quarter of the way down (linear would be 0.75)
    assert rates[-1] < 0.02 * preset.learning_rate

def test_evaluations_spread_over_each_epoch(tmp_path):
    args = quiet(tmp_path, num_epochs=2, batch_size=8, evals_per_epoch=2, early_stopping_patience=None,
                 learning_rate=1e-3, bucket_by_length=False)
    result = Trainer(tiny_classifier(), args, dataset(32), dataset(16, seed=1)).train()
    evaluated = [row["step"] for row in json.loads((tmp_path / "metrics.json").read_text())["history"]
                 if "eval/macro_f1" in row]
    assert evaluated[:4] == [2, 4, 6, 8] and result["step"] == 8
    assert "best_macro_f1" in result  # classification selects by macro-F1 unless told otherwise


def test_evaluations_never_come_a_step_apart_at_an_epochs_end(tmp_path):
    # 5 steps an epoch, 2 evaluations: after steps 3 and 5, not 2, 4 and 5 (a stride of 2 plus the epoch's end),
    # whose back-to-back pair early stopping would count as two stalls.
    args = quiet(tmp_path, num_epochs=2, batch_size=8, evals_per_epoch=2, early_stopping_patience=None,
                 bucket_by_length=False)
    Trainer(tiny_classifier(), args, dataset(40), dataset(16, seed=1)).train()
    evaluated = [row["step"] for row in json.loads((tmp_path / "metrics.json").read_text())["history"]
                 if "eval/macro_f1" in row]
    assert evaluated == [3, 5, 8, 10]
    assert evaluation_points(13, 2) == {7, 13} and evaluation_points(4, 1) == {4}


def test_early_stopping_ends_a_run_that_no_longer_improves(tmp_path):
    # A rate too small to change a prediction: the metric never improves after the first evaluation.
    args = quiet(tmp_path, num_epochs=10, batch_size=8, evals_per_epoch=1, learning_rate=1e-12,
                 warmup_ratio=0.0, early_stopping_patience=2)
    result = Trainer(tiny_classifier(), args, dataset(32), dataset(16, seed=1)).train()
    assert result["stopped_early"] and result["step"] == 3 * 4  # 1 best evaluation + 2 without improvement


def test_best_checkpoint_is_the_one_kept(tmp_path):
    # Validation labels are the training labels flipped: the more the model learns, the worse it scores, so the
    # best checkpoint is an early one and the final weights must be that checkpoint's, not the last step's.
    args = quiet(tmp_path, num_epochs=6, batch_size=8, evals_per_epoch=1, learning_rate=2e-2, warmup_ratio=0.0,
                 early_stopping_patience=None)
    model = tiny_classifier(seed=3)
    trainer = Trainer(model, args, dataset(48), dataset(24, seed=1, flip=True))
    result = trainer.train()
    history = [row["eval/macro_f1"] for row in json.loads((tmp_path / "metrics.json").read_text())["history"]
               if "eval/macro_f1" in row]
    assert result["best_step"] < result["step"] and history[-1] < max(history)
    assert trainer.evaluate()["macro_f1"] == pytest.approx(max(history))  # the weights are the best ones
    assert result["eval"]["macro_f1"] == pytest.approx(max(history))
    assert result["best_macro_f1"] == pytest.approx(max(history))


# -- end to end ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base"))


def test_default_recipe_learns_a_separable_task_with_no_flags(base, tmp_path):
    write_sentiment_jsonl(tmp_path / "train.jsonl", 512)
    write_sentiment_jsonl(tmp_path / "validation.jsonl", 64, seed=1)
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(base), "--train", str(tmp_path / "train.jsonl"), "--validation",
                 str(tmp_path / "validation.jsonl"), "--output", str(out), "--no-progress", "--report-to",
                 "--threads", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["accuracy"] >= 0.85  # the majority class scores 0.5
    meta = json.loads((out / "laformer_finetune.json").read_text())
    longest = max(len(tiny_tokenizer().encode(t).ids) for t in sentiment_examples(512)[0])
    assert meta["max_length"] <= longest  # chosen from the data, not a constant 128


def test_best_preset_adapts_every_projection_and_trains_norms():
    options = {k: v for k, v in lora_options("best").items() if k != "init_r"}
    model = get_peft_model(tiny_classifier(), LoraConfig(**options))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any("input_layernorm" in n for n in trainable) and any(n.startswith("score") for n in trainable)
