"""Bad input ends in one line naming the problem, and exit code 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable

import click
import yaml
from pydantic import ValidationError

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """A problem with what the user gave us (config, paths, options)."""


# What bad input surfaces as, from us, pydantic, PyYAML, mergekit and the OS.
# mergekit reports unknown methods and missing models as RuntimeError.
BAD_INPUT = (UserError, ValidationError, yaml.YAMLError, ValueError, OSError, RuntimeError)


def one_line(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        parts = []
        for item in error.errors():
            where = ".".join(str(p) for p in item.get("loc", ()))
            msg = item.get("msg", "invalid value").removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
        text = "; ".join(parts)
    elif isinstance(error, yaml.YAMLError):
        text = f"malformed YAML: {error}"
    elif isinstance(error, FileNotFoundError) and error.filename:
        text = f"no such file: {error.filename}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def fail(message: str) -> None:
    click.echo(f"mergekit-evolver: error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def exits_cleanly(debug: Callable[[dict], bool] = lambda kwargs: False):
    """Turn bad-input exceptions of a click command into one line and exit 2.

    `debug(kwargs)` says whether to let the traceback through instead (e.g.
    when the user asked for verbose output)."""

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except BAD_INPUT as error:
                if debug(kwargs):
                    raise
                fail(one_line(error))

        return wrapper

    return decorate
