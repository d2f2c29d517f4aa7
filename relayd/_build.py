"""Which build of each hot module is active: compiled (Cython) or pure.

``RELAYD_NO_EXTENSIONS=1`` selects the pure-Python twins. Otherwise the
compiled builds are required: a missing or broken extension is an import
error that says how to fix it, never a silent fall back to the slow twin.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

#: The hot modules: public name -> package path of the pure twin (``_py``)
#: and the compiled build (``_c``).
HOT_MODULES = {
    "yamux": "relayd.core._yamux",
    "wsframe": "relayd.core._wsframe",
    "h1proxy": "relayd.core._h1proxy",
    "flowfilter": "relayd.core._flowfilter",
}


def extensions_disabled() -> bool:
    return os.environ.get("RELAYD_NO_EXTENSIONS", "").strip().lower() not in ("", "0", "false", "no")


def load(name: str) -> ModuleType:
    """The active build of hot module ``name``."""
    base = HOT_MODULES[name]
    if extensions_disabled():
        return importlib.import_module(base + "_py")
    try:
        return importlib.import_module(base + "_c")
    except ImportError as exc:
        raise ImportError(
            f"relayd: the compiled build of {base} is missing or broken ({exc}). "
            "Build it with `pip install .` (needs a C compiler and Cython 3), "
            "or set RELAYD_NO_EXTENSIONS=1 to run the pure-Python twin."
        ) from exc


def is_compiled(module: ModuleType) -> bool:
    """True when ``module`` is a compiled extension, not Python source."""
    return not (getattr(module, "__file__", "") or "").endswith((".py", ".pyc"))


def report() -> dict[str, str]:
    """Hot module name -> "compiled" or "pure" for the builds now active."""
    out = {}
    for name, base in HOT_MODULES.items():
        try:
            out[base] = "compiled" if is_compiled(load(name)) else "pure"
        except ImportError:
            out[base] = "MISSING"
    return out
