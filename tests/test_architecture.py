"""The package's layers hold (docs/architecture.md): imports run only downward, ``coding/`` imports nothing else of
the package, TransformerLens is imported only under ``tl/``, no module passes ~300 lines, no ``print`` in library
code. Read from the source, so a violation fails here before it shows anywhere else."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tl_sparsity"
# a layer may import its own layer (its own folder) and the layers below it
# scale/ sits above tl/ (its parallel modes are collectors); distributed.py only forwards to scale/
RANK = {"report_plot": -1, "report": 0, "text": 0, "coding": 1, "stats": 2, "tl": 3, "scale": 4, "cli_run": 4,
        "cli_resume": 4, "cli_show": 4, "distributed": 5, "cli": 5, "__main__": 6}
MODULES = sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


def _layer(parts: tuple[str, ...]) -> str:
    """The layer of a module given its path inside the package (``("coding", "learner")`` → ``"coding"``)."""
    return parts[0]


def _package_imports(path: Path) -> list[tuple[tuple[str, ...], int]]:
    """``(target module parts inside the package, line)`` for every import of the package in ``path``."""
    here = path.relative_to(PKG).with_suffix("").parts
    package = here[:-1]  # the module's package inside tl_sparsity
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            if node.module:
                out.append((base + tuple(node.module.split(".")), node.lineno))
            else:
                out.extend((base + (a.name,), node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tl_sparsity"):
            out.append((tuple(node.module.split(".")[1:]), node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((tuple(a.name.split(".")[1:]), node.lineno) for a in node.names
                       if a.name.startswith("tl_sparsity"))
    return [(t, line) for t, line in out if t]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_run_only_downward(path):
    here = path.relative_to(PKG).with_suffix("").parts
    mine = RANK[_layer(here)]
    for target, line in _package_imports(path):
        theirs = RANK[_layer(target)]
        same_folder = len(here) > 1 and target[0] == here[0]
        assert theirs < mine or same_folder, f"{path.name}:{line} imports {'.'.join(target)} (a layer not below)"


def test_the_package_has_at_most_six_floors_and_no_circle():
    """A layer's floor is one above the highest layer it imports (a layer importing none of the others: floor 1);
    the longest chain of imports across layers is at most six floors, and no two layers import each other."""
    uses: dict[str, set[str]] = {}
    for path in MODULES:
        here = _layer(path.relative_to(PKG).with_suffix("").parts)
        uses.setdefault(here, set()).update(t[0] for t, _ in _package_imports(path) if t[0] != here)
    floors: dict[str, int] = {}

    def floor(layer: str, seen: tuple[str, ...] = ()) -> int:
        assert layer not in seen, f"import circle: {' -> '.join((*seen, layer))}"
        if layer not in floors:
            floors[layer] = 1 + max((floor(t, (*seen, layer)) for t in uses.get(layer, ())), default=0)
        return floors[layer]

    assert max(floor(layer) for layer in uses) <= 6, floors


def test_transformer_lens_is_imported_only_under_tl():
    for path in MODULES:
        text = path.read_text()
        if "transformer_lens" in text and path.relative_to(PKG).parts[0] != "tl":
            imports = [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.Import, ast.ImportFrom))]
            names = [getattr(n, "module", None) or "" for n in imports] + [a.name for n in imports for a in n.names]
            assert not any(x.startswith("transformer_lens") for x in names), path


def test_no_module_is_long_and_none_prints():
    for path in MODULES:
        text = path.read_text()
        assert len(text.splitlines()) <= 300, f"{path} has {len(text.splitlines())} lines"
        calls = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "print"]
        assert not calls or path.name in ("cli.py", "__main__.py"), f"print in {path}:{calls[0].lineno}"


def test_the_check_catches_an_upward_import(monkeypatch):
    """The import reader sees a relative import from coding/ into tl/ (so the tests above can fail)."""
    bad = PKG / "coding" / "_upward_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from ..tl import collector\n"
                        if self == bad else Path.read_bytes(self).decode())
    assert _package_imports(bad) == [(("tl",), 1)]
    with pytest.raises(AssertionError, match="a layer not below"):
        test_imports_run_only_downward(bad)


def test_the_tests_follow_the_layers():
    """Each folder of tests is named after a layer of the package; tests of top-level modules sit in tests/."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    layers = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders and folders <= layers, f"test folders without a layer of the package: {sorted(folders - layers)}"
    for folder in folders:
        assert list((tests / folder).glob("test_*.py")), folder
