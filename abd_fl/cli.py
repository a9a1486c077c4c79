"""``abd-fl``: the Hydra entry point (the one top-floor module of ``abd_fl``).

Composes the experiment config (``configs/``, overridable from the command line, e.g.
``abd-fl attack=blend simulation.num_clients=8``), validates it (teacher checkpoints and
the dataset's files included: a problem is one line on stderr and exit code 2), and runs the ServerApp and ClientApp in Flower's simulation engine with the
Ray backend (client resources and an optional existing Ray cluster address from
``simulation.*``), or, by ``runner``, the centralized runner or ``train_teachers``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from abd_fl.checkpoints import CheckpointError
from abd_fl.config import ConfigError, validate_config
from abd_fl.config_store import register_configs
from abd_fl.data import DatasetNotFoundError
from abd_fl.experiment import build_bundle, check_partitions, check_teacher_checkpoints, with_absolute_checkpoint_paths
from abd_fl.paths import compose_config, configs_dir


QUIET_LOGGERS = ("alembic",)
"""Libraries whose INFO lines are noise in a run's output: Flower's SQL state imports
alembic, whose plugin set-up logs at INFO on import (Hydra's root handler prints them)."""


def quiet_library_loggers() -> None:
    """Raise the :data:`QUIET_LOGGERS` to WARNING (call before flwr is imported)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def backend_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Ray backend settings for Flower's simulation engine."""
    sim = cfg["simulation"]
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if sim.get("ray_address"):
        init_args["address"] = str(sim["ray_address"])
    else:
        init_args["num_cpus"] = max(1, os.cpu_count() or 1)
    return {
        "client_resources": {
            "num_cpus": float(sim["client_resources"]["num_cpus"]),
            "num_gpus": float(sim["client_resources"]["num_gpus"]),
        },
        "init_args": init_args,
    }


def run(cfg: dict[str, Any]) -> None:
    """Run one experiment (already composed, resolved and validated by :func:`main`) in the
    Flower simulation engine."""
    from clients.client_app import app as client_app
    from strategies.server_app import build_server_app

    run_in_process_simulation(
        build_server_app(cfg), client_app, num_supernodes=int(cfg["simulation"]["num_clients"]), backend_config=backend_config(cfg)
    )


class _RunSimulationDeprecationFilter(logging.Filter):
    """Drops Flower's one deprecation warning of ``run_simulation`` (see below)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "The `run_simulation` function is deprecated" not in record.getMessage()


def run_in_process_simulation(server_app: Any, client_app: Any, num_supernodes: int, backend_config: dict[str, Any]) -> None:
    """Run ``server_app`` and ``client_app`` in this process with Flower's Ray backend.

    The one place that calls ``flwr.simulation.run_simulation``, deprecated in Flower 1.42 in
    favour of ``flwr run``. It stays because 1.42 has no supported in-process replacement:
    ``flwr run`` packs the app directory into a FAB and hands it to a SuperLink, which runs
    the ServerApp in a separate ``flwr-simulation`` process and passes it run-config values
    (TOML scalars) only, whereas ``abd-fl`` hands the ServerApp its composed Hydra config as an
    object; ``flwr.simulation`` otherwise exports ``run_simulation_process`` (the entry point
    of that ``flwr-simulation`` process, which needs a running SuperLink) and the legacy
    ``start_simulation`` (deprecated since 1.13). ``flwr run .`` remains the way to run this
    app through Flower's CLI (README). Flower's deprecation warning is dropped during this call
    only (an ``abd-fl`` user did not call ``run_simulation``; the deprecation is ours to act
    on); no other log line is filtered.
    """
    from flwr.simulation import run_simulation

    flwr_logger = logging.getLogger("flwr")
    quiet = _RunSimulationDeprecationFilter()
    flwr_logger.addFilter(quiet)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_name="ray",
            backend_config=backend_config,
        )
    finally:
        flwr_logger.removeFilter(quiet)


register_configs()  # the typed group schemas the YAML files extend, before Hydra composes


def _typed_override_problem(argv: list[str]) -> str | None:
    """The one-line problem of a command line's overrides that the typed group schemas refuse
    (a wrong type or an unknown key: :func:`abd_fl.paths.compose_config`), or None. Multirun
    command lines (sweep syntax) and anything else Hydra reports itself are left to Hydra."""
    if any(a in ("-m", "--multirun") for a in argv):
        return None
    overrides = [a for a in argv if "=" in a and not a.startswith("-") and "hydra." not in a.split("=", 1)[0]]
    try:
        compose_config(overrides)
    except ConfigError as err:
        return str(err)
    except Exception:  # noqa: BLE001 - Hydra composes again in _hydra_main and reports it in its own words
        return None
    return None


def main() -> None:
    """``abd-fl [overrides]``: a wrong type or unknown key in an override is one line on stderr
    and exit code 2 (as every other config error), before Hydra starts; then the Hydra run."""
    problem = _typed_override_problem(sys.argv[1:])
    if problem is not None:
        print(f"abd-fl: config error: {problem}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


@hydra.main(config_path=str(configs_dir()), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    logging.getLogger("flwr").propagate = False  # Flower prints its own log lines; no duplicates via Hydra's root handler
    quiet_library_loggers()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    runner = resolved.get("runner", "federated")
    try:
        validate_config(resolved)
        resolved = with_absolute_checkpoint_paths(resolved)
        check_teacher_checkpoints(resolved)
        bundle = build_bundle(resolved)  # the dataset's files, before Ray starts (cached: the run reuses it in this process)
        if runner == "federated" or (runner == "train_teachers" and resolved["teachers"]["which"] != "central"):
            check_partitions(resolved, bundle)  # every client's split, before Ray starts: a client cannot fail on it
    except ConfigError as err:
        print(f"abd-fl: config error: {err}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as err:
        print(f"abd-fl: checkpoint error: {err}", file=sys.stderr)
        sys.exit(2)
    except (DatasetNotFoundError, ValueError) as err:  # missing files, or files not in the expected format
        print(f"abd-fl: dataset error: {err}", file=sys.stderr)
        sys.exit(2)
    if runner == "centralized":
        from abd_fl.centralized import run_centralized

        run_centralized(resolved)
    elif runner == "train_teachers":
        from abd_fl.teachers import run_train_teachers

        run_train_teachers(resolved)
    else:
        run(resolved)


if __name__ == "__main__":
    main()
