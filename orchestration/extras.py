"""Optional dependencies a command's flags need, checked before anything is loaded or written.

`pip install -e .` installs the core only; the Flower engine, the DP accountant and Ray are
extras (pyproject.toml). A missing one found mid-run would leave a run folder behind that
the rerun then refuses as "already holds a run", so every flag's needs are checked first.
"""
from __future__ import annotations

import importlib

from utils.errors import DataError


def missing_extra(module: str) -> str | None:
    """Why `module` cannot be imported, or None. A real import: a broken install counts as missing."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        return str(err)
    return None


def check_extras(engine: str, sim_backend: str, dp: bool) -> None:
    # (what asks for it, is it asked for, module to import, extra that installs it)
    needs = (("--engine flower", engine == "flower", "flwr", "flower"),
             ("--sim_backend ray", engine == "flower" and sim_backend == "ray", "ray", "flower"),
             ("--dp", dp, "opacus", "dp"))
    for flag, wanted, module, extra in needs:
        why = missing_extra(module) if wanted else None
        if why is not None:
            raise DataError(f"{flag} needs the optional package {module!r}, which cannot be imported ({why})",
                            f"pip install 'plurallm[{extra}]' (from a clone: pip install -e '.[{extra}]'), "
                            f"or drop {flag}")
