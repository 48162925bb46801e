"""The package's layers, read from its source: which layer may import which, and how long a function may be.

The rule: the mathematics (``iwae.core``), the models, the evaluation of a model (``iwae.eval``) and training
(``iwae.training``), with the data, the machine (``iwae.platform``) and the settings they rest on, never import the
run directories (``iwae.runs``), the plots or the command line; the plots import neither of the last two; the run
directories do not import the command line. Below those, ``iwae.core``, the models, the data, the platform and the
settings import neither evaluation nor training.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "iwae"
MAX_FUNCTION_LINES = 60

LOWER = ("core", "models", "eval", "training", "data", "platform", "settings")
FORBIDDEN = {
    **{layer: {"runs", "plots", "cli"} for layer in LOWER},
    **{layer: {"runs", "plots", "cli", "eval", "training"}
       for layer in ("core", "models", "data", "platform", "settings")},
    "eval": {"runs", "plots", "cli", "training"},
    "plots": {"runs", "cli"},
    "runs": {"cli"},
}


def layer(module: str) -> str | None:
    """The layer of the module ``iwae.<layer>[.…]`` (None for the package itself)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return "cli" if parts[1] == "__main__" else parts[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str) -> set[str]:
    """The ``iwae`` modules that ``source`` imports, anywhere in it (``from iwae import x`` imports ``iwae.x``)."""
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names if alias.name.startswith("iwae.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "iwae":
            if node.module == "iwae":
                modules |= {f"iwae.{alias.name}" for alias in node.names}
            else:
                modules.add(node.module)
    return modules


def violations(module: str, source: str) -> list[str]:
    """'importer -> imported' for each import of ``source`` (the module ``module``) that the rule forbids."""
    forbidden = FORBIDDEN.get(layer(module) or "", set())
    return sorted(f"{module} -> {imported}" for imported in imported_modules(source)
                  if layer(imported) in forbidden)


def test_the_checker_finds_a_forbidden_import() -> None:
    source = "import torch\nfrom iwae.models import burda\n\ndef f():\n    from iwae.runs import rundir\n"
    assert violations("iwae.core.example", source) == ["iwae.core.example -> iwae.runs"]
    assert violations("iwae.eval.example", "from iwae import plots, data\n") == ["iwae.eval.example -> iwae.plots"]
    assert violations("iwae.runs.example", "from iwae.training import loop\n") == []


def test_no_module_imports_against_the_layers() -> None:
    found = [v for path in sorted(PACKAGE.rglob("*.py"))
             for v in violations(module_name(path), path.read_text())]
    assert found == []


def function_spans(source: str) -> list[tuple[str, int]]:
    """(name, lines from its first decorator or ``def`` to its last line) of every function in ``source``."""
    return [(node.name, node.end_lineno - min([node.lineno] + [d.lineno for d in node.decorator_list]) + 1)
            for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_the_length_check_finds_a_long_function() -> None:
    source = "def long():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    assert function_spans(source) == [("long", MAX_FUNCTION_LINES + 1)]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_function_is_longer_than_the_limit(path: Path) -> None:
    long = [(name, lines) for name, lines in function_spans(path.read_text()) if lines > MAX_FUNCTION_LINES]
    assert long == []
