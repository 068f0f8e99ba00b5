"""Click plumbing shared by `vidcap`, `run_pipeline.py` and `vidcap ablate`: config options, errors.

Only click, the config schema and the file helpers are imported here, so every command starts fast.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from pipeline.config import Config, load_config
from pipeline.errors import DiskFullError, UserError
from pipeline.runtime.files import free_bytes

CONFIG_HELP = "YAML config (see configs/); defaults apply to keys it leaves out."
SET_HELP = "Override one key, e.g. --set train.lr=1e-4 (repeatable)."


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print an error the user can act on as one `vidcap: error: ...` line and exit 1.

    Those are `UserError`s, and the environment's `OSError`s (a missing or unreadable file, a
    full disk: which path, how much room is left). Bugs keep their traceback.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise CommandError(str(e)) from None
        except OSError as e:
            raise CommandError(describe_os_error(e)) from None

    return wrapper


class CommandError(click.ClickException):
    """A `ClickException` printed as `vidcap: error: <message>` (exit code 1)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"vidcap: error: {self.format_message()}", err=True, file=file)


def describe_os_error(error: OSError) -> str:
    """One line for an OSError: what failed, on which path; for a full disk, the free space too."""
    path = error.filename if error.filename is not None else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return str(DiskFullError(path or "(a file)", free_bytes(path) if path else None))
    reason = error.strerror or str(error)
    return f"{path}: {reason}" if path else reason


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--config FILE` and repeated `--set section.key=value`."""
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(fn)
    fn = click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)(fn)
    return fn


def cli_config(config_path: str | None, overrides: tuple[str, ...]) -> Config:
    return load_config(config_path, list(overrides))


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))
