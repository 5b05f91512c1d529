"""The package's layering, read from the source: every `import` of a cl_serve module (at any depth in a file) must
point at its own layer or one allowed below it, the graph has no circle, and the layers the server loads never
import torch, timm or the exporter. The layers, bottom to top:

    contract (preprocessing, bounded decoding)      errors, loopback, release_gate, api_models (leaves)
    trainer -> contract, loopback                   export -> contract
    store -> contract, errors                       serving -> store, contract, errors, loopback, leaves
    commands (cli, pipeline, demo) -> anything
"""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "cl_serve"

LAYERS = {
    "contract": ["cl_serve.contract"],
    "leaf": ["cl_serve.errors", "cl_serve.loopback", "cl_serve.release_gate", "cl_serve.api_models"],
    "trainer": ["cl_serve.trainer"],
    "export": ["cl_serve.export"],
    "store": ["cl_serve.store", "cl_serve.store_backends", "cl_serve.object_store", "cl_serve.open_store",
              "cl_serve.remote_inputs"],
    "serving": ["cl_serve.server", "cl_serve.runtime", "cl_serve.request_parsing", "cl_serve.serve_metrics",
                "cl_serve.memory_return", "cl_serve.serve_cli", "cl_serve.client", "cl_serve.demo_serving",
                "cl_serve.server_settings"],
    "commands": ["cl_serve.cli", "cl_serve.commands", "cl_serve.pipeline", "cl_serve.versions", "cl_serve.demo"],
    "package": ["cl_serve"],  # the package's own __init__: a docstring, imports nothing
}
ALLOWED = {
    "contract": {"contract"},
    "leaf": set(),
    "trainer": {"trainer", "contract", "leaf"},
    "export": {"export", "contract"},
    "store": {"store", "contract", "leaf"},
    "serving": {"serving", "store", "contract", "leaf"},
    "commands": set(LAYERS),
    "package": set(),
}
SERVED = {"contract", "leaf", "store", "serving", "package"}  # what a serving image loads
HEAVY = {"torch", "timm", "onnx", "onnxscript", "safetensors"}


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer_of(module: str) -> str:
    best = max(((p, layer) for layer, prefixes in LAYERS.items() for p in prefixes
                if module == p or (module.startswith(p + ".") and layer != "package")),
               key=lambda x: len(x[0]), default=None)
    assert best is not None, f"{module} belongs to no layer: add it to tests/test_layers.py"
    return best[1]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from cl_serve import pipeline`
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_every_arrow_points_to_an_allowed_layer():
    wrong = []
    for m, targets in graph().items():
        for t in targets:
            if layer_of(t) not in ALLOWED[layer_of(m)] | {layer_of(m), "package"}:
                wrong.append(f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_import_graph_has_no_circle():
    g = graph()
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


def test_what_the_server_loads_imports_no_training_stack():
    heavy = [f"{m} imports {i}" for m, p in modules().items() if layer_of(m) in SERVED
             for i in imports(p) if i.split(".")[0] in HEAVY]
    assert not heavy, heavy


def test_the_checks_catch_a_wrong_arrow_and_a_circle():
    """The rules above are not vacuous: a serving module importing the trainer, and a circle, are found."""
    assert layer_of("cl_serve.server") == "serving" and "trainer" not in ALLOWED["serving"]
    assert layer_of("cl_serve.trainer.heads.drift") == "trainer" and layer_of("cl_serve.contract.image_decode") == "contract"
    with pytest.raises(AssertionError, match="belongs to no layer"):  # a new module must be given a layer
        layer_of("cl_serve.something_new")
    g = graph()
    assert "cl_serve.store_backends" in g["cl_serve.object_store"]  # a real arrow is seen
    assert {"cl_serve.store", "cl_serve.object_store"} <= g["cl_serve.open_store"]
    # one Store over backends: the object backend is not a Store, and store.py knows no backend but the local one
    assert "cl_serve.store" not in g["cl_serve.object_store"] and "cl_serve.object_store" not in g["cl_serve.store"]


def test_modules_and_functions_stay_small():
    """The structure's size budget: no module over 400 lines, no function over 60."""
    too_long = []
    for m, path in modules().items():
        text = path.read_text()
        if text.count("\n") > 400:
            too_long.append(f"{m}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
