"""The layers of docs/architecture.md, checked: each package imports only
what lies below it, and the core touches no I/O."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "relayd"

# package -> relayd packages/modules it may not import
FORBIDDEN = {
    "core": {"relayd.net", "relayd.gateway", "relayd.control", "relayd.agent", "relayd.cli", "relayd.config",
             "relayd.metrics", "relayd.log", "asyncio", "socket", "logging", "uvloop", "prometheus_client", "time"},
    "net": {"relayd.gateway", "relayd.control", "relayd.agent", "relayd.cli"},
    "control": {"relayd.gateway", "relayd.net", "relayd.agent", "relayd.cli"},
    "gateway": {"relayd.agent", "relayd.cli"},
    "agent": {"relayd.gateway", "relayd.cli"},
    "client": {"relayd.gateway", "relayd.cli", "relayd.agent"},
}


def imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for a in node.names:
                yield f"{node.module}.{a.name}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_lies_below(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in set(imports(path)):
            for f in FORBIDDEN[package]:
                if name == f or name.startswith(f + "."):
                    bad.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    assert not bad, "\n".join(bad)
