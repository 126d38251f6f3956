"""The import graph of sdpo_fast/ (parsed with ``ast``, nothing imported): imports run one way, with no
cycle, and sdpo_fast/kernels/ never imports the package above it. Also: nothing at the checkout's root
shadows an installed package when the root is on ``sys.path`` (``python train.py``, ``python -m pytest``)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = {"sdpo_fast": ROOT / "sdpo_fast"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py of the tree (``__init__`` names its package)."""
    out = {}
    for prefix, root in TREES.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def imports_of(name: str, path: Path, known: set) -> set:
    """The project modules ``name`` imports anywhere in its file (lazy imports in functions included)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a project module: its deepest known prefix
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_the_graph_is_parsed():
    g = graph()
    assert "sdpo_fast.kernels.logprobs.native" in g["sdpo_fast.backends"]
    assert "sdpo_fast.kernels.extension" in g["sdpo_fast.kernels.logprobs.native"]
    assert "sdpo_fast.logprobs" in g["sdpo_fast.loss"]


def test_kernels_never_import_the_package_above():
    bad = {
        (name, dep)
        for name, deps in graph().items()
        if name.startswith("sdpo_fast.kernels")
        for dep in deps
        if not dep.startswith("sdpo_fast.kernels")
    }
    assert not bad, f"sdpo_fast/kernels/ imports the package above it: {sorted(bad)}"


def test_no_import_cycle():
    g = graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node)


def test_backend_table_imports_explicitly():
    source = (ROOT / "sdpo_fast" / "backends.py").read_text()
    assert "importlib" not in source and "__import__" not in source


def test_the_checkout_root_shadows_no_installed_package():
    """``python train.py`` and ``python -m pytest`` put the checkout's root first on ``sys.path``, where a
    package or module named like another installed distribution's wins over it (a top-level ``kernels/``
    broke ``import transformers`` once transformers came to depend on the ``kernels`` package)."""
    import importlib.metadata

    ours = {"sdpo_fast"}  # an editable install lists it once per metadata folder it finds
    installed = {name for name, dists in importlib.metadata.packages_distributions().items()
                 if {d.replace("-", "_").lower() for d in dists} != ours}
    at_root = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    at_root |= {p.stem for p in ROOT.glob("*.py")}
    assert "sdpo_fast" in at_root and "train" in at_root
    assert not at_root & installed, f"the checkout's root shadows installed packages: {sorted(at_root & installed)}"


def test_transformers_and_the_package_import_from_the_checkout_root():
    """The same, end to end: a fresh interpreter whose working directory is the root (first on
    ``sys.path``) imports transformers' model code, which loads its optional integrations, and sdpo_fast."""
    import subprocess
    import sys

    code = ("import importlib.util, sdpo_fast, sdpo_fast.kernels, transformers.modeling_utils; "
            "spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else None)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    origin = done.stdout.strip().splitlines()[-1]
    assert origin == "None" or not origin.startswith(str(ROOT) + "/kernels"), origin
