"""Import a user's extension modules (their ``register_model`` / ``LOSSES.register`` … run at import).

    import_extensions(["my_project.aeparts", "./aeparts.py"], "imports")   # -> ["my_project.aeparts", "/abs/aeparts.py"]

An entry is a dotted module name (imported with importlib; the installed packages and PYTHONPATH are
searched first, then the current folder) or a path to a ``.py`` file. A relative path is read from
the current folder, like every other path in a config (``data.shards``, ``run.dir``); it is returned
absolute, which is what a run's config.yaml records, so a resume from another folder (a SLURM job)
finds the same file. A file is loaded once per process under a module name made from its real path,
so the same file named twice (config ``imports:`` and ``--import``, or a resume) registers once; a
file's own folder is searched last for what it imports itself.

A module that is missing, a file that is missing, a syntax error or an exception raised while
importing is a one-line :class:`~aedist.errors.UserError` naming the entry, where it failed and the fix.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from aedist.errors import UserError

_PREFIX = "aedist_ext_"  # module names of files loaded by path: aedist_ext_<stem>_<hash of the real path>


def is_path(spec: str) -> bool:
    """Whether ``spec`` names a file (``./x.py``, ``dir/x.py``, ``/abs/x.py``) rather than a dotted module."""
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def resolve(spec: str, label: str = "imports") -> str:
    """The form recorded in a run's config.yaml: an absolute real path for a file, the name for a module."""
    spec = spec.strip() if isinstance(spec, str) else spec
    if not isinstance(spec, str) or not spec:
        raise UserError(f"{label}: bad entry {spec!r}; give a module name such as my_project.aeparts or a file such as ./aeparts.py")
    if is_path(spec):
        return str(Path(spec).expanduser().resolve())
    if not all(part.isidentifier() for part in spec.split(".")):
        raise UserError(f"{label}: {spec!r} is neither a module name (my_project.aeparts) nor a .py file (./aeparts.py); "
                        "write one of those")
    return spec


def import_extensions(specs: Iterable[str], label: str = "imports") -> list[str]:
    """Import every entry of ``specs`` (in order, each once); returns their resolved forms without repeats.
    ``label`` says where the entries come from in an error (``imports``, ``--import``, a run's config.yaml)."""
    done: list[str] = []
    for spec in specs:
        resolved = resolve(spec, label)
        if resolved in done:
            continue
        if is_path(resolved):
            _import_file(spec, Path(resolved), label)
        else:
            _import_module(resolved, label)
        done.append(resolved)
    return done


def module_name(path: Path) -> str:
    """The one module name a file is loaded under: stable for the same real path in every process."""
    stem = re.sub(r"\W", "_", path.stem)
    return f"{_PREFIX}{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"


def _loaded_from(path: Path) -> ModuleType | None:
    """A module already imported from ``path`` by any name (``examples.aeparts`` and the file itself)."""
    for module in list(sys.modules.values()):
        try:
            file = getattr(module, "__file__", None)
        except Exception:  # noqa: BLE001 - a lazy module object may fail on any attribute
            continue
        if isinstance(file, str) and os.path.realpath(file) == str(path):
            return module
    return None


def _import_file(spec: str, path: Path, label: str) -> None:
    name = module_name(path)
    if name in sys.modules or _loaded_from(path) is not None:
        return  # registering twice would fail: the registries refuse a name they hold
    if not path.is_file():
        where = "" if Path(spec).is_absolute() else f" (relative paths are read from the current folder {os.getcwd()})"
        what = "is a folder, not a .py file" if path.is_dir() else "not found"
        raise UserError(f"{label}: file {spec!r} {what}{where}; fix the path, or run from the folder it is relative to")
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"{label}: {spec!r} cannot be imported as Python; give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))  # last: the file's own helpers next to it, never shadowing a package
    sys.modules[name] = module  # before running it, as importlib does: dataclasses and pickling look it up
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - any failure of the user's code becomes one line naming it
        del sys.modules[name]
        raise _failed(spec, label, err, str(path)) from None


def _import_module(name: str, label: str) -> None:
    if name in sys.modules:
        return
    # `python launch/train.py` puts launch/ first on sys.path, not the current folder; a package in the
    # folder the user runs from is what `my_project.aeparts` most often means. Last: never shadows.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        origin = importlib.util.find_spec(name)
    except ModuleNotFoundError as err:  # a parent package is missing
        raise _not_found(name, label, err) from None
    except Exception as err:  # noqa: BLE001 - a parent package that fails at import
        raise _failed(name, label, err, None) from None
    if origin is None:
        raise _not_found(name, label, None)
    if origin.origin and (same := _loaded_from(Path(os.path.realpath(origin.origin)))) is not None:
        sys.modules[name] = same  # this file was loaded by path already: alias it, do not register twice
        return
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any failure of the user's code becomes one line naming it
        raise _failed(name, label, err, origin.origin) from None


def _not_found(name: str, label: str, err: ModuleNotFoundError | None) -> UserError:
    missing = err.name if err is not None and err.name else name
    return UserError(f"{label}: no module named {missing!r} (for {name!r}; searched the installed packages, PYTHONPATH and the "
                     f"current folder {os.getcwd()}); install it, run from the folder that holds it, or give its file, e.g. "
                     f"./{name.replace('.', '/')}.py")


def _failed(spec: str, label: str, err: Exception, file: str | None) -> UserError:
    """One line for an extension that raised at import: the error, where (the extension's own line when
    the traceback passes through it, else the innermost frame) and the fix."""
    if isinstance(err, SyntaxError):
        where = f"{err.filename}:{err.lineno}" if err.filename else "its source"
        return UserError(f"{label}: {spec!r} has a syntax error at {where}: {err.msg}; fix the file")
    frames = traceback.extract_tb(err.__traceback__)
    frames = [f for f in frames if "importlib" not in f.filename] or frames  # importlib's own frames say nothing
    own = [f for f in frames if file and os.path.realpath(f.filename) == os.path.realpath(file)]
    frame = (own or frames or [None])[-1]
    where = f" at {frame.filename}:{frame.lineno}" if frame is not None else ""
    text = str(err).strip() or "(no message)"
    if isinstance(err, UserError):
        return UserError(f"{label}: importing {spec!r} failed{where}: {text}")
    hint = f"pip install {err.name}, or fix the import" if isinstance(err, ModuleNotFoundError) and err.name else \
        "fix it, or remove it from imports / --import"
    return UserError(f"{label}: importing {spec!r} failed{where} with {type(err).__name__}: {text} ({hint})")
