"""The import graph: dependencies point one way, no module imports a higher layer, no circle."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Higher imports lower, never the reverse. Modules of one layer may import each other, except
# stages (no stage imports another) and demo/stages, which sit side by side above the library.
LAYERS = [
    ("pipeline.app", 8),
    ("run_pipeline", 7),
    ("stages", 6),
    ("pipeline.demo", 5),
    ("pipeline.errors", 1),
    ("pipeline.config", 2),
    ("pipeline.runtime", 3),
    ("cache", 3.5),
    ("pipeline", 4),  # the library: every other module of pipeline/
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> tuple[str, float]:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank
    raise AssertionError(f"{module} belongs to no layer")


def _import_graph() -> dict[str, set[str]]:
    files = [p for d in ("pipeline", "stages", "cache") for p in (ROOT / d).rglob("*.py")]
    files.append(ROOT / "run_pipeline.py")
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions count too
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module and modules[target].name != "__init__.py":
                    graph[module].add(target)
    return graph


def test_every_import_points_down_a_layer():
    wrong = []
    for module, targets in _import_graph().items():
        for target in targets:
            (layer, rank), (target_layer, target_rank) = _layer(module), _layer(target)
            within = layer == target_layer and layer != "stages"  # no stage imports another stage
            if not (rank > target_rank or within):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    graph = _import_graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_cli_starts_without_torch_or_numpy():
    code = "import sys, pipeline.app.cli; print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
