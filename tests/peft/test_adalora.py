"""AdaLoRA: SVD-form adapters, orthogonality penalty, the cubic budget schedule and rank reallocation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from laformer import ConfigError
from laformer.peft import (
    AdaLoraConfig,
    NoHooks,
    LoraConfig,
    SVDLinear,
    get_peft_model,
    load_adapter,
    merge_adapter,
    peft_training_hooks,
    save_adapter,
    unmerge_adapter,
)

TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8], [9, 7, 9, 3, 2, 38, 4, 6]])


def adalora(**overrides) -> AdaLoraConfig:
    values = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=15, lora_alpha=8)
    values.update(overrides)
    return AdaLoraConfig(**values)


def fake_gradients(model, generator) -> None:
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=generator)


def test_wraps_in_svd_form_and_starts_at_base(tiny_model):
    model = tiny_model()
    with torch.no_grad():
        before = model(TOKENS).logits
    get_peft_model(model, adalora())
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, SVDLinear)
    assert (q.lora_A.shape, q.lora_E.shape, q.lora_B.shape) == ((6, 32), (6, 1), (32, 6))
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_E", "lora_B"}
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, before, atol=0, rtol=0)  # Λ = 0 at init


def test_orthogonality_penalty_zero_for_orthogonal_init_positive_otherwise(tiny_model):
    orthogonal = get_peft_model(tiny_model(), adalora(init_lora_weights="orthogonal"))
    assert peft_training_hooks(orthogonal).regularization_loss().item() < 1e-5
    gaussian = get_peft_model(tiny_model(), adalora())
    hooks = peft_training_hooks(gaussian)
    penalty = hooks.regularization_loss()
    assert penalty.item() > 0.5
    penalty.backward()
    q = gaussian.model.layers[0].self_attn.q_proj
    assert q.lora_A.grad.abs().sum() > 0 and q.lora_B.grad.abs().sum() > 0
    weighted = get_peft_model(tiny_model(), adalora(orth_reg_weight=1.0))
    assert peft_training_hooks(weighted).regularization_loss().item() == pytest.approx(2 * penalty.item(), rel=1e-4)


def test_budget_follows_cubic_schedule(tiny_model):
    model = get_peft_model(tiny_model(), adalora())
    hooks = peft_training_hooks(model)
    assert (hooks.init_budget, hooks.target_budget) == (24, 8)  # 4 layers x init_r 6 -> 4 x target_r 2
    budgets = [hooks.budget(step)[0] for step in range(16)]
    assert budgets[:3] == [24, 24, 24]  # warm-up: steps <= tinit
    assert budgets[12:] == [8, 8, 8, 8]  # final phase: steps > total_step - tfinal
    assert all(a >= b for a, b in zip(budgets, budgets[1:])) and 8 < budgets[5] < 24
    assert budgets[3] == int(16 * (1 - 1 / 10) ** 3 + 8)


def test_rank_reallocation_reaches_target_and_keeps_it(tiny_model):
    model = get_peft_model(tiny_model(), adalora())
    hooks = peft_training_hooks(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in hooks.layers.values():
            layer.lora_E.normal_(generator=generator)  # as after some training
    totals = []
    for step in range(1, 16):
        fake_gradients(model, generator)
        hooks.on_step_end(step)
        with torch.no_grad():  # an optimizer step could revive masked values; the final phase re-masks them
            for layer in hooks.layers.values():
                layer.lora_E.add_(0.01)
        totals.append(sum(hooks.current_ranks().values()))
        if hooks.rank_pattern:
            assert sum(sum(keep) for keep in hooks.rank_pattern.values()) <= hooks.budget(step)[0]
    assert totals[0] == 24 and totals[1] == 24  # warm-up leaves every triplet
    hooks.on_step_end(15)
    assert sum(hooks.current_ranks().values()) == 8
    assert sum(sum(keep) for keep in model.peft_config.rank_pattern.values()) == 8


def test_merge_unmerge_exact(tiny_model):
    model = get_peft_model(tiny_model(), adalora())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SVDLinear):
                m.lora_E.normal_()
        adapted = model(TOKENS).logits
        merge_adapter(model)
        torch.testing.assert_close(model(TOKENS).logits, adapted, atol=1e-5, rtol=0)
        unmerge_adapter(model)
        torch.testing.assert_close(model(TOKENS).logits, adapted, atol=1e-6, rtol=0)


def test_save_prunes_to_rank_pattern_and_loads_back(tmp_path, tiny_model):
    model = get_peft_model(tiny_model(), adalora(tinit=0, tfinal=0, total_step=3))
    hooks = peft_training_hooks(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in hooks.layers.values():
            layer.lora_E.normal_(generator=generator)
    for step in range(1, 4):
        fake_gradients(model, generator)
        hooks.on_step_end(step)
    save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    ranks = [t.shape[0] for name, t in tensors.items() if name.endswith("lora_E")]
    assert sum(ranks) == 8
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["init_r"] == 6 and saved["target_r"] == 2
    fresh = load_adapter(tiny_model(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(TOKENS).logits, model(TOKENS).logits, atol=1e-6, rtol=0)
    hooks = peft_training_hooks(fresh)  # pruned at load: allocation is over, further steps change nothing
    fake_gradients(fresh, generator)
    hooks.on_step_end(3)
    save_adapter(fresh, tmp_path / "again")  # a loaded (already pruned) adapter saves unchanged
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in tensors.items()}


def test_schedule_errors(tiny_model):
    with pytest.raises(ConfigError, match="target_r <= init_r"):
        AdaLoraConfig(init_r=4, target_r=8)
    with pytest.raises(ConfigError, match="no budgeting phase"):
        AdaLoraConfig(tinit=5, tfinal=5, total_step=10)
    with pytest.raises(ConfigError, match="'gaussian' or 'orthogonal'"):
        AdaLoraConfig(init_lora_weights="pissa")
    model = get_peft_model(tiny_model(), AdaLoraConfig(init_r=4, target_r=2))
    hooks = peft_training_hooks(model)
    with pytest.raises(ConfigError, match="total_step"):
        hooks.on_step_end(1)
    hooks.set_total_step(10)
    hooks.on_step_end(1)


def test_other_methods_have_no_op_hooks(tiny_model):
    hooks = peft_training_hooks(get_peft_model(tiny_model(), LoraConfig()))
    assert isinstance(hooks, NoHooks) and hooks.regularization_loss().item() == 0.0
    hooks.on_step_end(1)


def test_hooks_state_round_trip_resumes_identically(tiny_model):
    generator = torch.Generator().manual_seed(4)
    runs = []
    for resume in (False, True):
        model = get_peft_model(tiny_model(), adalora())
        hooks = peft_training_hooks(model)
        with torch.no_grad():
            for layer in hooks.layers.values():
                layer.lora_E.copy_(torch.arange(6.0)[:, None] + 1)
        generator.manual_seed(4)
        for step in range(1, 9):
            if resume and step == 5:
                state, weights = hooks.state_dict(), {n: p.detach().clone() for n, p in model.named_parameters()}
                model = get_peft_model(tiny_model(), adalora())
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        p.copy_(weights[n])
                hooks = peft_training_hooks(model)
                hooks.load_state_dict(state)
            fake_gradients(model, generator)
            hooks.on_step_end(step)
        runs.append(hooks.rank_pattern)
    assert runs[0] == runs[1]
