"""Safety: nothing that procgenie loads can run code (no pickle on any load path), and `play` listens on
this machine only unless told otherwise. (Play's message checks, size bounds and connection limit:
tests/test_play.py and tests/test_properties.py.)"""

from __future__ import annotations

import ast
import inspect
import re
import socket
from pathlib import Path

import pytest

import procgenie
from procgenie.cli import build_parser
from procgenie.play import server

PACKAGE = Path(procgenie.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            yield (f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""), node


def _keyword(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "not a constant"
    return None


def test_no_load_path_can_unpickle():
    problems = []
    for path in SOURCES:
        text = path.read_text()
        tree = ast.parse(text)
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in UNSAFE_MODULES for n in names):
                    problems.append(f"{where}:{node.lineno} imports {names}")
        for name, call in _calls(tree):
            src = ast.get_source_segment(text, call.func) or ""
            if name == "load" and "torch" in src and _keyword(call, "weights_only") is not True:
                problems.append(f"{where}:{call.lineno} torch.load without weights_only=True")
            if _keyword(call, "allow_pickle") not in (None, False):
                problems.append(f"{where}:{call.lineno} allow_pickle is not False")
            if name in ("eval", "exec") and isinstance(call.func, ast.Name):
                problems.append(f"{where}:{call.lineno} {name}() of text")
        # and the plain text, for what the syntax tree does not show (strings handed to other tools)
        for m in re.finditer(
            r"allow_pickle\s*=\s*True|torch\.load\((?![^)]*weights_only\s*=\s*True)|pickle\.loads?\(", text
        ):
            problems.append(f"{where}: {m.group(0)!r}")
    assert not problems, "\n".join(problems)


def test_bundled_files_are_safetensors_and_json_only():
    """The pretrained world model (if bundled) holds no format that runs code on load (.pt, .pkl, .ckpt ...)."""
    data = [
        p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc") and "static" not in p.parts
    ]
    assert all(p.suffix in (".safetensors", ".json", ".jsonl", ".md", ".txt") for p in data), data


def test_play_listens_on_this_machine_only_by_default():
    assert build_parser().parse_args(["play"]).host == "127.0.0.1"
    assert inspect.signature(server.serve).parameters["host"].default == "127.0.0.1"
    sock = server.listen(build_parser().parse_args(["play"]).host, 0)  # the socket `procgenie play` opens
    port = sock.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # this machine reaches it ...
        outward = _outward_address()
        if outward is not None:  # ... another address of it does not
            with pytest.raises(OSError):
                socket.create_connection((outward, port), timeout=5).close()
    finally:
        sock.close()


def _outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address
