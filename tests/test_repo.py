"""The repository's own promises: CI runs the README's test command, and the rooms of the design hold (DESIGN in
the README): the leaves import nothing of ours, the method's file no entry point, the plumbing package is imported by
the root files but never by the leaves, no two root files import each other in a circle, sample.py reaches neither a
trainer nor the toy, and the reader's files stay within their line budgets."""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEAVES = ["dinov3.py", "gemma2.py", "nextdit.py", "decoder.py"]
ROOT_FILES = {"dinov3", "gemma2", "nextdit", "decoder", "svgt2i", "data", "sample", "train", "train_autoencoder",
              "toy"}
OURS = ROOT_FILES | {"plumbing"}
PLUMBING = sorted(f for f in os.listdir(os.path.join(ROOT, "plumbing")) if f.endswith(".py"))
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
    assert not (imports_of("svgt2i.py") & (ENTRY_POINTS | {"data"}))
    # the method (everything before the latent statistics) uses no plumbing: only the pipeline's input checks and
    # its loading do, where input enters
    tree = ast.parse(read("svgt2i.py"))
    plumbed = {a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom)
               and (node.module or "").startswith("plumbing") for a in node.names}
    method = read("svgt2i.py").split("class LatentStats")[0].split('"""', 2)[2]
    used = {n.id for n in ast.walk(ast.parse(method)) if isinstance(n, ast.Name)}
    assert plumbed and not (used & (plumbed | {"plumbing"})), used & plumbed


def test_data_imports_only_the_glue_and_no_distributed_code():
    ours = imports_of("data.py") & OURS
    assert ours <= {"svgt2i", "plumbing"}, ours
    assert {m for m in module_imports("data.py") if m.startswith("plumbing")} <= {"plumbing.files"}
    assert not any(m.startswith("torch.distributed") for m in module_imports("data.py"))


def root_imports(name):
    return imports_of(name + ".py") & ROOT_FILES - {name}


def closure(name):
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(root_imports(m))
    return seen


def test_no_import_cycle_between_root_files_and_sample_reaches_no_trainer():
    for name in ROOT_FILES:
        for other in root_imports(name):
            assert name not in closure(other), f"{name}.py and {other}.py import each other"
    assert not closure("sample") & {"train", "train_autoencoder", "toy"}, closure("sample")
    for trainer in ("train", "train_autoencoder"):
        assert "toy" not in closure(trainer)


def test_the_plumbing_is_below_the_root_and_says_so():
    for name in PLUMBING:
        text = read(os.path.join("plumbing", name))
        doc = ast.get_docstring(ast.parse(text))
        assert doc, f"plumbing/{name} opens with a docstring saying what it holds"
        assert "need not read this" in doc, f"plumbing/{name}: say that a learner may skip it"
        # the plumbing imports the root files' public names only
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module in ROOT_FILES:
                assert not any(a.name.startswith("_") for a in node.names), (name, node.module)


def lines(name):
    return read(name).count("\n")


def test_the_reader_files_keep_their_budgets():
    budgets = {"svgt2i.py": 550, "sample.py": 200, "train.py": 450, "train_autoencoder.py": 700, "data.py": 450}
    for name, most in budgets.items():
        assert lines(name) <= most, f"{name}: {lines(name)} lines, budget {most}"
    for entry, most in (("sample", 2800), ("train", 3500), ("train_autoencoder", 3700)):
        total = sum(lines(m + ".py") for m in closure(entry))
        assert total <= most, f"{entry}.py opens {total} lines of root files, budget {most}"


def test_runtime_dependencies_only():
    allowed = {"torch", "numpy", "PIL", "safetensors", "sentencepiece"} | OURS
    stdlib = set(sys.stdlib_module_names)
    files = [n for n in os.listdir(ROOT) if n.endswith(".py")] + [os.path.join("plumbing", n) for n in PLUMBING]
    for name in files:
        extra = imports_of(name) - allowed - stdlib
        assert not extra, f"{name} imports {extra}: not a runtime dependency (requirements.txt)"
