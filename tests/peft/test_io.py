"""LoRA and AdaLoRA adapters move between laformer and Hugging Face PEFT with identical logits."""

from __future__ import annotations

import json

import pytest
import torch

from laformer import LaFormerForCausalLM, LaFormerForSequenceClassification
from laformer.peft import (
    AdaLoraConfig,
    LoraConfig,
    get_peft_model,
    load_adapter,
    peft_training_hooks,
    save_adapter,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::RuntimeWarning", "ignore::UserWarning")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOKENS = torch.tensor([[5, 17, 42, 9, 88, 3, 61, 27], [1, 2, 3, 4, 5, 6, 7, 8]])


def hf_config(**overrides):
    values = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    values.update(overrides)
    return transformers.LlamaConfig(**values)


@pytest.fixture(scope="module")
def causal_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf_causal")
    transformers.LlamaForCausalLM(hf_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("hf_cls")
    transformers.LlamaForSequenceClassification(hf_config(num_labels=3)).save_pretrained(folder)
    return folder


def hf_causal(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def train(model, steps=3, classify=False, hooks=None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for step in range(1, steps + 1):
        if classify:
            loss = model(TOKENS, labels=torch.tensor([0, 2])).loss
        else:
            loss = model(TOKENS, labels=TOKENS).loss
        if hooks is not None:
            loss = loss + hooks.regularization_loss()
        loss.backward()
        optimizer.step()
        if hooks is not None:
            hooks.on_step_end(step)
        optimizer.zero_grad()
    return model.eval()


def test_laformer_lora_loads_in_peft(causal_folder, tmp_path):
    ours = get_peft_model(LaFormerForCausalLM.from_pretrained(causal_folder),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    train(ours)
    assert ours.model.layers[0].self_attn.q_proj.lora_B.weight.abs().sum() > 0
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(causal_folder)
    theirs = peft.PeftModel.from_pretrained(hf_causal(causal_folder), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, theirs(input_ids=TOKENS).logits, atol=1e-5, rtol=0)


def test_peft_lora_loads_in_laformer(causal_folder, tmp_path):
    torch.manual_seed(2)
    theirs = peft.get_peft_model(
        hf_causal(causal_folder),
        peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj"], init_lora_weights=False),
    ).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(LaFormerForCausalLM.from_pretrained(causal_folder), tmp_path).eval()
    assert ours.model.layers[1].mlp.gate_proj.lora_B.weight.abs().sum() > 0
    with torch.no_grad():
        reference = theirs(input_ids=TOKENS).logits
        with theirs.disable_adapter():
            base = theirs(input_ids=TOKENS).logits
        assert float((reference - base).abs().max()) > 1e-3  # the adapter matters
        torch.testing.assert_close(ours(TOKENS).logits, reference, atol=1e-5, rtol=0)


def test_seq_cls_lora_with_score_head_round_trips(classifier_folder, tmp_path):
    ours = get_peft_model(LaFormerForSequenceClassification.from_pretrained(classifier_folder), LoraConfig(r=4))
    assert ours.peft_config.modules_to_save == ("score",) and ours.score.weight.requires_grad
    train(ours, classify=True)
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    base = transformers.LlamaForSequenceClassification.from_pretrained(classifier_folder, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, theirs(input_ids=TOKENS).logits, atol=1e-5, rtol=0)
    # ...and back: PEFT saves it again, laformer loads it onto a fresh classifier.
    theirs.save_pretrained(tmp_path / "theirs")
    again = load_adapter(LaFormerForSequenceClassification.from_pretrained(classifier_folder), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(TOKENS).logits, ours(TOKENS).logits, atol=1e-6, rtol=0)


def test_adalora_round_trips_through_peft(causal_folder, tmp_path):
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=4, lora_alpha=16)
    ours = get_peft_model(LaFormerForCausalLM.from_pretrained(causal_folder), config)
    train(ours, steps=4, hooks=peft_training_hooks(ours))
    ranks = peft_training_hooks(ours).current_ranks()
    assert sum(ranks.values()) <= 2 * len(ranks)
    save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"]
    theirs = peft.PeftModel.from_pretrained(hf_causal(causal_folder), tmp_path / "ours").eval()
    with torch.no_grad():
        expected = ours(TOKENS).logits
        torch.testing.assert_close(theirs(input_ids=TOKENS).logits, expected, atol=1e-5, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    again = load_adapter(LaFormerForCausalLM.from_pretrained(causal_folder), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS).logits, expected, atol=1e-5, rtol=0)


def test_adalora_rank_allocation_matches_peft_step_by_step(causal_folder, tmp_path):
    torch.manual_seed(3)
    peft_config = peft.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8, deltaT=2,
                                     target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(hf_causal(causal_folder), peft_config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_E" in name:
                p.normal_()
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(LaFormerForCausalLM.from_pretrained(causal_folder), tmp_path)
    hooks = peft_training_hooks(ours)
    their_params = {n.removeprefix("base_model.model.").removesuffix(".default"): p
                    for n, p in theirs.named_parameters() if p.requires_grad}
    our_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert their_params.keys() == our_params.keys()
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 9):
        for name, p in our_params.items():
            p.grad = torch.randn(p.shape, generator=generator)
            their_params[name].grad = p.grad.clone()
        hooks.on_step_end(step)
        theirs.base_model.update_and_allocate(step)
        for name, p in our_params.items():
            torch.testing.assert_close(p, their_params[name], atol=0, rtol=0, msg=f"{name} at step {step}")
    assert sum(hooks.current_ranks().values()) == 2 * 4
