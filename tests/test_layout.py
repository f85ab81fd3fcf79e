"""Module boundaries: serving and the retrieval library never pull in the pipeline."""

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

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


def modules_setup_checks() -> list[str]:
    """The entityclip modules that scripts/setup imports to check an install (a clean clone runs those lines)."""
    setup = (Path(__file__).parents[1] / "scripts" / "setup").read_text()
    names = [name.strip() for line in re.findall(r'python -c "import ([^"]+)"', setup) for name in line.split(",")]
    return [name for name in names if name.startswith("entityclip")]


@pytest.mark.parametrize("module", modules_setup_checks())
def test_modules_scripts_setup_imports_exist(module):
    assert importlib.util.find_spec(module) is not None, f"scripts/setup imports {module}, which does not exist"


def module_level_imports() -> dict[str, set[str]]:
    """entityclip module -> the entityclip modules it imports at module level (imports inside
    functions are deferred on purpose and run after both modules are loaded). A submodule's
    import of its own package is not an edge: Python loads a package before its submodules."""
    root = Path(__file__).parents[1] / "platform"
    paths = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (root / "entityclip").rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        targets = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                            for a in node.names}
        graph[name] = {t for t in targets if t in paths and t != name and not name.startswith(t + ".")}
    return graph


def test_no_module_imports_itself_back_through_others():
    graph = module_level_imports()
    assert "entityclip.pipeline" in graph and graph["entityclip.serving.app"]  # the walk found the package
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", f"import cycle: {' -> '.join(path + [target])}"
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
