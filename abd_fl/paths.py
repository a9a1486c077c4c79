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
    """Compose the experiment config with Hydra's compose API (no Hydra run directory)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(configs_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    return resolved
