"""The repository's own promises: CI runs the README's test command, and the rooms of the design hold: the leaves
import nothing of ours, the glue no entry point and not data.py, data.py only the glue and the leaves."""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEAVES = ["dinov3.py", "gemma2.py", "nextdit.py", "decoder.py"]
OURS = {"dinov3", "gemma2", "nextdit", "decoder", "svgt2i", "data", "runs", "sample", "train", "train_autoencoder",
        "toy"}
ENTRY_POINTS = {"sample", "train", "train_autoencoder", "toy"}


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def readme_commands():
    text = read("README.md")
    block = text.split("```")[1]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert cmds[0].startswith("pip install -r requirements.txt && python sample.py")
    ci = [line.strip() for line in read(".ci/run").splitlines()]
    assert cmds[1] in ci, "the test command in .ci/run must be the README's, verbatim"


def imports_of(name):
    tree = ast.parse(read(name))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split(".")[0])
    return mods


def module_imports(name):
    """Full module names imported by a file (import a.b / from a.b import c)."""
    tree = ast.parse(read(name))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_leaves_import_nothing_of_ours():
    for leaf in LEAVES:
        assert not (imports_of(leaf) & OURS), f"{leaf} must not import other project modules"


def test_glue_never_imports_entry_points():
    assert not (imports_of("svgt2i.py") & {"sample", "train", "toy"})
    assert not (imports_of("svgt2i.py") & (ENTRY_POINTS | {"data", "runs"}))


def test_data_imports_only_the_glue_and_no_distributed_code():
    ours = imports_of("data.py") & OURS
    assert ours <= {"svgt2i"}, ours
    assert imports_of("runs.py") & OURS <= {"svgt2i", "data"}
    assert not any(m.startswith("torch.distributed") for m in module_imports("data.py"))


def test_runtime_dependencies_only():
    allowed = {"torch", "numpy", "PIL", "safetensors", "sentencepiece"} | OURS
    stdlib = set(sys.stdlib_module_names)
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            extra = imports_of(name) - allowed - stdlib
            assert not extra, f"{name} imports {extra}: not a runtime dependency (requirements.txt)"
