"""The package's shape: no import circle, entry scripts are leaves, one patch table that
compat checks and apply()/remove() walk, flags defined once."""
import ast
import importlib
import os

import pytest

import sparsevlm_patch
from sparsevlm_patch import compat, flags, hooks

PACKAGE = os.path.dirname(os.path.abspath(sparsevlm_patch.__file__))
ROOT = os.path.dirname(PACKAGE)
ENTRIES = ("train", "run")  # `python -m sparsevlm_patch.<entry>`


def package_imports():
    """module -> the package modules it imports (at any depth of its code)."""
    graph = {}
    for name in sorted(os.listdir(PACKAGE)):
        if not name.endswith(".py"):
            continue
        module = name[:-3]
        tree = ast.parse(open(os.path.join(PACKAGE, name)).read())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    targets |= {node.module} if node.module else {a.name for a in node.names}
                elif node.module == "sparsevlm_patch":
                    targets |= {a.name for a in node.names}
                elif (node.module or "").startswith("sparsevlm_patch."):
                    targets.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                targets |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sparsevlm_patch.")}
        graph[module] = {t for t in targets if os.path.exists(os.path.join(PACKAGE, t + ".py"))} - {module}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = package_imports()
    graph.pop("__init__")  # `import sparsevlm_patch` from an entry script is the public API
    for module in graph:
        graph[module].discard("__init__")

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,))) for n in graph.get(start, ()))

    circles = [m for m in graph if reaches(m, m)]
    assert not circles, {m: graph[m] for m in circles}
    importers = {m for m, targets in graph.items() if set(ENTRIES) & targets}
    assert not importers, importers  # entry scripts are leaves


def test_every_patch_row_matches_the_installed_upstream():
    for patch in hooks.PATCHES:
        owner, name = hooks._owner_and_name(importlib.import_module(patch.module), patch.path)
        compat.check_signature(patch.path, getattr(owner, name), fields=patch.replace)
    assert len(compat.EXPECTED) == len(hooks.PATCHES)


def test_apply_and_remove_walk_the_whole_table():
    for patch in hooks.PATCHES:
        importlib.import_module(patch.module)
    sparsevlm_patch.remove()
    originals = {}
    for patch in hooks.PATCHES:
        owner, name = hooks._owner_and_name(importlib.import_module(patch.module), patch.path)
        originals[patch.path] = (owner, name, owner.__dict__.get(name))
    try:
        sparsevlm_patch.apply()
        for path, (owner, name, original) in originals.items():
            assert owner.__dict__.get(name) is not original, path
    finally:
        sparsevlm_patch.remove()
        for path, (owner, name, original) in originals.items():
            assert owner.__dict__.get(name) is original, path
        sparsevlm_patch.apply()


def test_a_changed_signature_in_any_row_fails_before_patching(monkeypatch):
    from llava.train import llava_trainer

    sparsevlm_patch.remove()
    monkeypatch.setattr(llava_trainer.LLaVATrainer, "log", lambda self, logs, extra: None)
    try:
        with pytest.raises(compat.UnsupportedVersionError, match=r"LLaVATrainer.log.*'extra'"):
            sparsevlm_patch.apply()
    finally:
        monkeypatch.undo()
        sparsevlm_patch.remove()
        sparsevlm_patch.apply()


def test_flags_are_defined_once():
    import inspect

    from sparsevlm_patch.run import USAGE

    readme = open(os.path.join(ROOT, "README.md")).read()
    assert flags.markdown_table() in readme, "README's flag table: paste `python -m sparsevlm_patch.flags`"
    keywords = list(inspect.signature(sparsevlm_patch.enable).parameters)[1:]
    assert set(keywords) == set(flags.CONFIG_KEYS)
    for key in keywords:
        assert inspect.signature(sparsevlm_patch.enable).parameters[key].default == flags.DEFAULTS[key]
    for flag in flags.FLAGS:
        if flag.env:
            assert flag.env in USAGE
    sources = {name: open(os.path.join(PACKAGE, name)).read() for name in os.listdir(PACKAGE) if name.endswith(".py")}
    for flag in flags.FLAGS:  # each name is spelled in the table only
        own_train_name = flag.train if flag.train and flag.train != flag.key else None
        for name in filter(None, (flag.env, own_train_name and f'"{own_train_name}"')):
            if flag.key == "sparse":
                continue  # SPARSEVLM: also the switch that `import sparsevlm_patch` reads
            spelled = [f for f, text in sources.items() if name in text and f != "flags.py"]
            assert not spelled, (name, spelled)
