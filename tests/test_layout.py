"""Module boundaries: serving and the retrieval library never pull in the pipeline."""

import ast
import subprocess
import sys

import pytest


def entityclip_modules_loaded_by(module: str, prefixes: tuple[str, ...]) -> list[str]:
    """The entityclip modules starting with one of `prefixes` that importing `module` loads, in a fresh interpreter."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))"
    return ast.literal_eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


@pytest.mark.parametrize("module", ["entityclip.serving.app", "entityclip.serving.deploy", "entityclip.serving.client",
                                    "entityclip.retrieval", "entityclip.vector_index"])
def test_serving_modules_do_not_import_the_pipeline(module):
    assert entityclip_modules_loaded_by(module, ("entityclip.pipeline", "entityclip.cli")) == []


def test_importing_the_package_stays_light():
    code = "import sys, entityclip; print('torch' in sys.modules, 'faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


@pytest.mark.parametrize("module", ["entityclip.models.entityclip", "entityclip.models.checkpoint", "entityclip.train.loop",
                                    "entityclip.train.trainer", "entityclip.tracking"])
def test_models_training_and_tracking_do_not_import_serving(module):
    assert entityclip_modules_loaded_by(module, ("entityclip.serving",)) == []
