"""The package's imports only look down its layers, and no module imports itself in a circle.

Read from the source (every ``import``, including those inside functions), so a lazy import
that climbs a layer fails here too. The layers are the ones the package docstring documents.
"""
import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tvm_splat"

#: lowest first; a unit (top-level module or subpackage) may import only from lower layers
LAYERS = (
    ("_version", "reference", "timing", "channel_rules"),  # leaf helpers (channel_rules: pure data)
    ("tensors",),                          # arrays at the kernel boundary
    ("formats",),                          # patterns, ACSR, tile plans: data
    ("kernels", "testing"),                # TensorIR generators; shared test cases
    ("schedules",),                        # (func, target, knobs) -> func, default knobs
    ("records", "devices"),                # reading tuning records; devices and targets
    ("compile",),                          # build + cache
    ("planner",),                          # plan -> run
    ("attention", "training"),             # sparse_attention: a cache of plans; training plans
    ("relay_passes", "tuning", "pruning", "autograd", "distributed"),
    ("baselines",),
    ("bench", "demo"),
    ("cli",),
    ("__init__",),
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = ("tvm_splat",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """Every tvm_splat module or name ``path`` imports, as dotted names."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "tvm_splat":
                if node.module:
                    yield target
                else:  # from . import x: x may be a module
                    yield from (f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "tvm_splat")


def _unit(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph():
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = collections.defaultdict(set)
    for mod, path in files.items():
        for target in _imports(path):
            # resolve "pkg.module.name" to the longest module prefix that is a file
            while target not in files and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != mod:
                graph[mod].add(target)
    return files, graph


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _graph()[0]}
    assert units <= set(RANK), f"units without a layer in LAYERS: {sorted(units - set(RANK))}"


def test_imports_only_look_down():
    _, graph = _graph()
    assert "tvm_splat.compile" in graph["tvm_splat.planner"]  # the walk sees real imports
    assert "tvm_splat.planner" in graph["tvm_splat.relay_passes.sparsify_attention"]
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if _unit(a) != _unit(b) and RANK[_unit(b)] >= RANK[_unit(a)])
    assert not upward, "imports that do not look down the layers:\n" + "\n".join(upward)


def test_no_import_circle():
    _, graph = _graph()
    state, stack, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(circles)
