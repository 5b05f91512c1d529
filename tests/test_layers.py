"""The package's layering, read from the source: every sub-package of cl_serve is one layer, every `import` of a
cl_serve module (at any depth in a file) must point at its own layer or one below it, the graph has no circle (in
the package and in benchmarks/), and the layers the server loads never import torch, timm or the exporter. The
layers, bottom to top (data flows trainer -> export -> store -> server):

    base (errors, local Ray on loopback)
    contract (preprocessing, bounded decoding, the store's schema) -> base
    trainer -> contract, base          export -> contract, base          store -> contract, base
    serving -> store, contract, base
    workflow (init, add-task, export, versions, gate, demo) -> every layer above
    commands -> workflow and below;    cli -> commands, store, base
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "cl_serve"

BELOW = {
    "base": set(),
    "contract": {"base"},
    "trainer": {"contract", "base"},
    "export": {"contract", "base"},
    "store": {"contract", "base"},
    "serving": {"store", "contract", "base"},
    "workflow": {"trainer", "export", "store", "serving", "contract", "base"},
    "commands": {"workflow", "trainer", "export", "store", "serving", "contract", "base"},
    "cli": {"commands", "store", "base"},
    "package": set(),
}
TOP_LEVEL_MODULES = {"cl_serve", "cl_serve.cli"}  # everything else lives in a layer's sub-package
SERVED = {"base", "contract", "store", "serving", "package"}  # what a serving image loads
HEAVY = {"torch", "timm", "onnx", "onnxscript", "safetensors"}


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer_of(module: str) -> str:
    """The layer of a module: its sub-package under cl_serve (cl_serve.cli and the package itself stand alone)."""
    if module == "cl_serve":
        return "package"
    parts = module.split(".")
    assert parts[0] == "cl_serve" and parts[1] in BELOW, f"{module} belongs to no layer: add it to tests/test_layers.py"
    return parts[1]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from cl_serve import pipeline`
    return found


def graph(mods: dict[str, Path] | None = None) -> dict[str, set[str]]:
    mods = modules() if mods is None else mods
    return {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()}


def benchmark_modules() -> dict[str, Path]:
    return {f"benchmarks.{p.stem}": p for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"}


def test_every_arrow_points_to_an_allowed_layer():
    wrong = []
    for m, targets in graph().items():
        for t in targets:
            if layer_of(t) not in BELOW[layer_of(m)] | {layer_of(m), "package"}:
                wrong.append(f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})")
    assert not wrong, "\n".join(sorted(wrong))


def find_circle(g: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in sorted(g[m]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(t):] + [t]))
            if t not in state:
                visit(t, trail + [t])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("tree", ["cl_serve", "benchmarks"])
def test_the_import_graph_has_no_circle(tree):
    find_circle(graph() if tree == "cl_serve" else graph(benchmark_modules()))


def test_no_loose_module_at_the_top_of_the_package():
    loose = [m for m in modules() if m.count(".") == 1 and m not in TOP_LEVEL_MODULES and not (PKG / m.split(".")[1]).is_dir()]
    assert not loose, f"modules at the top of cl_serve/ that belong in a layer's sub-package: {loose}"


def test_what_the_server_loads_imports_no_training_stack():
    heavy = [f"{m} imports {i}" for m, p in modules().items() if layer_of(m) in SERVED
             for i in imports(p) if i.split(".")[0] in HEAVY]
    assert not heavy, heavy


def test_the_checks_catch_a_wrong_arrow_and_a_circle():
    """The rules above are not vacuous: a serving module importing the trainer, a loose module and a circle are
    found."""
    assert layer_of("cl_serve.serving.app") == "serving" and "trainer" not in BELOW["serving"]
    assert layer_of("cl_serve.trainer.heads.drift") == "trainer" and layer_of("cl_serve.contract.image_decode") == "contract"
    with pytest.raises(AssertionError, match="belongs to no layer"):  # a new top-level module must be placed
        layer_of("cl_serve.something_new")
    g = graph()
    assert "cl_serve.store.backends" in g["cl_serve.store.object_backend"]  # a real arrow is seen
    assert {"cl_serve.store.model_store", "cl_serve.store.object_backend"} <= g["cl_serve.store.open_store"]
    assert "cl_serve.serving.history" in g["cl_serve.serving.watcher"]
    # one Store over backends: the object backend is not a Store, and the Store knows no backend but the local one
    assert "cl_serve.store.model_store" not in g["cl_serve.store.object_backend"]
    assert "cl_serve.store.object_backend" not in g["cl_serve.store.model_store"]
    with pytest.raises(AssertionError, match="import circle: a -> b -> a"):
        find_circle({"a": {"b"}, "b": {"a"}})
    assert {"benchmarks.hostile", "benchmarks.hostile_corpus"} <= set(benchmark_modules())


def function_lengths(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.name, node.end_lineno - node.lineno + 1))
    return out


@pytest.mark.parametrize("tree", ["cl_serve", "benchmarks"])
def test_modules_and_functions_stay_small(tree):
    """The structure's size budget, in the package and in benchmarks/: no module over 400 lines, no function over
    60."""
    too_long = []
    for m, path in (modules() if tree == "cl_serve" else benchmark_modules()).items():
        n = path.read_text().count("\n")
        if n > 400:
            too_long.append(f"{m}: {n} lines")
        too_long += [f"{m}.{name}: {k} lines" for name, k in function_lengths(path) if k > 60]
    assert not too_long, too_long
