"""Imports point one way (DESIGN.md's layers): the kernels never import the op API above
them, the leaf modules import nothing of the package, and the framework-neutral core
imports neither torch nor JAX. Read from the source (every import statement, also inside
functions), so a lazy import cannot hide a cycle."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "imagen_fast"

# What imagen_fast/kernels may import of the package besides itself: the leaf that loads
# the compiled module, and the framework-neutral core.
KERNELS_MAY_IMPORT = ("imagen_fast.kernels", "imagen_fast._compiled", "imagen_fast.core")
LEAVES = ("kernels/registry.py", "kernels/layout.py", "_compiled.py")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path):
    """Every module an import statement of ``path`` names, relative imports resolved
    (``from . import x`` counts as importing the package and package.x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield target
            yield from (f"{target}.{a.name}" for a in node.names)


def package_imports(path: Path):
    own = module_name(path)
    return sorted({m for m in imports_of(path)
                   if (m == "imagen_fast" or m.startswith("imagen_fast.")) and m != own})


def within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def sources(folder: str):
    return sorted((PACKAGE / folder).rglob("*.py"))


def test_the_walk_sees_relative_lazy_and_absolute_imports():
    """The checker itself: it must see the imports the layering rules are about."""
    dispatch = package_imports(PACKAGE / "ops" / "dispatch.py")
    assert "imagen_fast.kernels.registry" in dispatch          # module level, relative
    assert "imagen_fast.kernels.cpu" in dispatch               # inside a function
    assert "imagen_fast.ops._torch_backend" in dispatch        # from . import name


@pytest.mark.parametrize("path", sources("kernels"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_kernels_import_nothing_above_them(path):
    wrong = [m for m in package_imports(path) if not within(m, KERNELS_MAY_IMPORT)]
    assert not wrong, f"{path.relative_to(PACKAGE)} imports {wrong}: kernels sit below imagen_fast.ops"


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_nothing_of_the_package(leaf):
    assert package_imports(PACKAGE / leaf) == []


@pytest.mark.parametrize("path", sources("core"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_is_framework_neutral(path):
    """The core is shared by the torch and JAX paths: plain Python and numpy only, and
    nothing of the package outside itself."""
    mods = set(imports_of(path))
    assert not [m for m in mods if within(m, ("torch", "jax", "flax", "triton"))]
    assert all(within(m, ("imagen_fast.core",)) for m in package_imports(path))


def test_the_jax_path_shares_rules_through_the_core():
    """imagen_fast.jax takes validators, names, schedules and coefficients from the core,
    never from the torch op API's internals; its sampling does not import its training."""
    for path in sources("jax"):
        assert not [m for m in package_imports(path) if within(m, ("imagen_fast.ops",))], path
    assert not [m for m in package_imports(PACKAGE / "jax" / "cascade.py")
                if within(m, ("imagen_fast.jax.train",))]

