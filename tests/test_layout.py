"""The package's layout: no import cycles in src/ (imports inside functions count too),
the geometry module imports nothing of ours but slide, and the model formats the
schema allows are the ones wsiseg.models knows. Needs no data."""

import ast
from pathlib import Path

import yaml
from conftest import REPO

SRC = REPO / "src" / "wsiseg"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def our_imports(path: Path) -> set:
    """Modules of ours that ``path`` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("wsiseg")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("wsiseg"):
                mod = node.module
            else:
                continue
            for a in node.names:  # `from . import labels` imports the module wsiseg.labels
                sub = f"{mod}.{a.name}"
                out.add(
                    sub
                    if (SRC.parent / (sub.replace(".", "/") + ".py")).exists()
                    or (SRC.parent / sub.replace(".", "/")).is_dir()
                    else mod
                )
    out.discard(name)
    return out


def import_graph() -> dict:
    graph = {module_name(p): our_imports(p) for p in SRC.rglob("*.py")}
    # importing wsiseg.models.x runs wsiseg.models/__init__ first: not an edge of x's own
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return stack[stack.index(d) :] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "wsiseg.plan" in graph and "wsiseg.models.checkpoint" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_geometry_imports_only_slide():
    assert import_graph()["wsiseg.geometry"] <= {"wsiseg.slide"}


def test_models_package_and_unet_stay_apart():
    graph = import_graph()
    assert not any(d.startswith("wsiseg.models") for d in graph["wsiseg.unet"])  # the architecture alone
    # the Snakefile imports wsiseg.models while it builds the DAG: no torch there
    tree = ast.parse((SRC / "models" / "__init__.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(n.split(".")[0] == "torch" for n in names)


def test_schema_postprocess_keys_are_the_instance_params():
    """model.postprocess in the schema allows exactly the post-processing's settings."""
    from wsiseg.postparams import param_names

    schema = yaml.safe_load(open(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    keys = schema["properties"]["model"]["properties"]["postprocess"]["properties"]
    assert sorted(keys) == sorted(param_names())


def test_schema_formats_are_the_known_formats():
    from wsiseg.models import FORMATS

    schema = yaml.safe_load(open(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    enum = schema["properties"]["model"]["properties"]["format"]["enum"]
    assert set(enum) == {"auto", *FORMATS}


def test_command_line_booleans_follow_the_schema():
    """`--config tiling='{cpu_bf16: true}'` arrives as text: where the workflow's schema wants a
    boolean (any block, any depth) 'true'/'FALSE' become booleans; other text and other keys
    are left as they came, for the schema to judge."""
    import yaml

    from wsiseg.config_values import command_line_booleans

    schema = yaml.safe_load(open(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    cfg = dict(
        tiling=dict(cpu_bf16="true", amp="FALSE", tile_size="512", margin="auto"),
        model=dict(tta="True", name="true"),
        stats=dict(outlines="maybe"),
        device="cpu",
    )
    assert command_line_booleans(cfg, schema) == dict(
        tiling=dict(cpu_bf16=True, amp=False, tile_size="512", margin="auto"),
        model=dict(tta=True, name="true"),  # a name is text, whatever it says
        stats=dict(outlines="maybe"),  # refused later by the schema, with its own message
        device="cpu",
    )
