"""What a stage reads, from its own declaration, and the fingerprint made from it.

Each stage module (hdlib/stages/<name>.py for notebook NN_<name>) declares, beside its code,

    READS = {"config": [dotted keys or sections], "files": [study files it reads, from earlier stages]}

The runner reads that literal from the source (tools never import stages). A stage's fingerprint
hashes the values of its declared config keys, its notebook, the fingerprint of the stage before it
(whose outputs it may read), and the pre-trained weights where it loads them. Separately, its code
key hashes the hdlib modules it runs: those its notebook imports, and everything they import, each
read as syntax without docstrings (a comment or docstring edit is not a code change).
tests/test_stage_inputs.py runs the smoke study recording every config key each stage reads
(hdlib.config_reads) and fails on any read outside its declaration."""

from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from pathlib import Path

from ..config import Config
from ..config_reads import covered
from ..errors import HDLibError
from ..paths import REPO_ROOT

HDLIB = REPO_ROOT / "hdlib"

# Settings every stage may read that say how and where it runs, not what it computes: they key no result.
HOW_IT_RUNS = ("study.name", "study.results_root", "study.data_root", "study.device", "study.progress",
               "study.num_processes", "study.workers", "study.max_memory_gb", "data.num_workers")


def stage_module_path(stage_name: str) -> Path:
    """hdlib/stages/<name>.py of notebook NN_<name>."""
    return HDLIB / "stages" / f"{stage_name.split('_', 1)[1]}.py"


def notebook_source(stage_name: str) -> Path:
    return REPO_ROOT / "notebooks" / "src" / f"{stage_name}.py"


def declared_reads(stage_name: str) -> dict:
    """The READS literal of a stage's module: {"config": [...], "files": [...]}."""
    path = stage_module_path(stage_name)
    if not path.exists():
        raise HDLibError(f"stage {stage_name}: {path.relative_to(REPO_ROOT)} is missing (it declares what the stage reads)")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "READS" for t in node.targets):
            reads = ast.literal_eval(node.value)
            if set(reads) != {"config", "files"}:
                raise HDLibError(f"{path.relative_to(REPO_ROOT)}: READS needs exactly the keys config and files")
            return reads
    raise HDLibError(f"{path.relative_to(REPO_ROOT)}: no READS declaration (what stage {stage_name} reads)")


def config_values(cfg: Config, keys) -> dict:
    """{key: value} of declared keys (a section stands for all of it, less the HOW_IT_RUNS settings)."""
    d = cfg.to_dict()
    for how in HOW_IT_RUNS:
        section, name = how.split(".")
        d[section].pop(name, None)
    out = {}
    for key in keys:
        v = d
        for part in key.split("."):
            v = v[part]
        out[key] = v
    return out


def undeclared(read: set[str], declared) -> list[str]:
    """Recorded keys that neither a declaration nor HOW_IT_RUNS covers."""
    return sorted(k for k in read if not covered(k, declared) and k not in HOW_IT_RUNS)


# ------------------------------------------------------------------ the code a stage runs

def _module_file(module: str) -> Path | None:
    rel = Path(*module.split("."))
    for p in (REPO_ROOT / rel.with_suffix(".py"), REPO_ROOT / rel / "__init__.py"):
        if p.exists():
            return p
    return None


def _hdlib_imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "hdlib"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "hdlib":
                continue
            for a in node.names:
                out.add(f"{base}.{a.name}" if _module_file(f"{base}.{a.name}") else base)
    # importing a.b.c runs a/__init__ and a/b/__init__ too
    return out | {".".join(m.split(".")[:i]) for m in out for i in range(1, m.count(".") + 1)}


@lru_cache(maxsize=None)
def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def code_closure(stage_name: str) -> list[str]:
    """The hdlib modules a stage's notebook imports, and everything they import, sorted."""
    src = notebook_source(stage_name)
    todo = set(_hdlib_imports(_parsed(src), "notebook", False)) | {f"hdlib.stages.{stage_name.split('_', 1)[1]}"}
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        path = _module_file(m)
        if m in seen or path is None:
            continue
        seen.add(m)
        todo |= _hdlib_imports(_parsed(path), m, path.name == "__init__.py") - seen
    return sorted(seen)


def _without_docstrings(tree: ast.Module) -> str:
    tree = ast.parse(ast.unparse(tree))  # a copy
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) and \
                isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def module_digest(module: str) -> str:
    return hashlib.sha1(_without_docstrings(_parsed(_module_file(module))).encode()).hexdigest()[:12]


def code_key(stage_name: str) -> dict:
    """{"key": one hash over the stage's code, "modules": {module: its digest}}."""
    modules = {m: module_digest(m) for m in code_closure(stage_name)}
    return {"key": hashlib.sha1(json.dumps(modules, sort_keys=True).encode()).hexdigest()[:16], "modules": modules}


def changed_modules(old: dict | None, new: dict) -> list[str]:
    """Modules whose digest differs (or that one side lacks), as file paths."""
    old = old or {}
    names = sorted(m for m in set(old) | set(new) if old.get(m) != new.get(m))
    return [str(_module_file(m).relative_to(REPO_ROOT)) if _module_file(m) else m for m in names]
