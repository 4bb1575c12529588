"""``AMAConfig`` (``ama/config.py``): validation, the budget's description, where it is switched on
(``set_attention``, ``from_pretrained``, the CLI), and that it stays data that no backend module imports back."""

from __future__ import annotations

import grimp
import pytest
import torch

from ama.helpers import ama_config
from laformer import ConfigError, LaFormerForCausalLM
from laformer.ama import AMAConfig
from laformer.ama.attention import AMAAttention
from laformer.attention import sdpa_attention


@pytest.mark.parametrize("fields", [
    dict(slice_len=0),
    dict(budget=100, slice_len=64),
    dict(local_window=32, slice_len=64),
    dict(budget=128, slice_len=64, local_window=128),
    dict(score="dot"),
    dict(mediation="always"),
    dict(sampling="nucleus"),
    dict(dense_layers=-1),
    dict(query_block=3),
    dict(query_block=0),
])
def test_bad_configs_raise_config_error(fields):
    with pytest.raises(ConfigError):
        AMAConfig(**fields)

def test_budget_description_and_streaming_baseline():
    assert AMAConfig(budget=1024).describe() == "budget 1024 = sinks 32 + local 512 + 15 selected x 32"
    assert AMAConfig(budget=512).local_tokens == 256 and AMAConfig(budget=64, slice_len=32).local_tokens == 32
    explicit = AMAConfig(budget=1024, local_window=128)
    assert explicit.describe() == "budget 1024 = sinks 32 + local 128 + 27 selected x 32"
    streaming = AMAConfig(budget=512, local_window=480, mediation="off")
    assert streaming.num_selected == 0

def test_from_pretrained_switches_attention_on(tmp_path):
    LaFormerForCausalLM.from_config(ama_config(), seed=0).save_pretrained(tmp_path)
    model = LaFormerForCausalLM.from_pretrained(tmp_path, attention=AMAConfig(slice_len=8, budget=32,
                                                                               local_window=16))
    assert isinstance(model.model.layers[1].self_attn.backend, AMAAttention)

def test_cli_attention_options():
    from laformer.cli import build_parser
    from laformer.cli.common import attention_config

    parser = build_parser()
    cfg = attention_config(parser.parse_args(["generate", "hi", "--attention", "ama", "--ama-budget", "512",
                                              "--ama-slice-len", "32", "--ama-mediation", "off"]))
    assert (cfg.budget, cfg.slice_len, cfg.mediation) == (512, 32, "off")
    assert attention_config(parser.parse_args(["generate", "hi"])) is None
    with pytest.raises(ConfigError):
        attention_config(parser.parse_args(["generate", "hi", "--attention", "ama", "--ama-budget", "100"]))


def test_set_attention_on_the_causal_lm_switches_every_layer_and_back(tiny_model):
    """``model.set_attention(AMAConfig(...))`` (docs/ama.md) builds one backend for all layers; generating after it
    gives what ``generate(attention=...)`` gives for one call, and None restores exact attention."""
    cfg = AMAConfig(slice_len=8, budget=32, local_window=16)
    ids = torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(4))
    per_call = tiny_model.generate(ids, max_new_tokens=6, attention=cfg)
    assert all(layer.self_attn.backend is sdpa_attention for layer in tiny_model.model.layers)  # per call only
    exact = tiny_model.generate(ids, max_new_tokens=6)
    tiny_model.set_attention(cfg)
    try:
        backends = {id(layer.self_attn.backend) for layer in tiny_model.model.layers}
        assert len(backends) == 1 and isinstance(tiny_model.model.layers[0].self_attn.backend, AMAAttention)
        assert torch.equal(tiny_model.generate(ids, max_new_tokens=6), per_call)
    finally:
        tiny_model.set_attention(None)
    assert all(layer.self_attn.backend is sdpa_attention for layer in tiny_model.model.layers)
    assert torch.equal(tiny_model.generate(ids, max_new_tokens=6), exact)
    assert not torch.equal(per_call, exact)  # the budget of 32 over 60+ tokens does change what is generated


def test_no_ama_module_imports_one_that_imports_it_back():
    """The config is plain data: the backend (``attention.py``) imports it, never the other way round, and no
    two AMA modules depend on each other."""
    graph = grimp.build_graph("laformer", cache_dir=None)
    modules = {m for m in graph.modules if m.startswith("laformer.ama.")}
    assert graph.find_shortest_chain(importer="laformer.ama.config", imported="laformer.ama.attention") is None
    cycles = [(m, n) for m in modules for n in graph.find_modules_directly_imported_by(m) & modules
              if graph.find_shortest_chain(importer=n, imported=m)]
    assert cycles == []
