"""Untrusted checkpoints and configs: nothing a user hands transferlab is ever unpickled or
evaluated. An audit of every Python file in the repository (by syntax tree, so comments and
strings do not count), and a checkpoint carrying a code-running pickle that must be refused."""

from __future__ import annotations

import ast
import importlib
import pickle
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    p
    for d in ("orchestrator", "trainers", "datasets_", "benchmarks", "deploy", "tests")
    if (ROOT / d).is_dir()
    for p in (ROOT / d).rglob("*.py")
)

FORBIDDEN_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cPickle", "load"),
    ("dill", "load"),
    ("dill", "loads"),
    ("joblib", "load"),
    ("marshal", "loads"),
    ("marshal", "load"),
    ("shelve", "open"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
    ("yaml", "load_all"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
}
UNSAFE_LOADERS = {"Loader", "FullLoader", "UnsafeLoader"}
ALLOW = "# audit: deliberate exploit"


def _dotted(func: ast.expr) -> tuple[str, str] | None:
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return func.value.id, func.attr
    return None


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def audit(path: Path) -> list[str]:
    """Unsafe deserialization or evaluation calls in one file, as 'path:line: what'."""
    problems = []
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text, filename=str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if ALLOW in lines[node.lineno - 1] and path.parent.name == "tests":
            continue  # a test demonstrating the exploit on purpose; never allowed outside tests/
        where = f"{path.relative_to(ROOT) if ROOT in path.parents else path}:{node.lineno}"
        name = _dotted(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec", "compile", "__import__"):
            problems.append(f"{where}: {node.func.id}()")
        elif name in FORBIDDEN_CALLS:
            problems.append(f"{where}: {'.'.join(name)}()")
        elif name == ("yaml", "load"):
            loader = kwargs.get("Loader")
            loader_name = loader.attr if isinstance(loader, ast.Attribute) else getattr(loader, "id", None)
            if loader_name is None or loader_name in UNSAFE_LOADERS:
                problems.append(f"{where}: yaml.load() without a SafeLoader")
            elif loader_name not in ("SafeLoader", "CSafeLoader"):
                import yaml

                cls = getattr(importlib.import_module(_module_name(path)), loader_name, None)
                if not (isinstance(cls, type) and issubclass(cls, yaml.SafeLoader)):
                    problems.append(f"{where}: yaml.load() with {loader_name}, not a SafeLoader subclass")
        elif name is not None and name[1] == "load" and name[0] == "torch":
            flag = kwargs.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{where}: torch.load() without weights_only=True")
        elif name is not None and name[1] == "load" and name[0] in ("np", "numpy"):
            flag = kwargs.get("allow_pickle")
            if isinstance(flag, ast.Constant) and flag.value is True:
                problems.append(f"{where}: numpy load with allow_pickle=True")
    return problems


def test_the_audit_finds_what_it_looks_for(tmp_path):
    """The audit is not vacuous: a file with every forbidden pattern is caught line by line."""
    bad = tmp_path / "probe.py"
    bad.write_text(
        "import pickle, yaml, torch\n"
        "pickle.loads(b'')\neval('1')\nyaml.load('a')\nyaml.load('a', Loader=yaml.Loader)\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nmodel.eval()\nyaml.safe_load('a')\n"
        "torch.load('x', weights_only=True)\n"
    )
    found = audit(bad)
    assert [p.split(":")[-2] for p in found] == ["2", "3", "4", "5", "6", "7"], found


def test_no_unsafe_deserialization_or_eval_in_the_source_tree():
    assert len(SOURCES) > 30
    assert {p.parent.name for p in SOURCES} >= {"orchestrator", "trainers", "datasets_", "tests"}
    problems = [p for path in SOURCES for p in audit(path)]
    assert not problems, "\n".join(problems)


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_malicious_checkpoint_is_refused(tmp_path):
    from trainers.models import build_model, model_config
    from trainers.pretrain import CHECKPOINT_FILE, load_checkpoint, load_model

    marker = tmp_path / "payload-ran"
    model = build_model(model_config("tiny-cnn"), 10)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    meta = {"model_config": model_config("tiny-cnn"), "num_classes": 10, "note": _Payload(marker)}
    torch.save({"model": model.state_dict(), "optimizer": None, "epoch": 0, "meta": meta}, ckpt / CHECKPOINT_FILE)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(str(ckpt))
    with pytest.raises(pickle.UnpicklingError):
        load_model(str(ckpt))
    assert not marker.exists()
    # The same file is a live exploit for a loader that trusts it (what the audit forbids).
    torch.load(ckpt / CHECKPOINT_FILE, weights_only=False)  # audit: deliberate exploit
    assert marker.exists()
