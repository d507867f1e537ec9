"""The project's import layering, read from the source with `ast` (every `import` statement, at the top
of a module or inside a function or an `if TYPE_CHECKING:` block, plus `importlib.import_module("...")`
calls with a literal name). Imports run one way:

    stage scripts (data_helper.py train.py merge_params.py predict.py web_demo.py tools/ bench/ tests/)
      -> shared modules (utils.py, roleplay/)  ->  the model (baichuan/)

- baichuan/ imports nothing of the project outside baichuan/, and of third-party packages only torch,
  transformers, sentencepiece (and bitsandbytes in baichuan/quantizer.py);
- a shared module imports no stage script; utils.py imports no roleplay module (it is the lowest shared
  layer above baichuan/); shared modules import third-party packages only inside functions (importing
  them stays cheap: data_helper.py never loads torch); roleplay/__init__.py imports nothing;
- the pipeline scripts import no other pipeline script, tools/ imports none of them, and nothing outside
  tests/ imports from tests/;
- no import cycle among the project's modules, nor among its packages (baichuan/, roleplay/, tools/,
  bench/ and tests/ each taken as one node next to the top-level modules).

The checker works on a {path: source} mapping, so it is also run on a small copy of an older layout it
must reject (baichuan/build_default.py importing utils, train and data_helper; utils importing baichuan;
baichuan's modeling and quantizer importing each other; bench importing from tests).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"output", "venv", "node_modules", "__pycache__", "data", "images"}
PIPELINE_SCRIPTS = {"data_helper", "train", "merge_params", "predict", "web_demo"}
PACKAGES = {"baichuan", "roleplay", "tools", "bench", "tests"}  # one node each in the package graph
MODEL_THIRD_PARTY = {"torch", "transformers", "sentencepiece"}
MODEL_THIRD_PARTY_IN = {"baichuan.quantizer": {"bitsandbytes"}}

Graph = dict[str, set[str]]


def project_sources(root: Path = REPO) -> dict[str, str]:
    """{path relative to the repo, with "/": source} of every project .py file (hidden folders, virtual
    environments, outputs and data left out)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p.startswith(".") or p in SKIP_DIRS for p in parts[:-1]):
            continue
        out["/".join(parts)] = path.read_text(encoding="utf-8")
    return out


def module_name(path: str) -> str:
    """"roleplay/loading.py" -> "roleplay.loading"; "baichuan/__init__.py" -> "baichuan"."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _run_at_import(body: list[ast.stmt]) -> set[int]:
    """ids of the statements that run when the module is imported: module level, also inside `if`, `try`,
    `with`, loops and class bodies, but not inside functions nor under `if TYPE_CHECKING:`."""
    ids: set[int] = set()
    for stmt in body:
        ids.add(id(stmt))
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            ids |= _run_at_import(stmt.orelse)
            continue
        for field in ("body", "orelse", "finalbody"):
            ids |= _run_at_import(getattr(stmt, field, []))
        for handler in getattr(stmt, "handlers", []):
            ids |= _run_at_import(handler.body)
    return ids


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, bool]]:
    """(dotted name, at import time) of everything `tree` imports; `from a import b` yields a and a.b."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    top_level = _run_at_import(tree.body)
    names = []
    for node in ast.walk(tree):
        at_top = id(node) in top_level
        if isinstance(node, ast.Import):
            names += [(alias.name, at_top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package[:len(package) - (node.level - 1)] + ([node.module] if node.module else [])
                base = ".".join(base_parts)
            else:
                base = node.module or ""
            names.append((base, at_top))
            names += [(f"{base}.{alias.name}", at_top) for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append((node.args[0].value, at_top))
    return names


def import_graph(sources: Mapping[str, str]) -> tuple[Graph, dict[str, set[tuple[str, bool]]]]:
    """(project module -> project modules it imports, project module -> (third-party top-level name,
    at module level) it imports). Standard-library imports are left out."""
    modules = {module_name(p): p for p in sources}
    graph: Graph = {m: set() for m in modules}
    external: dict[str, set[tuple[str, bool]]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(sources[path], filename=path)
        for name, at_top in _imported_names(tree, module, path.endswith("__init__.py")):
            top = name.split(".")[0]
            if name in modules:
                if name != module:
                    graph[module].add(name)
            elif top in PACKAGES or top in modules:
                continue  # an attribute of a project module (`from utils import UserError` -> utils.UserError)
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                external[module].add((top, at_top))
    return graph, external


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top == "baichuan":
        return "model"
    if module == "utils" or top == "roleplay":
        return "shared"
    return "stage"


def layer_violations(graph: Graph, external: Mapping[str, set[tuple[str, bool]]] | None = None) -> list[str]:
    """Every import that breaks the rules in this file's docstring, as "importer -> imported: rule"."""
    problems = []
    for module, deps in sorted(graph.items()):
        top = module.split(".")[0]
        for dep in sorted(deps):
            dep_top = dep.split(".")[0]
            if layer(module) == "model" and layer(dep) != "model":
                problems.append(f"{module} -> {dep}: baichuan/ imports nothing of the project outside baichuan/")
            if layer(module) == "shared" and layer(dep) == "stage":
                problems.append(f"{module} -> {dep}: a shared module (utils, roleplay) imports no stage script")
            if module == "utils" and dep_top == "roleplay":
                problems.append(f"{module} -> {dep}: utils is the lowest shared layer, it imports no roleplay module")
            if module == "roleplay":
                problems.append(f"{module} -> {dep}: roleplay/__init__.py imports nothing")
            if dep in PIPELINE_SCRIPTS and (module in PIPELINE_SCRIPTS or top == "tools"):
                problems.append(f"{module} -> {dep}: pipeline scripts and tools/ import no pipeline script")
            if dep_top == "tests" and top != "tests":
                problems.append(f"{module} -> {dep}: only tests/ imports from tests/")
    for module, names in sorted((external or {}).items()):
        for name, at_top in sorted(names):
            if layer(module) == "model" and name not in MODEL_THIRD_PARTY | MODEL_THIRD_PARTY_IN.get(module, set()):
                problems.append(f"{module} -> {name}: baichuan/ needs only {sorted(MODEL_THIRD_PARTY)}")
            if layer(module) == "shared" and at_top:
                problems.append(f"{module} -> {name}: shared modules import third-party packages inside functions")
    return problems


def find_cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def package_graph(graph: Graph) -> Graph:
    """`graph` with each of PACKAGES collapsed into one node (imports inside a package dropped)."""
    def node(module: str) -> str:
        top = module.split(".")[0]
        return top if top in PACKAGES else module

    out: Graph = {}
    for module, deps in graph.items():
        out.setdefault(node(module), set()).update(node(d) for d in deps if node(d) != node(module))
    return out


def check(sources: Mapping[str, str]) -> list[str]:
    """All problems of a {path: source} project: layer violations, then module and package cycles."""
    graph, external = import_graph(sources)
    problems = layer_violations(graph, external)
    problems += [f"import cycle among modules: {' <-> '.join(c)}" for c in find_cycles(graph)]
    problems += [f"import cycle among packages: {' <-> '.join(c)}" for c in find_cycles(package_graph(graph))]
    return problems


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------
def test_the_project_follows_the_layers_and_has_no_import_cycle() -> None:
    sources = project_sources()
    assert {"utils.py", "roleplay/__init__.py", "baichuan/__init__.py", "tools/build_default.py"} <= set(sources)
    problems = check(sources)
    assert not problems, "\n".join(problems)


def test_the_checker_sees_function_level_and_type_checking_imports() -> None:
    graph, external = import_graph({
        "utils.py": "import json\n\ndef f():\n    import torch\n    from baichuan.generation_utils import x\n",
        "baichuan/__init__.py": "from .generation_utils import x\n",
        "baichuan/generation_utils.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import numpy\n",
        "roleplay/devices.py": "import importlib\nm = importlib.import_module('utils')\nimport peft\n",
        "tools/x.py": "from roleplay import devices\n",
    })
    assert graph["utils"] == {"baichuan.generation_utils"}
    assert graph["baichuan"] == {"baichuan.generation_utils"}
    assert graph["roleplay.devices"] == {"utils"}
    assert graph["tools.x"] == {"roleplay.devices"}
    assert external["utils"] == {("torch", False)}
    assert external["baichuan.generation_utils"] == {("numpy", False)}  # seen, but not run at import time
    assert external["roleplay.devices"] == {("peft", True)}


def test_the_checker_rejects_the_old_layout() -> None:
    """The layout before roleplay/ and tools/: each of its knots must be reported."""
    old = {
        "utils.py": "import json\n\ndef load():\n    import baichuan\n",
        "train.py": "import utils\n\ndef bf16_supported():\n    pass\n",
        "data_helper.py": "import utils\n",
        "baichuan/__init__.py": "from .modeling_baichuan import BaichuanForCausalLM\n",
        "baichuan/build_default.py": ("import utils\nfrom utils import UserError\n\ndef base_records():\n"
                                      "    from data_helper import TEMPLATES_PER_FACT, expand_attributes\n\n"
                                      "def pretrain():\n    from train import bf16_supported\n"),
        "baichuan/modeling_baichuan.py": "def quantize(self, bits):\n    from .quantizer import quantize_model\n",
        "baichuan/quantizer.py": ("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                                  "    from .modeling_baichuan import BaichuanForCausalLM\n"),
        "bench/synth.py": "def pool():\n    from tests.tiny import TINY_CORPUS\n",
        "tests/tiny.py": "",
    }
    problems = check(old)
    text = "\n".join(problems)
    for expected in ("baichuan.build_default -> utils: baichuan/ imports nothing",
                     "baichuan.build_default -> train: baichuan/ imports nothing",
                     "baichuan.build_default -> data_helper: baichuan/ imports nothing",
                     "bench.synth -> tests.tiny: only tests/ imports from tests/",
                     "import cycle among modules: baichuan.modeling_baichuan <-> baichuan.quantizer",
                     # utils -> baichuan -> utils, and through train and data_helper back to utils
                     "import cycle among packages: baichuan <-> data_helper <-> train <-> utils"):
        assert expected in text, text
    # and the same files in the new layout pass
    new = {**old, "baichuan/quantizer.py": "from torch import nn\n", "utils.py": "import json\n",
           "bench/synth.py": "def pool():\n    from tools.tiny_models import TINY_CORPUS\n",
           "tools/tiny_models.py": "def make():\n    from baichuan import BaichuanForCausalLM\n"}
    del new["baichuan/build_default.py"], new["tests/tiny.py"]
    assert check(new) == []


def test_shared_modules_and_stage_rules_are_reported() -> None:
    problems = check({
        "utils.py": "from roleplay import devices\n",
        "roleplay/__init__.py": "from roleplay import devices\n",
        "roleplay/devices.py": "import torch\nimport train\n",
        "train.py": "import predict\n",
        "predict.py": "",
        "tools/build_default.py": "def f():\n    import data_helper\n",
        "data_helper.py": "",
    })
    text = "\n".join(problems)
    for expected in ("utils -> roleplay.devices: utils is the lowest shared layer",
                     "roleplay -> roleplay.devices: roleplay/__init__.py imports nothing",
                     "roleplay.devices -> train: a shared module (utils, roleplay) imports no stage script",
                     "roleplay.devices -> torch: shared modules import third-party packages inside functions",
                     "train -> predict: pipeline scripts and tools/ import no pipeline script",
                     "tools.build_default -> data_helper: pipeline scripts and tools/ import no pipeline script"):
        assert expected in text, text
