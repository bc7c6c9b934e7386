"""The dependency rules of docs/architecture.md, read from the code itself (imports parsed with ``ast``).

- no import cycle among the project's modules;
- ``kernels`` imports nothing of ``trainer`` or ``shards``; ``shards`` never imports ``trainer``;
- ``trainer`` takes from ``shards`` only what defines a sample (schema, manifest, io, captions,
  keywords, face crop, the captioner prompt), never the build machinery;
- inside ``trainer`` the data flow is one-way: foundation (config, typed_yaml, dist, logs, process, run_dir) <
  the sample contract (sample/) < model/ and data/ (siblings: neither imports the other) < eval/ < training/ <
  commands (cli/, bench/); nothing imports ``trainer.cli``;
- no module in trainer/, kernels/ or shards/ is over 400 lines.
The rules are also checked on synthetic graphs, so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = ("trainer", "kernels", "shards")
TRAINER_MAY_USE_FROM_SHARDS = {
    "shards",
    "shards.schema",
    "shards.manifest",
    "shards.io",
    "shards.captions",
    "shards.keywords",
    "shards.faces",
    "shards.scf",
}
FOUNDATION = {"trainer", "trainer.config", "trainer.config_checks", "trainer.dist", "trainer.logs", "trainer.process",
              "trainer.run_dir", "trainer.typed_yaml"}
# Each layer may import only those before it (and its own); packages in one layer are siblings that do not import
# each other. The commands are cli/ and the benchmarks.
TRAINER_LAYERS = (("sample",), ("model", "data"), ("eval",), ("training",), ("cli", "bench"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its body (function-level imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # typing-only imports (``if TYPE_CHECKING:``) are not dependencies
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def trainer_layer(module: str) -> int:
    """-1 for the foundation modules, else the index of its layer in TRAINER_LAYERS."""
    if module in FOUNDATION:
        return -1
    part = module.split(".")[1]
    layer = next((i for i, names in enumerate(TRAINER_LAYERS) if part in names), None)
    assert layer is not None, f"{module}: put it in a layer of TRAINER_LAYERS (tests/test_layout.py)"
    return layer


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    if cycle := find_cycle(graph):
        found.append("import cycle: " + " -> ".join(cycle))
    for src, targets in sorted(graph.items()):
        top = src.split(".")[0]
        for dst in sorted(targets):
            dst_top = dst.split(".")[0]
            if top == "kernels" and dst_top != "kernels":
                found.append(f"{src} imports {dst}: kernels/ must stand alone")
            elif top == "shards" and dst_top == "trainer":
                found.append(f"{src} imports {dst}: shards/ never imports trainer/")
            elif top == "trainer" and dst_top == "shards" and dst not in TRAINER_MAY_USE_FROM_SHARDS:
                found.append(
                    f"{src} imports {dst}: trainer/ uses shards/ only for {sorted(TRAINER_MAY_USE_FROM_SHARDS)}"
                )
            elif dst.startswith("trainer.cli.") or dst == "trainer.cli":
                if not (src == "trainer.cli" or dst == "trainer.cli" and src.startswith("trainer.cli.")):
                    found.append(f"{src} imports {dst}: nothing imports the commands in trainer/cli/")
            elif top == "trainer" and dst_top == "trainer" and trainer_layer(dst) > trainer_layer(src):
                found.append(f"{src} imports {dst}: against the data flow (a lower layer imports a higher one)")
            elif top == "trainer" and dst_top == "trainer" and trainer_layer(dst) == trainer_layer(src) >= 0 \
                    and src.split(".")[1] != dst.split(".")[1]:
                found.append(f"{src} imports {dst}: siblings of one layer do not import each other")
    return found


def test_the_project_follows_its_dependency_rules():
    graph = import_graph()
    assert {"trainer.cli.train", "trainer.model.ifas", "kernels.bench", "shards.writer"} <= graph.keys()
    assert (
        "trainer.model.ifas" in graph["trainer.training.engine"]
        or "trainer.model.build" in graph["trainer.training.engine"]
    )  # the parser sees real imports
    assert violations(graph) == []


def test_rules_catch_a_cycle_and_each_forbidden_import():
    ok = {
        "trainer.cli.train": {"trainer.training.loop"},
        "trainer.training.loop": {"trainer.model.ifas", "kernels"},
        "trainer.model.ifas": {"trainer.config", "shards.schema"},
        "trainer.config": set(),
        "kernels": set(),
        "shards.schema": set(),
    }
    assert violations(ok) == []
    bad = {**ok, "trainer.model.ifas": {"trainer.training.loop"}}
    found = violations(bad)
    assert any(v.startswith("import cycle: ") for v in found)
    assert any("against the data flow" in v for v in found)
    assert "kernels/ must stand alone" in " ".join(violations({**ok, "kernels": {"trainer.config"}}))
    assert "shards/ never imports" in " ".join(violations({**ok, "shards.schema": {"trainer.config"}}))
    assert "nothing imports the commands" in " ".join(violations({**ok, "trainer.bench": {"trainer.cli.train"}}))
    assert "uses shards/ only" in " ".join(violations({**ok, "trainer.bench": {"shards.synth"}}))
    siblings = {**ok, "trainer.data.stream": {"trainer.model.ifas"}, "trainer.model.ifas": {"trainer.config"}}
    assert "siblings of one layer" in " ".join(violations(siblings))
    assert violations({**ok, "trainer.data.stream": {"trainer.sample.prompt"}, "trainer.sample.prompt": set()}) == []


def test_no_module_is_over_400_lines():
    long = {name: n for name, p in project_modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
