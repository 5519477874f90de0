"""The package's import graph, stated: every module of tlama_mini sits in one layer, and imports only from
its own layer or the layers below, with no cycle; imports sit at the top of each file, except the few
listed in LAZY with their reason. Parsed with `ast` (nothing is imported), so a new module or a new import
that breaks the layering fails here with its name."""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tlama_mini"

# Lowest first. A module may import from its own layer and the layers below, never from a layer above.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundations: files, devices, shapes, the config, pure helpers", {
        "paths", "device", "config", "shapes", "memory", "remat", "masks", "norm", "kv_cache", "parallel",
        "quant", "chat_template", "chat_data", "embeddings", "compare", "fuse"}),
    ("maths built on them: tokenizers, RoPE, kernels, optimizers, the loss of DPO", {
        "tokenizer", "tiktoken_local", "rope", "flash", "triton_flash", "triton_kernels", "muon", "ffn", "moe",
        "lora", "dpo", "blockwise_attn", "data"}),
    ("layers", {"attention", "vision", "blockwise"}),
    ("models", {"model", "bpt", "palm"}),
    ("model files: checkpoints, GGUF, Hugging Face, generation, loading a run", {
        "checkpoint", "gguf", "hf_io", "hf_llama4", "hf", "sample"}),
    ("training: the pure loop, fine-tuning, chat data and tasks", {
        "training", "sft", "finetune", "chat", "chat_tasks"}),
    ("drivers: the Trainer, the command line, the package's front page, the lesson checks", {
        "trainer", "report", "cli", "__main__", "__init__", "checks.__init__", "checks.__main__", "checks.common",
        *(f"checks.{p.stem}" for p in (PACKAGE / "checks").glob("lesson*.py"))}),
]

# Imports inside a function: (module, what it imports) -> why it cannot be at the top.
LAZY: dict[tuple[str, str], str] = {
    ("attention", "triton_flash"): "triton is optional (and absent on macOS / Windows)",
    ("triton_flash", "triton_kernels"): "triton_kernels imports triton, which is optional, and TRITON_INTERPRET "
                                        "must be set before triton is imported (on a machine without CUDA)",
    ("blockwise", "bpt"): "seed 002's API names bpt's classes in blockwise (a PEP 562 re-export on first use; "
                          "bpt builds on blockwise)",
    ("gguf", "gguf"): "the `gguf` package (llama.cpp's reader) is an optional extra",
    ("chat_template", "jinja2"): "jinja2 (chat templates) is an optional extra",
    ("report", "matplotlib"): "matplotlib (the loss plot) is an optional extra: training works without it",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


def imports_of(path: Path) -> tuple[set[str], set[tuple[str, bool]]]:
    """(tlama_mini modules this file imports, {(imported name, at top level)} for every import)."""
    name = module_name(path)
    package = name.split(".")[:-1]  # the package the module is in: [] or ["checks"]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    internal, every = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            if node.module:
                targets = [".".join([*base, node.module])]
            else:  # from . import a, b
                targets = [".".join([*base, alias.name]) for alias in node.names]
            for t in targets:
                t = t if t in ALL_MODULES else t + ".__init__" if t + ".__init__" in ALL_MODULES else t
                internal.add(t)
                every.add((t, id(node) in top))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for n in names:
                every.add((n.split(".")[0], id(node) in top))
    return internal, every


ALL_MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def check_layering(graph: dict[str, set[str]], layers: list[tuple[str, set[str]]]) -> list[str]:
    """Problems of an import graph {module: modules it imports} against `layers` (lowest first): modules in
    no layer or in two, upward imports, and cycles (found by depth-first search, named in import order)."""
    problems = []
    rank: dict[str, int] = {}
    for i, (_, members) in enumerate(layers):
        for m in members:
            if m in rank:
                problems.append(f"{m} is in two layers")
            rank[m] = i
    for m in sorted(graph):
        if m not in rank:
            problems.append(f"{m} is in no layer: add it to LAYERS")
    for m in sorted(graph):
        for t in sorted(graph[m]):
            if m in rank and t in rank and rank[t] > rank[m]:
                problems.append(f"upward import: {m} (layer {rank[m]}, {layers[rank[m]][0]}) imports {t} "
                                f"(layer {rank[t]}, {layers[rank[t]][0]})")
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                problems.append("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return problems


def package_graph(*, with_lazy: bool) -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        _, every = imports_of(path)
        graph[name] = {t for t, top in every if t in ALL_MODULES and (top or with_lazy and (name, t) not in LAZY)}
    return graph


def test_every_module_imports_only_its_own_layer_or_below_without_cycles():
    problems = check_layering(package_graph(with_lazy=True), LAYERS)
    assert not problems, "\n".join(problems)


def test_imports_are_at_the_top_of_each_file_except_the_listed_lazy_ones():
    lazy = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        lazy |= {(name, t) for t, top in imports_of(path)[1] if not top}
    assert lazy <= LAZY.keys(), f"imports inside functions, not in LAZY: {sorted(lazy - LAZY.keys())}"
    assert LAZY.keys() <= lazy, f"LAZY lists imports that are no longer lazy: {sorted(LAZY.keys() - lazy)}"


# --- the checker itself, on made-up graphs
FAKE_LAYERS = [("low", {"a", "b"}), ("high", {"c"})]


def test_the_checker_accepts_a_clean_graph():
    assert check_layering({"a": set(), "b": {"a"}, "c": {"a", "b"}}, FAKE_LAYERS) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, "import cycle: a -> b -> a"),        # a cycle inside a layer
    ({"a": {"c"}, "b": set(), "c": {"a"}}, "upward import: a (layer 0, low) imports c"),
    ({"a": {"c"}, "b": set(), "c": {"b"}}, "upward import: a"),
    ({"a": set(), "b": set(), "c": set(), "d": set()}, "d is in no layer"),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "import cycle: a -> b -> c -> a"),
])
def test_the_checker_finds_a_planted_cycle_or_upward_import(graph, expected):
    problems = check_layering(graph, FAKE_LAYERS)
    assert any(expected in p for p in problems), problems


def test_the_checker_finds_a_cycle_planted_in_the_real_graph():
    graph = package_graph(with_lazy=True)
    graph["config"] = graph["config"] | {"trainer"}  # config (the bottom) importing the Trainer (the top)
    problems = check_layering(graph, LAYERS)
    assert any(p.startswith("upward import: config") for p in problems)
    assert any(p.startswith("import cycle:") and "config" in p and "trainer" in p for p in problems)


def test_every_module_is_in_the_readme_table():
    """The README's table of modules names every module of the package, so a new one cannot go unmentioned."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    table = "\n".join(line for line in readme.splitlines() if line.startswith("| `"))
    named = set(re.findall(r"`([a-z_0-9]+)\.py`", table))
    missing = sorted({p.stem for p in PACKAGE.glob("*.py")} - named)
    assert not missing, f"README.md's module table does not mention: {', '.join(m + '.py' for m in missing)}"
