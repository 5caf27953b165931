"""The package's import graph points one way (README, "Map of the code").

Parsed with ``ast`` so that imports inside functions count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import async_or1

PKG = Path(async_or1.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every ``async_or1...`` module a file imports, at any depth, absolute or relative."""
    mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m == "async_or1" or m.startswith("async_or1.")}


def _room_imports(room: str) -> dict[str, set[str]]:
    return {str(p.relative_to(PKG)): _imports(p) for p in sorted((PKG / room).rglob("*.py"))}


def _offending(room: str, allowed: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for f, mods in _room_imports(room).items():
        out = [m for m in mods if m != "async_or1" and not any(m == a or m.startswith(a + ".") for a in allowed)]
        if out:
            bad[f] = sorted(out)
    return bad


def test_the_parser_sees_lazy_and_relative_imports(tmp_path):
    # The checker itself must be able to fail: a function-local and a relative import are both seen.
    room = PKG / "generation"
    assert "async_or1.generation.text" in _imports(room / "worker.py")      # a lazy import in a function
    src = "def f():\n    from ..data import filter_cli\n"
    fake = room / "_probe_tmp.py"
    try:
        fake.write_text(src)
        assert "async_or1.data.filter_cli" in _imports(fake)
    finally:
        fake.unlink()


def test_generation_does_not_import_upward():
    # The generators sit below data/, the learner and the launchers: decoding and stop ids live
    # in generation/text.py, which data/ imports, never the other way round.
    forbidden = ("async_or1.data", "async_or1.learner", "async_or1.launch", "async_or1.launch_pool",
                 "async_or1.cli", "async_or1.buffer", "async_or1.eval", "async_or1.inprocess")
    bad = {f: [m for m in mods if any(m == x or m.startswith(x + ".") for x in forbidden)]
           for f, mods in _room_imports("generation").items()}
    bad = {f: m for f, m in bad.items() if m}
    assert not bad, bad


def test_algo_and_rewards_import_nothing_from_the_rest_of_the_package():
    # Pure maths and verifiers: testable alone, owned by nobody else.
    assert not _offending("algo", ("async_or1.algo",)), _offending("algo", ("async_or1.algo",))
    assert not _offending("rewards", ("async_or1.rewards",)), _offending("rewards", ("async_or1.rewards",))


def test_only_the_cli_imports_the_benchmarks():
    # The benchmarks drive the launcher: a runtime module importing them would be an arrow upward.
    users = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
             if not str(p.relative_to(PKG)).startswith("bench/")
             and any(m == "async_or1.bench" or m.startswith("async_or1.bench.") for m in _imports(p))}
    assert users == {"cli.py"}, users
