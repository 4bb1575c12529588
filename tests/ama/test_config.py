"""``AMAConfig`` (``ama/config.py``): validation, the budget's description, and where it is switched on."""

from __future__ import annotations

import pytest

from ama.helpers import ama_config
from laformer import ConfigError, LaFormerForCausalLM
from laformer.ama import AMAConfig
from laformer.ama.attention import AMAAttention


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
