"""Where DAGs and tasks get their configuration.

Parse time sees only the config *file* (``$ATLASFLOW_CONFIG``, else the project's
``include/config/atlasflow.yaml``): no Variables, Connections or network while parsing.
Run time adds the ``atlasflow_overrides`` Variable and then the run's ``config_overrides``
Param, in that order of precedence.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlasflow.core.config import ENV_CONFIG_PATH, AtlasConfig, load_config, run_override_problems

if TYPE_CHECKING:
    from atlasflow.intake.plan import BatchPlan

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = PROJECT_ROOT / "include" / "config" / "atlasflow.yaml"
OVERRIDES_VARIABLE = "atlasflow_overrides"


def check_runtime_overrides(overrides: dict[str, Any], source: str) -> None:
    """Refuse run-time overrides outside the allow-list (:func:`atlasflow.core.config.run_overridable_keys`):
    keys that shape the DAG, and keys that name a program, path, URL or connection."""
    from atlasflow.core.config import ConfigError

    if not isinstance(overrides, dict):
        raise ConfigError([f"expected a JSON object of config keys, got {type(overrides).__name__}"], source)
    if problems := run_override_problems(overrides, source):
        raise ConfigError(problems, source)


def config_path() -> str | None:
    path = os.environ.get(ENV_CONFIG_PATH)
    if path:
        return path
    return str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None


def parse_time_config() -> AtlasConfig:
    return load_config(config_path())


def parse_time_plan() -> tuple[AtlasConfig | None, BatchPlan | None, str | None]:
    """(config, plan, problem): the batches a DAG file should lay out, or why there are none.

    Never raises: a broken manifest must not become a DAG import error that hides the DAG;
    the run's first task reports every problem instead.
    """
    from atlasflow.core.config import ConfigError
    from atlasflow.intake.manifest import ManifestError
    from atlasflow.intake.plan import current_plan

    try:
        config = parse_time_config()
    except ConfigError as exc:
        return None, None, f"config invalid: {exc}"
    try:
        return config, current_plan(config), None
    except ManifestError as exc:
        return config, None, f"manifest invalid ({len(exc.problems)} problems); run the DAG to see them all"
    except (ValueError, OSError) as exc:
        return config, None, str(exc)


def task_config(context: Any | None = None) -> AtlasConfig:
    """The config a running task uses: file, then the overrides Variable, then the run's Params."""
    from airflow.sdk import Variable, get_current_context

    overrides: dict[str, Any] = {}
    raw = Variable.get(OVERRIDES_VARIABLE, default="{}")
    try:
        from_variable = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as exc:
        raise ValueError(f"Variable {OVERRIDES_VARIABLE!r} is not JSON: {exc}") from exc
    if from_variable:
        check_runtime_overrides(from_variable, f"Variable {OVERRIDES_VARIABLE}")
        overrides.update(from_variable)
    context = context or get_current_context()
    from_params = (context.get("params") or {}).get("config_overrides") or {}
    check_runtime_overrides(from_params, "Param config_overrides")
    overrides.update(from_params)
    if overrides:
        log.info("config overrides in effect: %s", sorted(overrides))
    return load_config(config_path(), overrides=overrides)
