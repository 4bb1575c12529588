"""Parameter-efficient fine-tuning as module wrappers: LoRA, AdaLoRA, Houlsby adapters, prefix tuning.

Typical use (what ``laformer.training`` does)::

    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    print_trainable_parameters(model)
    hooks = peft_training_hooks(model)
    for step, batch in enumerate(batches, start=1):
        loss = model(**batch).loss + hooks.regularization_loss()
        loss.backward()
        optimizer.step()
        hooks.on_step_end(step)  # AdaLoRA's rank allocation reads the gradients here
        optimizer.zero_grad()
    save_adapter(model, "out/adapter")  # LoRA/AdaLoRA in Hugging Face PEFT's format
"""

from laformer.peft.adalora import AdaLoraConfig, AdaLoraHooks, SVDLinear
from laformer.peft.adapters import AdapterConfig, BottleneckAdapter
from laformer.peft.io import load_adapter, read_adapter_config, save_adapter
from laformer.peft.lora import LoraConfig, LoRALinear
from laformer.peft.prefix import PrefixAttention, PrefixConfig, PrefixEncoder
from laformer.peft.tuner import (
    NoHooks,
    PeftConfig,
    TrainingHooks,
    get_peft_model,
    merge_adapter,
    merge_and_unload,
    peft_training_hooks,
    print_trainable_parameters,
    trainable_summary,
    unload,
    unmerge_adapter,
)

__all__ = [
    "AdaLoraConfig",
    "AdaLoraHooks",
    "AdapterConfig",
    "BottleneckAdapter",
    "LoRALinear",
    "LoraConfig",
    "NoHooks",
    "PeftConfig",
    "PrefixAttention",
    "PrefixConfig",
    "PrefixEncoder",
    "SVDLinear",
    "TrainingHooks",
    "get_peft_model",
    "load_adapter",
    "merge_adapter",
    "merge_and_unload",
    "peft_training_hooks",
    "print_trainable_parameters",
    "read_adapter_config",
    "save_adapter",
    "trainable_summary",
    "unload",
    "unmerge_adapter",
]
