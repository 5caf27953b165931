"""SGLang's own code, from its published wheels, on a CPU machine without SGLang's dependencies.

``ensure(version)`` downloads the ``sglang==version`` wheel with ``pip download --no-deps`` (the
CPython 3.11 / manylinux_2_34 one where SGLang ships binary wheels: only its Python sources are used)
into a cache (``$ASYNC_OR1_SGLANG_WHEELS``, else ``$ASYNC_OR1_CACHE/wheels``, else
``~/.cache/async-or1/wheels``; under a file lock, so concurrent runs share one download) and unpacks
its ``sglang/`` Python sources beside the wheel. Nothing of SGLang is committed here; CI downloads on
a fresh machine.

``install(root)`` makes ``import sglang...`` resolve to those sources, *lazily*: a module's
top-level statements run only when a name they bind is first needed (by SGLang's code or ours).
Importing ``sglang.srt.managers.scheduler`` therefore does not import SGLang's CUDA kernels, vision
models or HTTP server: only what the code under test actually touches is executed, unmodified, from
the wheel. ``method(module, "Class.name")`` compiles one method out of a class without executing the
class statement (whose dozens of mixins would pull in everything), with the module's globals.

Whatever SGLang's code touches and cannot run here is replaced, and each replacement is listed in
``tests/test_sglang_contract.py`` with its reason.
"""

from __future__ import annotations

import __future__
import abc
import ast
import builtins
import fcntl
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path
from typing import Any, Callable

# The support matrix the contract tests prove (README "SGLang versions").
MATRIX = ("0.4.9.post6", "0.5.5", "0.5.10", "0.5.20", "0.5.21", "0.5.22", "0.5.23")


def cache_dir() -> Path:
    if os.environ.get("ASYNC_OR1_SGLANG_WHEELS"):
        return Path(os.environ["ASYNC_OR1_SGLANG_WHEELS"])
    base = Path(os.environ.get("ASYNC_OR1_CACHE", Path.home() / ".cache" / "async-or1"))
    return base / "wheels"


def ensure(version: str) -> tuple[Path, dict]:
    """``(root, info)``: a directory holding ``sglang/`` of that version, downloaded and unpacked
    once; ``info`` says whether this call downloaded and how long it took."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"sglang-{version}"
    info = {"version": version, "downloaded": False, "download_s": 0.0, "unpack_s": 0.0}
    if (root / ".complete").exists():
        return root, info
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".complete").exists():
            return root, info
        wheels = sorted(cache.glob(f"sglang-{version}-*.whl"))
        if not wheels:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                # Only the Python sources are used, so one fixed wheel (the same files on any machine) is
                # fetched whatever this machine's Python or glibc; never an sdist to build.
                r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                                    "-q", "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                                    "--platform", "manylinux_2_34_x86_64", "-d", tmp, f"sglang=={version}"],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"pip download sglang=={version} failed:\n{r.stdout}\n{r.stderr}")
                for w in Path(tmp).glob("*.whl"):
                    shutil.move(str(w), cache / w.name)
            info.update(downloaded=True, download_s=time.perf_counter() - t0)
            wheels = sorted(cache.glob(f"sglang-{version}-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download sglang=={version} left no wheel in {cache}")
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".sglang-{version}-"))
        with zipfile.ZipFile(wheels[0]) as z:
            for name in z.namelist():
                if name.startswith("sglang/") and name.endswith(".py"):
                    z.extract(name, tmp)
        (tmp / ".complete").write_text(wheels[0].name + "\n")
        shutil.rmtree(root, ignore_errors=True)
        os.rename(tmp, root)
        info["unpack_s"] = time.perf_counter() - t0
    return root, info


# ---------------------------------------------------------------------------------------------
# stubs: modules SGLang imports that are not installed here and not on the code path under test
# ---------------------------------------------------------------------------------------------

class _StubMeta(abc.ABCMeta):
    """A stand-in class: any attribute is another stand-in, calling it makes an instance, it can be
    subclassed (also beside ABCs) and used as a decorator (returns the function unchanged)."""

    def __new__(mcls, name, bases, ns, **kw):
        return super().__new__(mcls, name, bases, ns)

    def __init__(cls, name, bases, ns, **kw):
        super().__init__(name, bases, ns)

    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stub_class(f"{cls.__name__}.{name}")

    def __call__(cls, *a, **k):
        if len(a) == 1 and not k and callable(a[0]):
            return a[0]
        return _stub_class(cls.__name__ + "()")

    def __or__(cls, other):
        return cls

    __ror__ = __or__

    def __getitem__(cls, key):
        return cls

    def __iter__(cls):
        return iter(())

    def __bool__(cls):
        return False


def _stub_class(name: str) -> type:
    return _StubMeta(name, (), {"__init_subclass__": classmethod(lambda cls, **kw: None)})


class StubModule(types.ModuleType):
    __version__ = "0.0.0"

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = _stub_class(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


# ---------------------------------------------------------------------------------------------
# lazy sources
# ---------------------------------------------------------------------------------------------

_ANNOTATIONS = __future__.annotations.compiler_flag


def _binds(node: ast.stmt) -> set[str]:
    """Names a top-level statement binds."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Import):
        return {a.asname or a.name.split(".")[0] for a in node.names}
    if isinstance(node, ast.ImportFrom):
        return {a.asname or a.name for a in node.names}
    out: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            out.add(sub.id)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(sub.name)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)) and sub is not node:
            out |= _binds(sub)
    return out


def _reads_now(node: ast.AST, deferred_annotations: bool) -> set[str]:
    """Names a statement reads while it executes (function bodies read theirs later, lazily)."""
    out: set[str] = set()

    def visit(n: ast.AST) -> None:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in n.decorator_list + n.args.defaults + [x for x in n.args.kw_defaults if x is not None]:
                visit(d)
            if not deferred_annotations:
                for a in n.args.posonlyargs + n.args.args + n.args.kwonlyargs:
                    if a.annotation is not None:
                        visit(a.annotation)
                if n.returns is not None:
                    visit(n.returns)
            return
        if isinstance(n, ast.Lambda):
            for d in n.args.defaults:
                visit(d)
            return
        if isinstance(n, ast.AnnAssign) and deferred_annotations:
            if n.value is not None:
                visit(n.value)
            return
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
            out.add(n.id)
        for c in ast.iter_child_nodes(n):
            visit(c)

    visit(node)
    return out


class _Namespace(dict):
    """A lazily loaded module's globals: a missing name runs the statement(s) that bind it. (Function
    bodies look globals up through ``__missing__``; class bodies and module-level code do not, so
    ``_Source.run`` resolves what a statement reads before running it.)"""

    def __init__(self, source: "_Source") -> None:
        super().__init__()
        self._source = source

    def __missing__(self, key: str) -> Any:
        if self._source.resolve(key):
            return dict.__getitem__(self, key)
        raise KeyError(key)


class LazyModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        src = self.__dict__.get("_lazy_source")
        if src is not None and not name.startswith("__"):
            if src.resolve(name):
                return dict.__getitem__(src.ns, name)
            if src.resolve("__getattr__"):  # the module's own PEP 562 hook (e.g. a lazy singleton)
                return dict.__getitem__(src.ns, "__getattr__")(name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


class _Source:
    def __init__(self, module: LazyModule, path: str, finder: "SGLangSource") -> None:
        self.module, self.path, self.finder = module, path, finder
        with open(path, encoding="utf-8") as f:
            self.tree = ast.parse(f.read(), path)
        self.flags = 0
        for node in self.tree.body:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                if any(a.name == "annotations" for a in node.names):
                    self.flags |= _ANNOTATIONS
        self.ns = _Namespace(self)
        self.ns.update({"__name__": module.__name__, "__file__": path, "__builtins__": finder.builtins,
                        "__package__": module.__package__, "__spec__": module.__spec__, "__loader__": finder})
        if getattr(module, "__path__", None) is not None:
            self.ns["__path__"] = module.__path__
        self.shims = finder.shims.get(module.__name__, {})
        for name, value in self.shims.items():
            self.ns[name] = value
            module.__dict__[name] = value
        self.index: dict[str, list[int]] = {}
        self.star: list[int] = []
        self.star_from: list[str] = []  # sglang modules star-imported: names come from them one by one
        for i, node in enumerate(self.tree.body):
            if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
                target = importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__) \
                    if node.level else node.module
                if target and (target == "sglang" or target.startswith("sglang.")):
                    self.star_from.append(target)
                else:
                    self.star.append(i)
                continue
            for n in _binds(node):
                self.index.setdefault(n, []).append(i)
        self.done: set[int] = set()
        self.resolving: set[str] = set()

    def _compile(self, node: ast.stmt, flags: int | None = None) -> types.CodeType:
        flags = self.flags if flags is None else flags
        for n in _reads_now(node, bool(flags & _ANNOTATIONS)):
            if not dict.__contains__(self.ns, n):
                self.resolve(n)
        return compile(ast.Module(body=[node], type_ignores=[]), self.path, "exec", flags=flags, dont_inherit=True)

    def run(self, i: int) -> None:
        if i in self.done:
            return
        self.done.add(i)
        node = self.tree.body[i]
        exec(self._compile(node), self.ns)
        for n in _binds(node):
            if n in self.shims:  # a shim outlives the statement that binds its name (e.g. one import of many)
                self.ns[n] = self.shims[n]
            if dict.__contains__(self.ns, n):
                self.module.__dict__[n] = dict.__getitem__(self.ns, n)

    def resolve(self, name: str) -> bool:
        if dict.__contains__(self.ns, name):
            return True
        if name in self.resolving or (name not in self.index and not self.star and not self.star_from):
            return False
        self.resolving.add(name)
        try:
            for i in self.index.get(name, []):
                self.run(i)
            if not dict.__contains__(self.ns, name) and not name.startswith("_"):
                for target in self.star_from:
                    other = importlib.import_module(target).__dict__.get("_lazy_source")
                    if other is not None and other.exports(name) and other.resolve(name):
                        self.ns[name] = self.module.__dict__[name] = dict.__getitem__(other.ns, name)
                        break
            if not dict.__contains__(self.ns, name):
                for i in self.star:
                    self.run(i)
        finally:
            self.resolving.discard(name)
        return dict.__contains__(self.ns, name)

    def exports(self, name: str) -> bool:
        """Whether ``from this import *`` binds ``name`` (``__all__`` when the module defines one)."""
        if "__all__" in self.index:
            return self.resolve("__all__") and name in dict.__getitem__(self.ns, "__all__")
        return not name.startswith("_")

    def function(self, qualname: str) -> Callable:
        body, node = self.tree.body, None
        for part in qualname.split("."):
            node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                         and n.name == part), None)
            if node is None:
                raise AttributeError(f"{self.path}: no {qualname}")
            body = node.body
        scratch: dict = {}
        # Annotations stay unevaluated (as under ``from __future__ import annotations``): a method's
        # type hints (e.g. fastapi.Request) are not part of what it does.
        exec(self._compile(node, self.flags | _ANNOTATIONS), self.ns, scratch)
        return scratch[qualname.split(".")[-1]]

    def has(self, qualname: str) -> bool:
        try:
            body = self.tree.body
            for part in qualname.split("."):
                node = next(n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                            and n.name == part)
                body = node.body
            return True
        except StopIteration:
            return False


class SGLangSource(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``sglang`` and its submodules from ``root``, loaded lazily. ``stubs``: module names (SGLang's
    or third-party) that SGLang's code gets a ``StubModule`` for; third-party stubs are visible only
    to SGLang's modules (through their ``__import__``), so torch or transformers never see a fake
    triton. ``shims``: ``{module: {name: value}}`` bound in a module's globals before anything runs."""

    def __init__(self, root: Path, stubs: dict[str, str], shims: dict[str, dict[str, Any]]) -> None:
        self.root, self.stubs, self.shims = str(root), dict(stubs), shims
        self.stubbed: set[str] = set()
        self._third: dict[str, StubModule] = {}
        real_import = builtins.__import__

        def sglang_import(name, globals=None, locals=None, fromlist=(), level=0):
            if level == 0 and not name.startswith("sglang") and self._stub_of(name) is not None:
                return self._third_stub(name if fromlist else name.split(".")[0])
            return real_import(name, globals, locals, fromlist, level)

        self.builtins = dict(builtins.__dict__, __import__=sglang_import)

    def _stub_of(self, name: str) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in self.stubs:
                self.stubbed.add(".".join(parts[:i]))
                return ".".join(parts[:i])
        return None

    def _third_stub(self, name: str) -> StubModule:
        mod = self._third.get(name)
        if mod is None:
            mod = self._third[name] = StubModule(name)
            mod.__path__ = []  # type: ignore[attr-defined]
        return mod

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "sglang" and not fullname.startswith("sglang."):
            return None
        if self._stub_of(fullname) is not None:
            spec = importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            spec.loader_state = "stub"
            return spec
        base = os.path.join(self.root, *fullname.split("."))
        if os.path.isdir(base):
            init = os.path.join(base, "__init__.py")
            spec = importlib.machinery.ModuleSpec(fullname, self, origin=init if os.path.exists(init) else None,
                                                  is_package=True)
            spec.submodule_search_locations = [base]
            return spec
        if os.path.exists(base + ".py"):
            return importlib.machinery.ModuleSpec(fullname, self, origin=base + ".py")
        return None

    def create_module(self, spec):
        if spec.loader_state == "stub":
            mod = StubModule(spec.name)
            mod.__path__ = []  # type: ignore[attr-defined]
            return mod
        return LazyModule(spec.name)

    def exec_module(self, module):
        spec = module.__spec__
        if spec.loader_state == "stub" or spec.origin is None:
            return
        module.__file__ = spec.origin
        module.__dict__["_lazy_source"] = _Source(module, spec.origin, self)

    def source(self, module: str) -> _Source:
        return importlib.import_module(module).__dict__["_lazy_source"]


_INSTALLED: SGLangSource | None = None


def install(root: Path, stubs: dict[str, str] | None = None,
            shims: dict[str, dict[str, Any]] | None = None) -> SGLangSource:
    """Make this process import ``sglang`` from ``root`` (once per process)."""
    global _INSTALLED
    if _INSTALLED is not None:
        if _INSTALLED.root != str(root):
            raise RuntimeError(f"sglang_wheels: this process already imports SGLang from {_INSTALLED.root}")
        return _INSTALLED
    if "sglang" in sys.modules:
        raise RuntimeError("sglang_wheels: sglang is already imported in this process")
    _INSTALLED = SGLangSource(root, stubs or {}, shims or {})
    sys.meta_path.insert(0, _INSTALLED)
    return _INSTALLED


def method(module: str, qualname: str) -> Callable:
    """One function or method of an SGLang module, compiled from the wheel's source."""
    assert _INSTALLED is not None, "sglang_wheels.install() first"
    return _INSTALLED.source(module).function(qualname)


def has(module: str, qualname: str) -> bool:
    """Whether the wheel defines ``qualname`` in ``module`` (without running anything)."""
    assert _INSTALLED is not None, "sglang_wheels.install() first"
    path = Path(_INSTALLED.root, *module.split(".")).with_suffix(".py")
    if not path.exists():
        return False
    return _INSTALLED.source(module).has(qualname)
