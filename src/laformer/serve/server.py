"""Loading what ``laformer serve`` serves and running it under uvicorn."""

from __future__ import annotations

from pathlib import Path

from laformer.errors import ConfigError
from laformer.extras import require
from laformer.serve.served import CAUSAL_LM, ServedModel, default_name


def load_served(model: str, *, adapter: str | None = None, dtype: str = "float32", quantize: str | None = None,
                attention=None, name: str | None = None, **limits) -> ServedModel:
    """A registry name, GGUF file, Hugging Face folder or ``laformer finetune`` folder, ready to serve.

    ``adapter``: a PEFT adapter folder put on ``model`` (LoRA/AdaLoRA merged into the weights, so decoding runs
    the fast step). ``limits`` are ``ServedModel.start``'s ``max_batch``, ``max_length`` and ``max_queue``.
    """
    from laformer.model import LaFormerForCausalLM
    from laformer.tasks import META_NAME, load_finetuned
    from laformer.tokenizer import LaFormerTokenizer

    task, classify_max_length = CAUSAL_LM, None
    finetuned = (Path(model) / META_NAME).is_file()
    if finetuned:
        if adapter:
            raise ConfigError(f"{model} is a `laformer finetune` folder, which carries its own weights; drop "
                              "--adapter or pass the base model with it")
        net, tokenizer, meta = load_finetuned(model, dtype)
        task, classify_max_length = meta["task"], meta.get("max_length")
        net = _merged(net) if task == CAUSAL_LM else net
    else:
        net = LaFormerForCausalLM.from_pretrained(model, dtype, quantize=None if adapter else quantize)
        tokenizer = LaFormerTokenizer.from_pretrained(model)
        if adapter:
            from laformer.peft import load_adapter

            net = _merged(load_adapter(net, adapter))
    if quantize and (adapter or finetuned):  # after merging: a plain model loads quantized directly
        from laformer.quantization import quantize_model

        quantize_model(net, quantize)
    if attention is not None:
        net.decoder.set_attention(attention)
    net.eval()
    return ServedModel.start(name or default_name(model), net, tokenizer, task=task,
                             classify_max_length=classify_max_length, **limits)


def _merged(model):
    """LoRA/AdaLoRA folded into the weights (other adapter methods stay attached and decode on the PyTorch step)."""
    from laformer.peft import merge_and_unload

    if getattr(model, "peft_config", None) is None or model.peft_config.peft_type not in ("LORA", "ADALORA"):
        return model
    return merge_and_unload(model).eval()


def run(served: ServedModel, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C); the scheduler thread stops with the server."""
    uvicorn = require("uvicorn", "serve", "laformer serve")
    from laformer.serve.app import create_app

    uvicorn.run(create_app(served, api_key), host=host, port=port, log_level=log_level)
