"""How the trainer's command lines report a mistake the user fixes (a recipe key, a flag): one line, exit status 2."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    exit_code = 2
