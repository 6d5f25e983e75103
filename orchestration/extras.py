"""Optional dependencies a command's flags need, checked before anything is loaded or written.

`pip install -e .` installs the core only; the Flower engine, the DP accountant and Ray are
extras (pyproject.toml). A missing one found mid-run would leave a run folder behind that
the rerun then refuses as "already holds a run", so every flag's needs are checked first.
"""
from __future__ import annotations

import importlib

from data_loaders.schema import DataError

# (what asks for it, is it asked for, module to import, extra that installs it)
NEEDS = (
    ("--engine flower", lambda a: getattr(a, "engine", "inprocess") == "flower", "flwr", "flower"),
    ("--sim_backend ray", lambda a: getattr(a, "engine", "inprocess") == "flower"
     and getattr(a, "sim_backend", "thread") == "ray", "ray", "flower"),
    ("--dp", lambda a: bool(getattr(a, "dp", False)), "opacus", "dp"),
)


def missing_extra(module: str) -> str | None:
    """Why `module` cannot be imported, or None. A real import: a broken install counts as missing."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        return str(err)
    return None


def check_extras(args) -> None:
    for flag, wanted, module, extra in NEEDS:
        if not wanted(args):
            continue
        why = missing_extra(module)
        if why is not None:
            raise DataError(f"{flag} needs the optional package {module!r}, which cannot be imported ({why})",
                            f"pip install 'plurallm[{extra}]' (from a clone: pip install -e '.[{extra}]'), "
                            f"or drop {flag}")
