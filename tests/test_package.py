"""Tests of the package surface: public names, lazy converter imports, layering."""

import subprocess
import sys

import pytest

import keras_bn
import keras_bn.converters as converters


def test_every_converter_export_resolves():
    for name in converters.__all__:
        assert getattr(converters, name) is not None, name


def test_layer_package_imports_without_the_converter_stack():
    code = (
        "import sys, keras_bn\n"
        "heavy = {'onnx', 'onnxruntime', 'keras_bn.converters'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert keras_bn.BatchNormalization.__module__ == 'keras_bn.layers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_layer_is_registered_for_deserialization():
    import keras

    assert keras.saving.get_registered_object("keras_bn>BatchNormalization") is (
        keras_bn.BatchNormalization
    )


def test_import_keras_bn_imports_no_framework(run_python):
    code = (
        "import sys, keras_bn\n"
        "heavy = {'keras', 'tensorflow', 'jax', 'torch', 'numpy'}\n"
        "loaded = heavy & {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded, loaded\n"
        "assert set(keras_bn.__all__) <= set(dir(keras_bn))\n"
    )
    run_python(["-c", code])


@pytest.fixture(scope="module")
def keras_bn_model_file(tmp_path_factory):
    """A .keras file holding a keras_bn.BatchNormalization (registered name needed)."""
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras_bn.BatchNormalization()(keras.layers.Dense(3)(inputs)))
    path = tmp_path_factory.mktemp("registered") / "model.keras"
    model.save(path)
    return path


@pytest.mark.parametrize(
    "imports",
    ["import keras_bn; import keras", "import keras; import keras_bn", "import keras_bn.layers"],
    ids=["keras_bn-first", "keras-first", "layers-module"],
)
def test_layer_is_registered_whichever_is_imported_first(run_python, keras_bn_model_file, imports):
    code = (
        f"{imports}\n"
        "import sys, keras\n"
        f"model = keras.saving.load_model({str(keras_bn_model_file)!r})\n"
        "assert [type(l).__module__ for l in model.layers][-1] == 'keras_bn.layers'\n"
        "hooks = [f for f in sys.meta_path if type(f).__name__ == '_RegisterAfterKeras']\n"
        "assert not hooks, 'the one-shot import hook is still installed'\n"
    )
    run_python(["-c", code])


def test_public_names_resolve_lazily():
    for name in keras_bn.__all__:
        assert getattr(keras_bn, name) is not None, name
    assert keras_bn.training.recalibrate_batch_norm is keras_bn.recalibrate_batch_norm


def _module_imports() -> dict[str, set[str]]:
    """Each package module -> the package modules it imports, anywhere in its code
    (function-local imports too: a cycle hidden in a function is still a cycle)."""
    import ast
    from pathlib import Path

    root = Path(keras_bn.__file__).parent.parent
    files = {}
    for folder, package in (("keras_bn", "keras_bn"), ("converters", "keras_bn.converters")):
        for path in (root / folder).rglob("*.py"):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    modules = set(files)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module if is_package else module.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                # `from pkg import sub` imports the module pkg.sub; `from pkg import
                # name` imports from pkg itself.
                names = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for name in names:
                target = resolve(name)
                if target and target != module and name.startswith("keras_bn"):
                    edges.add(target)
        graph[module] = edges
    return graph


def test_no_import_cycles_among_package_modules():
    graph = _module_imports()
    assert "keras_bn.converters.onnx.export" in graph and "keras_bn.layers" in graph
    # Tarjan's strongly connected components: any of size > 1 is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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
    assert not cycles, cycles


def test_layer_package_never_imports_the_converter():
    graph = _module_imports()
    for module, targets in graph.items():
        # `python -m keras_bn` is the command line, which is the converter's.
        if not module.startswith("keras_bn.converters") and module != "keras_bn.__main__":
            assert not any(t.startswith("keras_bn.converters") for t in targets), module
