"""The one-way layering (cli/server -> llm -> engine -> models -> layers -> ops -> dataflow/kernels),
checked on the source: every ``import`` statement, including those inside functions."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fdpp"

# package -> fdpp modules it must never import (prefix match)
FORBIDDEN = {
    "kernels": ["fdpp"],  # torch and triton only (other fdpp.kernels modules are allowed below)
    "layers": ["fdpp.engine", "fdpp.models", "fdpp.server", "fdpp.cli", "fdpp.llm"],
    "models": ["fdpp.engine", "fdpp.tokenizer", "fdpp.calibration", "fdpp.server", "fdpp.cli", "fdpp.llm"],
    "ops": ["fdpp.engine", "fdpp.models", "fdpp.layers", "fdpp.server", "fdpp.cli", "fdpp.llm"],
}
ALLOWED = {"kernels": ["fdpp.kernels"]}


def _within(mod: str, package: str) -> bool:
    return mod == package or mod.startswith(package + ".")


def _imports(path: pathlib.Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            if node.module == "fdpp":
                out += [f"fdpp.{a.name}" for a in node.names]
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_back_up_the_layers(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for mod in _imports(path):
            if any(_within(mod, a) for a in ALLOWED.get(package, [])):
                continue
            if any(_within(mod, f) for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(ROOT.parent)} imports {mod}")
    assert not bad, "\n".join(bad)
