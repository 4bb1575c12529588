"""The package layering (model < formats/tokenizer < generation/inference < peft < training < tasks < cli/serve),
checked by import-linter with the contract in pyproject.toml, and that same contract shown failing on a copy of
the package with upward imports added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
PACKAGE = ROOT / "src" / "laformer"

# module file -> (an import of a higher layer added to it, the module it imports); the function-local one stands
# for an import hidden from a reader, which the contract must see all the same
UPWARD = {
    "model.py": ("import laformer.tasks", "laformer.tasks"),
    "errors.py": ("import laformer.config", "laformer.config"),
    "formats/gguf.py": ("def _hidden():\n    import laformer.generation", "laformer.generation"),
    "peft/lora.py": ("import laformer.training", "laformer.training"),
    "training/trainer.py": ("from laformer.cli import main", "laformer.cli"),
}


def test_laformer_keeps_its_layers(capsys):
    assert lint_imports(str(PYPROJECT), no_cache=True, no_logo=True) == 0, capsys.readouterr().out


def test_every_module_has_a_layer():
    """A module outside every layer could import anything unchecked: each top-level module or package is named."""
    contract = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"][0]
    named = {name.strip(" ()") for layer in contract["layers"] for name in layer.replace("|", ":").split(":")}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    modules |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert modules <= named, f"give these a layer in pyproject.toml: {sorted(modules - named)}"


def test_the_contract_catches_upward_imports(tmp_path):
    """pyproject.toml's own contract, run on a copy of laformer with ``UPWARD`` added: each one is reported."""
    copy = tmp_path / "src" / "laformer"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for module, (line, _) in UPWARD.items():
        with open(copy / module, "a") as file:
            file.write(f"\n\n{line}  # noqa\n")
    lint = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(sys.argv[1], no_cache=True))"
    env = {**os.environ, "PYTHONPATH": str(copy.parent)}
    done = subprocess.run([sys.executable, "-c", lint, str(PYPROJECT)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    report = done.stdout + done.stderr
    assert done.returncode == 1 and "BROKEN" in report, report
    for module, (_, imported) in UPWARD.items():
        importer = "laformer." + module.removesuffix(".py").replace("/", ".")
        assert f"{importer} -> {imported} " in report, f"{importer} -> {imported} not reported:\n{report}"
