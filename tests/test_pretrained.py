"""from_pretrained / save_pretrained dispatch on per-class attributes, so user subclasses behave as their parent."""

from __future__ import annotations

import json

import torch

from laformer import LaFormerForCausalLM, LaFormerForSequenceClassification, LaFormerModel


class MyCausalLM(LaFormerForCausalLM):
    """A user subclass adding nothing: it must save and load exactly like its parent."""


class MyClassifier(LaFormerForSequenceClassification):
    pass


def test_each_class_saves_its_transformers_architecture(tmp_path, tiny_model):
    for cls, expected in [(LaFormerModel, "LlamaModel"), (LaFormerForCausalLM, "LlamaForCausalLM"),
                          (LaFormerForSequenceClassification, "LlamaForSequenceClassification"),
                          (MyCausalLM, "LlamaForCausalLM"), (MyClassifier, "LlamaForSequenceClassification")]:
        tiny_model(model_class=cls).save_pretrained(tmp_path / cls.__name__)
        config = json.loads((tmp_path / cls.__name__ / "config.json").read_text())
        assert config["architectures"] == [expected], cls
        assert config["torch_dtype"] == "float32" and config["model_type"] == "llama"


def test_a_subclass_round_trips_and_takes_a_new_classifier_head(tmp_path, tiny_model):
    ids = torch.tensor([[3, 14, 15, 9, 26]])
    model = tiny_model(model_class=MyCausalLM, seed=3)
    model.save_pretrained(tmp_path)
    loaded = MyCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is MyCausalLM
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    classifier = MyClassifier.from_pretrained(tmp_path, labels=["a", "b", "c"])  # a causal checkpoint: new head
    assert classifier.score.weight.shape == (3, 32) and "lm_head.weight" not in classifier.state_dict()
    decoder = LaFormerModel.from_pretrained(tmp_path)
    torch.testing.assert_close(decoder(ids).last_hidden_state, model.model(ids).last_hidden_state, rtol=0, atol=0)


def test_config_dict_leaves_class_and_weight_fields_to_the_saver(tiny_config):
    data = tiny_config(id2label={0: "neg", 1: "pos"}).to_dict()
    assert "architectures" not in data and "torch_dtype" not in data
    assert data["id2label"] == {"0": "neg", "1": "pos"} and data["model_type"] == "llama"
