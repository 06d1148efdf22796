"""The ``cnnmod`` command: a thin layer over the library.

Every command prints its result on stdout (tables and a summary line, or with ``--json`` one JSON object, nothing
else there); progress bars and notes go to stderr. A mistake the user can fix prints one line and exits with status
2, naming only options of the command it ran (or saying which command has the option).
"""

from __future__ import annotations

import errno
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import typer

from .. import __version__
from ..errors import UserError
from . import data, models, modules  # noqa: F401 -- the commands register themselves on the app
from .app import FLAGS, STARTED, app

TRUST_CODE = "--trust-code"  # anywhere on the line: artifacts may import the code their architecture names
SKIP_BAD_IMAGES = "--skip-bad-images"  # anywhere on the line: streamed splits leave unreadable images out


def options_of(command) -> set[str]:
    """Every flag a click command takes (``--size``, ``--no-cost``), and the switches every command takes."""
    return {o for p in getattr(command, "params", []) for o in [*p.opts, *p.secondary_opts]} | {TRUST_CODE,
                                                                                              SKIP_BAD_IMAGES}


def commands(group=None, prefix: str = "") -> dict[str, object]:
    """Every command of the application by its full name (``decompose``, ``data info``)."""
    group = group or typer.main.get_command(app)
    out = {}
    for name, cmd in getattr(group, "commands", {}).items():
        out.update(commands(cmd, f"{prefix}{name} ") if hasattr(cmd, "commands") else {f"{prefix}{name}": cmd})
    return out


def command_named(argv: list[str]) -> str | None:
    """The command a command line runs (``decompose``; ``data info``), or None where it names none."""
    every = commands()
    words = [a for a in argv if not a.startswith("-")][:2]
    for n in (2, 1):
        if " ".join(words[:n]) in every:
            return " ".join(words[:n])
    return None


def command_line_flags(name: str | None = None):
    """The command line's word for each setting an error may name (:meth:`UserError.for_command_line`), as command
    ``name`` reads it: its own flag; ``--set NAME=VALUE`` for a recipe's field where the command takes ``--set``;
    else the flag and the command that has it, so that a hint never names an option its command lacks."""
    from ..jobs.decompose import JOB_FIELDS
    from ..modules.kinds import kinds
    from ..recipes import settable

    every = commands()
    options = options_of(every[name]) if name in every else None
    own = {"size", "max_loss", "variant"}
    settable_names = ({n for k in kinds().values() for n in settable(k.settings)} | JOB_FIELDS) - own

    def word(setting: str) -> str:
        flag = FLAGS.get(setting, "--" + setting.replace("_", "-"))
        if setting in settable_names and (options is None or "--set" in options):
            return f"{setting} (--set {setting}=...)"
        if options is None or flag in options:
            return flag
        owners = [n for n, cmd in every.items() if flag in options_of(cmd)]
        return f"{flag} of cnnmod {owners[0]}" if owners else setting

    return word


def main(argv: list[str] | None = None) -> int:
    STARTED["at"] = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["--version"], ["-V"], ["version"]):  # without importing torch
        sys.stdout.write(f"cnnmod {__version__}\n")
        return 0
    command = typer.main.get_command(app)
    trust, skip = TRUST_CODE in argv, SKIP_BAD_IMAGES in argv
    argv = [a for a in argv if a not in (TRUST_CODE, SKIP_BAD_IMAGES)]
    try:
        with _switches(trust, skip):
            rc = command.main(args=argv, prog_name="cnnmod", standalone_mode=False)
        if "torch" in sys.modules:
            from ..runtime import leave_together

            leave_together()  # under torchrun: no rank tears down its connections while another still works
    except UserError as e:
        sys.stderr.write(f"cnnmod: error: {e.for_command_line(command_line_flags(command_named(argv)))}\n")
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = Path(e.filename or ".")
        while not where.exists() and where != where.parent:  # the half-written folder is gone: name its disk
            where = where.parent
        sys.stderr.write(f"cnnmod: error: the disk is full ({e.strerror}, writing under {where}): free some space "
                         "and run again; nothing half-written was left behind\n")
        return 2
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("cnnmod: interrupted\n")
        return 130
    except typer.TyperException as e:  # usage errors: typer prints them with the command's help hint
        show = getattr(e, "show", None)
        if show is not None:
            show()
        else:
            sys.stderr.write(f"cnnmod: error: {e}\n")
        return int(getattr(e, "exit_code", 2))
    finally:
        if "torch" in sys.modules:
            from ..runtime import shutdown_distributed

            shutdown_distributed()
    return rc if isinstance(rc, int) else 0


@contextmanager
def _switches(trust: bool, skip: bool):
    """``--trust-code`` and ``--skip-bad-images`` in force for the command (imported only when given, so that
    ``--help`` does not import torch)."""
    with ExitStack() as stack:
        if trust:
            from ..models.reference import trusting

            stack.enter_context(trusting(True))
        if skip:
            from ..data.stream import skipping_bad_images

            stack.enter_context(skipping_bad_images(True))
        yield


def run() -> None:
    """The ``cnnmod`` console script: as ``python -m cnnmod``, the working folder is on the import path, so that
    ``--arch mynets:MyNet`` finds mynets.py where the user stands."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    sys.exit(main())
