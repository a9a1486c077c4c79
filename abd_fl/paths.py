"""Where the Hydra configs live (the repository's ``configs/`` beside ``abd_fl/``)."""

from __future__ import annotations

from pathlib import Path


def configs_dir() -> Path:
    """The ``configs/`` directory (source checkout, editable install or Flower app bundle)."""
    path = Path(__file__).resolve().parents[1] / "configs"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"Hydra configs not found at '{path}' (expected configs/config.yaml beside abd_fl/)")
    return path


def compose_config(overrides: list[str] | None = None) -> dict:
    """Compose the experiment config with Hydra's compose API (no Hydra run directory).

    A bad override (a wrong type or an unknown key of a typed group) raises
    :class:`~abd_fl.config.ConfigError` with one line naming the override and the problem."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from abd_fl.config_store import register_configs

    register_configs()
    from hydra.errors import ConfigCompositionException

    from abd_fl.config import ConfigError

    with initialize_config_dir(config_dir=str(configs_dir()), version_base=None):
        try:
            cfg = compose(config_name="config", overrides=list(overrides or []))
        except ConfigCompositionException as err:  # e.g. a wrong type for a typed group's field: one line
            head = str(err).strip().splitlines()[0].rstrip(".")
            cause = str(err.__cause__ or "").strip().splitlines()
            raise ConfigError(f"{head}: {cause[0]}" if cause else head) from None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    return resolved
