"""Load a config as every entry point does: schema, then the extensions it names, then registered names.

    cfg = load_config("configs/debug.yaml", ["loss.name=huber"], imports=["examples/aeparts.py"])
    cfg = load_run_config("runs/NAME")       # a run's config.yaml, importing what the run imported

:mod:`aedist.config` is the schema alone (types, ranges, one-line errors) and imports no registry:
the registries import it for its types. The names a config points into registries (model, loss,
objective, corruptions, metrics) can only be checked once the registries hold everything they will
hold, i.e. after the user's extensions (``imports:`` and ``--import``, :mod:`aedist.extensions`) are
imported; that is done here, above both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from aedist import config
from aedist.config import Config, read_yaml
from aedist.errors import UserError
from aedist.extensions import import_extensions


def check_names(cfg: Config) -> None:
    """Every name ``cfg`` points into a registry exists there (a one-line UserError listing what does),
    and registered models' and objectives' ``params`` fit their schemas. Call after the imports."""
    from aedist.data.corruption import validate_spec
    from aedist.evaluation.quality import check_metric_names  # METRICS and QUALITY, filled by their imports
    from aedist.losses import LOSSES
    from aedist.models import MODELS
    from aedist.objectives import OBJECTIVES

    MODELS.get(cfg.model.name, key="model.name").check_params(cfg.model)
    LOSSES.get(cfg.loss.name, key="loss.name")
    OBJECTIVES.get(cfg.objective.name, key="objective.name").check_params(cfg.objective.params)
    for key, spec in [("corruption", cfg.corruption), *((f"eval.corruptions.{k}", v) for k, v in cfg.eval.corruptions.items())]:
        try:
            validate_spec(spec)
        except ValueError as err:
            raise UserError(f"config key '{key}': {err}") from None
    check_metric_names(cfg.eval.metrics)


def _union(*lists: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(i for lst in lists for i in lst))  # in order, each once


def recorded_imports(run_dir: str | Path, what: str = "run config") -> list[str]:
    """The ``imports`` a run's config.yaml records (empty without one); ``what`` names the file in errors."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return []
    found = read_yaml(path, what).get("imports") or []
    if not isinstance(found, list) or not all(isinstance(s, str) for s in found):
        raise UserError(f"{path}: imports must be a list of module names or .py files, got {found!r}; fix that line")
    return found


def load_config(path: str | Path | None = None, overrides: Sequence[str] | None = None, imports: Sequence[str] = ()) -> Config:
    """Defaults, the YAML at ``path``, ``key=value`` overrides; then the config's ``imports``, ``imports``
    (``--import``) and, when the run folder exists and may resume, the imports its config.yaml recorded;
    then the registered names. ``cfg.imports`` becomes all of them, resolved (what config.yaml records)."""
    cfg = config.load_config(path, list(overrides or []))  # types and ranges need no registry
    own = import_extensions(cfg.imports, "config key 'imports'")
    extra = import_extensions(imports, "--import")
    # A resume (a requeued SLURM job, a second `train.py` without --import) repeats what the run imported.
    earlier = recorded_imports(cfg.run_dir, "the run's last config") if cfg.train.resume != "never" else []
    again = import_extensions(earlier, f"imports recorded in {cfg.run_dir / 'config.yaml'}")
    cfg.imports = _union(own, extra, again)
    check_names(cfg)
    return cfg


def load_run_config(run_dir: str | Path, imports: Sequence[str] = ()) -> Config:
    """A run's config.yaml (or an export's) with the imports it recorded and ``imports`` (``--import``) done."""
    path = Path(run_dir) / "config.yaml"
    cfg = config.config_from_dict(read_yaml(path, "run config"))
    cfg.imports = _union(import_extensions(cfg.imports, f"imports recorded in {path}"), import_extensions(imports, "--import"))
    check_names(cfg)
    return cfg


def import_run_extensions(run_dirs: Iterable[str | Path], imports: Sequence[str] = ()) -> list[str]:
    """Import the union of the imports recorded by ``run_dirs`` (folders without config.yaml are skipped)
    and ``imports``; returns what was imported, resolved (for the report, which reads several runs)."""
    done: list[str] = []
    for run in run_dirs:
        done = _union(done, import_extensions(recorded_imports(run), f"imports recorded in {Path(run) / 'config.yaml'}"))
    return _union(done, import_extensions(imports, "--import"))
