"""Click plumbing shared by `vidcap`, `run_pipeline.py` and `vidcap ablate`: config options, errors.

Only click and the config schema are imported here, so every command starts fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from pipeline.config import Config, load_config
from pipeline.errors import UserError

CONFIG_HELP = "YAML config (see configs/); defaults apply to keys it leaves out."
SET_HELP = "Override one key, e.g. --set train.lr=1e-4 (repeatable)."


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a `UserError` (or a missing file) as one `Error: ...` line and exit 1; bugs keep their traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--config FILE` and repeated `--set section.key=value`."""
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(fn)
    fn = click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)(fn)
    return fn


def cli_config(config_path: str | None, overrides: tuple[str, ...]) -> Config:
    return load_config(config_path, list(overrides))


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))
