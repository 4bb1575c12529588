"""The package layering (model < formats/tokenizer < generation/inference < peft < training < tasks < cli/serve),
checked by import-linter with the contract in pyproject.toml, and the check shown failing on an upward import."""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "layering_fixture"


def test_laformer_keeps_its_layers(capsys):
    assert lint_imports(str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0, capsys.readouterr().out


def test_an_upward_import_breaks_the_contract(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(FIXTURE))
    assert lint_imports(str(FIXTURE / "importlinter.toml"), no_cache=True, no_logo=True) == 1
    report = capsys.readouterr().out
    assert "BROKEN" in report and "fixturepkg.model -> fixturepkg.tasks" in report

