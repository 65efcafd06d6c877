"""Dependencies point one way: runtime, ddpm, data -> models -> training, evaluation -> the commands, and
text2digit.py, the pipeline the commands use, reads no training code.

The packages are imported, every module of each, in a fresh interpreter, bottom-up in ALLOWED's order,
and what each pulled into ``sys.modules`` is checked: a package above or beside it (the only kind it
may not import, since each may import all that comes before it) is not loaded yet, so importing it
would show. text2digit gets an interpreter of its own. The import statements of every file are read
too, so that an import inside a function (run later, or only on some paths) counts as well.
"""

import ast
import json
import subprocess
import sys
import time

import pytest

from tests.helpers import PROCESS_ENV, ROOT

# What each package may import, in an order in which each may import all the packages before it (text2digit
# aside); the graph is acyclic, so no two packages can import each other.
ALLOWED = {
    "runtime": set(),
    "ddpm": {"runtime"},
    "data": {"runtime", "ddpm"},
    "models": {"runtime", "ddpm", "data"},
    "evaluation": {"runtime", "ddpm", "data", "models"},
    "training": {"runtime", "ddpm", "data", "models", "evaluation"},
    "text2digit": {"runtime", "ddpm", "data", "models"},  # the pipeline: no training code
}
IMPORT_IN_ORDER = """
import importlib, json, pkgutil, sys
for name in sys.argv[1:]:
    before = set(sys.modules)
    module = importlib.import_module(name)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
        importlib.import_module(info.name)
    print(json.dumps([name, sorted(set(sys.modules) - before)]))
"""


def import_in_order(*packages: str) -> tuple[dict[str, list[str]], float]:
    """Package -> the modules that importing all of it added, in one fresh interpreter; and the seconds it took."""
    started = time.perf_counter()
    stdout = subprocess.run(
        [sys.executable, "-c", IMPORT_IN_ORDER, *packages],
        cwd=ROOT,
        env=PROCESS_ENV,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(line) for line in stdout.splitlines()), time.perf_counter() - started


@pytest.fixture(scope="module")
def pulled_in() -> dict[str, list[str]]:
    """Package -> the modules that importing it added to those of the packages before it."""
    found, _ = import_in_order(*(name for name in ALLOWED if name != "text2digit"))
    return found


@pytest.fixture(scope="module")
def pipeline() -> tuple[list[str], float]:
    """What ``import text2digit`` loads in a fresh interpreter, and the seconds the interpreter took."""
    found, seconds = import_in_order("text2digit")
    return found["text2digit"], seconds


def project_packages(modules: list[str]) -> set[str]:
    return {module.split(".")[0] for module in modules} & ALLOWED.keys()


def test_the_allowed_graph_has_no_cycle():
    done: set[str] = set()
    while len(done) < len(ALLOWED):  # peel off the packages whose every dependency is already peeled
        ready = {name for name, below in ALLOWED.items() if name not in done and below <= done}
        assert ready, f"a cycle among {sorted(ALLOWED.keys() - done)}"
        done |= ready


@pytest.mark.parametrize("package", [name for name in ALLOWED if name != "text2digit"])
def test_importing_a_package_pulls_in_only_the_packages_below_it(pulled_in, package):
    outside = project_packages(pulled_in[package]) - ALLOWED[package] - {package}
    assert not outside, f"importing {package} pulls in {sorted(outside)}"


def test_the_pipeline_pulls_in_no_training_code(pipeline):
    outside = project_packages(pipeline[0]) - ALLOWED["text2digit"] - {"text2digit"}
    assert not outside, f"importing text2digit pulls in {sorted(outside)}"


def imported_packages(path) -> set[str]:
    """The project packages that the import statements of ``path`` name, wherever they stand in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return project_packages(sorted(names))


def source_files(package: str):
    return [ROOT / f"{package}.py"] if package == "text2digit" else sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", list(ALLOWED))
def test_no_file_names_a_package_it_may_not_import(package):
    for path in source_files(package):
        outside = imported_packages(path) - ALLOWED[package] - {package}
        assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}"


def test_the_pipeline_loads_neither_scikit_image_nor_scipy_nor_open_clip(pipeline):
    """Importing the pipeline is cheap: open_clip (~2.7 s) loads only when a model's text tower is built."""
    modules, seconds = pipeline
    print(f"python -c 'import text2digit': {seconds:.1f} s")
    heavy = {module.split(".")[0] for module in modules} & {"skimage", "scipy", "open_clip"}
    assert not heavy, f"importing text2digit loads {sorted(heavy)}"
