"""Choosing which modules a PEFT method wraps, swapping them in place, and freezing the rest.

Target rules follow Hugging Face PEFT so that one ``adapter_config.json`` selects the same modules in both
libraries: a list of names matches a module whose dotted name equals the entry or ends in ``.entry``; a string
is a regular expression that must match the whole dotted name; ``"all-linear"`` is every linear layer but the
output head.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from laformer.errors import ConfigError

OUTPUT_HEADS = ("lm_head", "score")


def is_linear_like(module: nn.Module) -> bool:
    """Anything with ``in_features``/``out_features`` and a forward: ``nn.Linear`` or a quantized swap of it."""
    return hasattr(module, "in_features") and hasattr(module, "out_features") and not hasattr(module, "base_layer")


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def find_targets(model: nn.Module, target_modules: str | Sequence[str], method: str) -> list[str]:
    """Dotted names of the linear-like modules selected by ``target_modules``, in model order."""
    named = dict(model.named_modules())
    linear = [n for n, m in named.items() if n and is_linear_like(m)]
    if isinstance(target_modules, str) and target_modules == "all-linear":
        found = [n for n in linear if n.rsplit(".", 1)[-1] not in OUTPUT_HEADS]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ConfigError(f"{method} target_modules {target_modules!r} is not a valid regex ({exc})") from exc
        found = [n for n in named if n and pattern.fullmatch(n)]
        if not found:
            raise ConfigError(
                f"{method} target_modules regex {target_modules!r} matches no module (it must match the whole "
                f"dotted name, e.g. {linear[0]!r}); use a list of names like ['q_proj', 'v_proj'] or fix the regex"
            )
    else:
        found = []
        for key in target_modules:
            hits = [n for n in named if n and _matches(n, key)]
            if not hits:
                raise ConfigError(
                    f"{method} target module {key!r} is not in the model; available linear layers: "
                    f"{sorted({n.rsplit('.', 1)[-1] for n in linear})} (or a regex over full names)"
                )
            found.extend(hits)
        chosen = set(found)
        found = [n for n in named if n in chosen]
    wrong = [n for n in found if not is_linear_like(named[n])]
    if wrong:
        raise ConfigError(
            f"{method} can only wrap linear layers, but {wrong[0]!r} is a {type(named[wrong[0]]).__name__}; "
            "target its projections instead (e.g. 'q_proj', 'gate_proj')"
        )
    return found


def check_untied(model: nn.Module, targets: Iterable[str], method: str) -> None:
    """Refuse to add a mergeable update to a weight shared with another module (a tied ``lm_head``)."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    for name in targets:
        weight = getattr(model.get_submodule(name), "weight", None)
        if isinstance(weight, nn.Parameter) and counts.get(id(weight), 0) > 1:
            raise ConfigError(
                f"{method} cannot target {name!r}: its weight is tied to another module (tie_word_embeddings), so "
                "merging would change that module too; leave it out of target_modules"
            )


def find_modules_to_save(model: nn.Module, names: Iterable[str] | None) -> list[str]:
    """Modules trained in full next to the adapter (e.g. the classifier ``score``); missing names are skipped,
    as in PEFT (which lists both 'classifier' and 'score' for any classifier)."""
    if not names:
        return []
    return [n for n, _ in model.named_modules() if n and any(_matches(n, key) for key in names)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``name`` was, in the same train/eval mode (new modules default to train mode)."""
    parent_name, _, child = name.rpartition(".")
    new.train(model.get_submodule(name).training)
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def freeze_except(model: nn.Module, trainable: Iterable[str]) -> list[str]:
    """Freeze every parameter except those named in ``trainable``; returns the trainable names."""
    trainable = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return [name for name, _ in model.named_parameters() if name in trainable]


def parameters_under(model: nn.Module, module_names: Iterable[str]) -> list[str]:
    prefixes = tuple(f"{m}." for m in module_names)
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)] if prefixes else []
