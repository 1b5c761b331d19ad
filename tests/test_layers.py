"""The package's architecture, checked: three layers, imports only downward, no cycles.

    app        dpdm_jax.main and one module per mode (train, sample, evaluate, export)
    builders   dpdm_jax.experiment, dpdm_jax.config_check: config -> checked, explicit objects, once
    libraries  dp, diffusion, models, data, evaluation, audit, checkpoint, metrics

Libraries never import the app or the builders, and never read a ConfigDict or os.environ:
configuration and environment stop at the edge.
"""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dpdm_jax")
APP = {"dpdm_jax.main", "dpdm_jax.train", "dpdm_jax.sample", "dpdm_jax.evaluate", "dpdm_jax.export"}
BUILDERS = {"dpdm_jax.experiment", "dpdm_jax.config_check"}


def _modules() -> dict[str, str]:
    """dotted module name -> source path, for every module of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    if module in APP:
        return 2
    if module in BUILDERS:
        return 1
    return 0


def _imports(path: str, module: str) -> set[str]:
    """Package modules imported anywhere in the file (function-level imports included)."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in MODULES}
    return out - {module}


GRAPH = {m: _imports(p, m) for m, p in MODULES.items()}


def test_the_app_modes_and_builders_exist():
    assert {"dpdm_jax.main", "dpdm_jax.train", "dpdm_jax.sample", "dpdm_jax.experiment"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_downward(module):
    upward = sorted(i for i in GRAPH[module] if _layer(i) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports a higher layer: {upward}"


def test_no_import_cycles():
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


# (module, line text) -> why that read of os.environ is not a setting read from the environment.
ENVIRONMENT_EXEMPT = {
    ("dpdm_jax.data.sources", "env = dict(os.environ, npm_config_update_notifier"):
        "passes this process's environment (PATH, proxies) through to the npm / apt-get child process; "
        "no value is read from it",
}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == 0))
def test_libraries_read_no_config_and_no_environment(module):
    source = open(MODULES[module]).read()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.startswith("ml_collections") for n in names), f"{module} imports ml_collections"
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                isinstance(node.value, ast.Name) and node.value.id == "os":
            line = source.splitlines()[node.lineno - 1].strip()
            if any(module == m and line.startswith(text) for m, text in ENVIRONMENT_EXEMPT):
                continue
            pytest.fail(f"{module} reads the environment (os.{node.attr}, line {node.lineno})")
