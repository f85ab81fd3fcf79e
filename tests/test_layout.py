"""Module boundaries: serving and the retrieval library never pull in the pipeline."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["entityclip.serving.app", "entityclip.serving.deploy", "entityclip.serving.client",
                                    "entityclip.retrieval", "entityclip.vector_index"])
def test_serving_modules_do_not_import_the_pipeline(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m in ('entityclip.pipeline', 'entityclip.cli')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_importing_the_package_stays_light():
    code = "import sys, entityclip; print('torch' in sys.modules, 'faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


@pytest.mark.parametrize("module", ["entityclip.models.entityclip", "entityclip.models.checkpoint", "entityclip.train.loop",
                                    "entityclip.train.trainer", "entityclip.tracking"])
def test_models_training_and_tracking_do_not_import_serving(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('entityclip.serving')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
