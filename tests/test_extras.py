import pytest

from laformer.errors import LaFormerError
from laformer.extras import MissingExtraError, require


def test_require_returns_the_module():
    assert require("json", "train", "reports").dumps([1]) == "[1]"


def test_missing_module_names_the_extra():
    with pytest.raises(MissingExtraError, match=r'pip install "laformer\[serve\]"') as info:
        require("laformer_no_such_module", "serve", "laformer serve")
    assert isinstance(info.value, LaFormerError)
    assert "laformer serve needs" in str(info.value)


# ---- every command and public function that needs an extra says so (modules blocked in a subprocess) -------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from tiny import save_tiny_base, write_sentiment_jsonl  # noqa: E402

TRAIN_EXTRA = ("sklearn", "matplotlib", "tensorboard")
SERVE_EXTRA = ("fastapi", "uvicorn", "sse_starlette")
TRAIN_MESSAGE = 'pip install "laformer[train]"'


def run_without(modules, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which importing any of ``modules`` fails, as if not installed."""
    block = f"import sys\nfor name in {list(modules)!r}:\n    sys.modules[name] = None\n"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(Path(__file__).parent)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", block + code], env=env, capture_output=True, text=True, timeout=300)


def cli_without(modules, *argv) -> subprocess.CompletedProcess:
    return run_without(modules, f"from laformer.cli import main\nsys.exit(main({[str(a) for a in argv]!r}))")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("extras")
    return save_tiny_base(folder / "base"), write_sentiment_jsonl(folder / "train.jsonl", 16)


def test_every_command_parses_without_any_optional_extra():
    from laformer.cli import SUBCOMMAND_MODULES

    code = "from laformer.cli import build_parser\nparser = build_parser()\n" + "".join(
        f"try:\n    parser.parse_args([{name!r}, '--help'])\nexcept SystemExit:\n    pass\n" for name in SUBCOMMAND_MODULES)
    done = run_without(TRAIN_EXTRA + SERVE_EXTRA, code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("missing", ["sklearn", "matplotlib", "tensorboard"])
def test_finetune_without_the_train_extra_names_the_pip_install_before_training(tiny, tmp_path, missing):
    base, train = tiny
    report = ["--report-to", "tensorboard"] if missing == "tensorboard" else ["--report-to"]
    done = cli_without([missing], "finetune", "--model", base, "--train", train, "--output", tmp_path / "out",
                       "--max-steps", "2", "--batch-size", "4", "--no-progress", "--threads", "1", *report)
    assert done.returncode == 1, done.stderr[-2000:]
    assert TRAIN_MESSAGE in done.stderr and f"'{missing}" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()  # it failed before the first step


def test_public_functions_that_need_the_train_extra_name_it(tiny):
    base, train = tiny
    code = f"""
from laformer import LaFormerForSequenceClassification
from laformer.extras import MissingExtraError
from laformer.tasks import evaluate_classifier
from laformer.tokenizer import LaFormerTokenizer
from laformer.training.reporting import Reporter, classification_summary, plot_training_curves
calls = [lambda: evaluate_classifier(LaFormerForSequenceClassification.from_pretrained({str(base)!r}),
                                     LaFormerTokenizer.from_pretrained({str(base)!r}), {str(train)!r}),
         lambda: classification_summary([0], [0], ["a"]), lambda: plot_training_curves([], "x.png"),
         lambda: Reporter(".", ["tensorboard"], None, {{}})]
for call in calls:
    try:
        call()
    except MissingExtraError as exc:
        assert 'pip install "laformer[train]"' in str(exc), exc
    else:
        raise SystemExit("no MissingExtraError")
"""
    done = run_without(TRAIN_EXTRA, code)
    assert done.returncode == 0, done.stderr[-2000:]


def test_core_commands_work_without_the_train_extra(tiny):
    base, _ = tiny
    done = cli_without(TRAIN_EXTRA + SERVE_EXTRA, "generate", "good", "--model", base, "--max-new-tokens", "2")
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def finetuned_classifier(tiny):
    """A `laformer finetune`-style classifier folder, written without training (which needs the train extra)."""
    from laformer import LaFormerForSequenceClassification
    from laformer.tasks import save_finetuned
    from laformer.tokenizer import LaFormerTokenizer

    base, _ = tiny
    folder = base.parent / "classifier"
    labels = ["negative", "positive"]
    model = LaFormerForSequenceClassification.from_pretrained(base, id2label=dict(enumerate(labels)))
    save_finetuned(model, LaFormerTokenizer.from_pretrained(base), folder,
                   {"task": "classification", "method": "full", "labels": labels, "base_model": str(base)})
    return folder


@pytest.mark.parametrize("missing", ["sklearn", "matplotlib"])
def test_evaluate_a_classifier_without_the_train_extra_names_the_pip_install(tiny, finetuned_classifier, missing):
    done = cli_without([missing], "evaluate", "--model", finetuned_classifier, "--data", tiny[1])
    assert done.returncode == 1, done.stderr[-2000:]
    assert TRAIN_MESSAGE in done.stderr and f"'{missing}" in done.stderr and "Traceback" not in done.stderr


def test_classify_runs_without_any_optional_extra(tiny, finetuned_classifier):
    done = cli_without(TRAIN_EXTRA + SERVE_EXTRA, "classify", "--model", finetuned_classifier, "--text", "good film")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "positive" in done.stdout or "negative" in done.stdout


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_serve_without_the_serve_extra_names_the_pip_install_before_loading_the_model(tmp_path, missing):
    done = cli_without([missing], "serve", tmp_path / "no-such-model")  # the model is not even looked for
    assert done.returncode == 1, done.stderr[-2000:]
    assert 'pip install "laformer[serve]"' in done.stderr and f"'{missing}'" in done.stderr
    assert "Traceback" not in done.stderr and "no-such-model" not in done.stderr


def test_public_functions_that_need_the_serve_extra_name_it():
    code = """
import importlib
from laformer.extras import MissingExtraError
import laformer.serve  # load_served and ServedModel need no extra
calls = [lambda: laformer.serve.run(None), lambda: importlib.import_module("laformer.serve.app")]
for call in calls:
    try:
        call()
    except MissingExtraError as exc:
        assert 'pip install "laformer[serve]"' in str(exc), exc
    else:
        raise SystemExit("no MissingExtraError")
"""
    done = run_without(SERVE_EXTRA + ("pydantic", "starlette"), code)
    assert done.returncode == 0, done.stderr[-2000:]


def test_drawing_ama_selections_without_matplotlib_names_the_train_extra():
    code = """
from laformer.ama.recorder import SelectionRecorder
from laformer.ama.viz import selection_heatmap
from laformer.extras import MissingExtraError
try:
    selection_heatmap(SelectionRecorder(), "x.png")
except MissingExtraError as exc:
    assert 'pip install "laformer[train]"' in str(exc), exc
else:
    raise SystemExit("no MissingExtraError")
"""
    done = run_without(["matplotlib"], code)
    assert done.returncode == 0, done.stderr[-2000:]


def test_reporting_to_wandb_without_wandb_names_its_pip_install(tmp_path):
    code = f"""
from laformer.errors import LaFormerError
from laformer.training.reporting import Reporter
try:
    Reporter({str(tmp_path)!r}, ["wandb"], None, {{}})
except LaFormerError as exc:
    assert "pip install wandb" in str(exc), exc
else:
    raise SystemExit("no LaFormerError")
"""
    done = run_without(["wandb"], code)
    assert done.returncode == 0, done.stderr[-2000:]
