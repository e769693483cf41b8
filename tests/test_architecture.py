"""Package structure: no import cycles among leakaudit's modules, and no paths into a development checkout.

Cycles count every `import leakaudit.x` / `from leakaudit.x import y`, at module level or inside a function:
a function-level import that closes a cycle only hides the tangle until someone moves it up."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "leakaudit"


def _module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(f): f for f in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted name refers to: itself, else its longest prefix that is a module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """leakaudit modules `module` imports anywhere in its file (`from pkg import mod` counts as `pkg.mod`)."""
    found: set[str] = set()
    is_package = file.name == "__init__.py"
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level-1 more
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "leakaudit" or target.startswith("leakaudit."):
                resolved = _resolve(_lazy_home(target), modules)
                if resolved and resolved != module:
                    found.add(resolved)
    return found


def _lazy_home(target: str) -> str:
    """A name a package re-exports lazily (leakaudit.models: `_WHERE`, imported through importlib, which the
    parser cannot see) → the submodule it comes from, so an import of it is an edge to that module."""
    from leakaudit.models import _WHERE

    package, _, name = target.rpartition(".")
    return f"{package}.{_WHERE[name]}" if package == "leakaudit.models" and name in _WHERE else target


def import_graph() -> dict[str, set[str]]:
    from leakaudit.models import _WHERE

    modules = _modules()
    graph = {name: _imports(name, file, modules) for name, file in modules.items()}
    graph["leakaudit.models"] |= {f"leakaudit.models.{m}" for m in _WHERE.values()}  # its lazy re-exports
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Distinct cycles, found one at a time by graphlib and broken at their first edge until none is left."""
    graph = {k: set(v) for k, v in graph.items()}
    cycles = []
    while True:
        try:
            graphlib.TopologicalSorter(graph).prepare()
            return cycles
        except graphlib.CycleError as exc:
            cycle = exc.args[1]  # [a, b, ..., a] where each imports... is imported by the previous one
            cycles.append(cycle)
            graph[cycle[1]].discard(cycle[0])


def test_import_graph_sees_every_import_form():
    """The graph builder is what the cycle check relies on: it must see each form of import."""
    graph = import_graph()
    assert "leakaudit.errors" in graph["leakaudit.models.spec"]  # from leakaudit.errors import X (module level)
    assert "leakaudit.resources" in graph["leakaudit.models.factories"]  # from leakaudit import resources (in a def)
    assert "leakaudit.experiment" in graph["leakaudit.demo"]  # from leakaudit.experiment import run_experiment
    assert "leakaudit.models.load" in graph["leakaudit.perplexity"]  # from leakaudit.models import LoadedModel (lazy)
    assert "leakaudit.models.load" in graph["leakaudit.models"]  # the lazy package's re-exports are its edges
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) != []
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (each module imports the one before it):\n" + "\n".join(
        " <- ".join(c) for c in cycles)


def test_no_paths_into_a_development_checkout():
    """The installed package must work anywhere: nothing reaches beside the repo for data."""
    hits = [f"{f.relative_to(PACKAGE.parent)}: {needle.decode()}" for f in sorted(PACKAGE.rglob("*"))
            if f.is_file() and "__pycache__" not in f.parts for needle in (b"../shared", b"shared/data") if needle in f.read_bytes()]
    assert not hits, hits


def test_the_report_has_no_per_kind_branches():
    """Each kind draws its own report section and headline (leakaudit/kinds): the report only asks the registry."""
    hits = [f"{f.name}:{i}" for f in sorted((PACKAGE / "report").glob("*.py"))
            for i, line in enumerate(f.read_text().splitlines(), start=1) if "kind ==" in line]
    assert not hits, hits


def test_every_experiment_kind_is_registered_and_complete():
    """The schema, the plan check and the report come from the registry: every kind has typed options that
    refuse unknown keys, a run method and a Result."""
    from leakaudit.kinds import get_kind, kind_names
    from leakaudit.kinds.base import Kind, KindOptions, Result

    assert set(kind_names("evaluate")) == {"mia", "user-inference", "pii", "pii-logprob", "perplexity", "backdoor"}
    assert set(kind_names("generate")) == {"continuation", "self-instruct", "replace-pii", "backdoor-mix"}
    for name in kind_names():
        kind = get_kind(name)
        assert type(kind).run is not Kind.run, name
        assert issubclass(kind.Options, KindOptions) and kind.Options.model_config.get("extra") == "forbid", name
        assert issubclass(kind.Result, Result), name


def test_model_cache_keeps_recently_used_models_within_memory_budget(monkeypatch):
    """A run's stages share loaded models: all stay while they fit the budget, least recently used leave
    first, and a model still held is never loaded again."""
    import types

    import torch

    import leakaudit.models as models
    from leakaudit.kinds import base

    loads: list[str] = []

    def fake_load(spec, **options):
        loads.append(spec)
        weights = torch.nn.Linear(256, 256, bias=False)  # 256 KiB of fp32 weights
        return types.SimpleNamespace(model=weights, device=torch.device("cpu"))

    monkeypatch.setattr(models, "load_model", fake_load)
    size = 256 * 256 * 4
    monkeypatch.setattr(base, "_memory_budget", lambda device: 10 * size)
    cache = base.ModelCache()
    for spec in ["a", "b", "c", "a", "b", "c"]:
        cache.get(spec)
    assert loads == ["a", "b", "c"]  # all three fit: each loaded once
    monkeypatch.setattr(base, "_memory_budget", lambda device: 2 * size + 1)
    cache = base.ModelCache()
    loads.clear()
    for spec in ["a", "b", "a", "c", "a", "b"]:
        cache.get(spec)
    assert loads == ["a", "b", "c", "b"]  # c evicts b (least recently used), then b evicts c
    cache = base.ModelCache(keep=1)
    loads.clear()
    for spec in ["a", "b", "a"]:
        cache.get(spec)
    assert loads == ["a", "b", "a"]


def test_the_files_the_suite_runs_first_exist():
    """conftest.LONGEST_FILES orders the suite for two workers; a renamed file would silently drop out of it."""
    from conftest import LONGEST_FILES

    here = Path(__file__).parent
    assert [name for name in LONGEST_FILES if not (here / name).exists()] == []


def test_file_hashes_and_the_report_need_no_torch(tmp_path):
    """`leakaudit report` re-checks every stage's output hashes (experiment/manifest.py, models' file_sha256):
    importing them through leakaudit.models loaded torch and transformers, 8 of the report's 10 s on a tiny
    run. The package's names load on first use."""
    import subprocess
    import sys

    (tmp_path / "f.bin").write_bytes(b"abc")
    code = ("import sys\nimport leakaudit.report.html, leakaudit.experiment.manifest\n"
            "from leakaudit.models import file_sha256\nfile_sha256(__import__('pathlib').Path(sys.argv[1]))\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.bin")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr[-2000:])


def test_the_models_package_names_load_on_first_use(monkeypatch):
    import leakaudit.models as models
    import leakaudit.models.spec as spec

    assert models.load_model.__module__ == "leakaudit.models.load" and "load_model" in dir(models)
    assert models.gguf.__name__ == "leakaudit.models.gguf"  # a submodule, as the eager package had it
    real = spec.resolve_spec
    with monkeypatch.context() as patch:  # patched where it lives, read through the package, then restored
        patch.setattr(spec, "resolve_spec", len)
        assert models.resolve_spec is len
    assert models.resolve_spec is real  # (a first lookup kept in the package outlived the patch)
    with __import__("pytest").raises(AttributeError, match="no attribute 'nope'"):
        models.nope  # noqa: B018


def test_whole_texts_are_tokenised_in_one_place():
    """Special tokens at a text's start only (models/tokens.encode): four callers that still asked the tokenizer
    for its special tokens themselves (pii-logprob contexts, dc_pdd's token ids, DP-SGD's row lengths, the
    packing probe) scored after, counted or paired tokens with an EOS the others leave off."""
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{n}" for path in sorted(PACKAGE.rglob("*.py"))
                 if path.name != "tokens.py"
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
                 if "add_special_tokens=True" in line]
    assert offenders == []
