"""The ``cnnmod`` command: a thin layer over the library.

Every command takes ``--json`` (one JSON object on stdout, nothing else there); human output, progress bars
and logs go to stderr. A mistake the user can fix prints one line and exits with status 2.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import typer

from ..errors import UserError
from ..runtime import leave_together, shutdown_distributed
from . import data, models, modules  # noqa: F401 -- the commands register themselves on the app
from .app import FLAGS, app

TRUST_CODE = "--trust-code"  # anywhere on the line: artifacts may import the code their architecture names
SKIP_BAD_IMAGES = "--skip-bad-images"  # anywhere on the line: streamed splits leave unreadable images out


def main(argv: list[str] | None = None) -> int:
    from ..data.stream import skipping_bad_images
    from ..models.reference import trusting

    command = typer.main.get_command(app)
    argv = list(sys.argv[1:] if argv is None else argv)
    trust, skip = TRUST_CODE in argv, SKIP_BAD_IMAGES in argv
    argv = [a for a in argv if a not in (TRUST_CODE, SKIP_BAD_IMAGES)]
    try:
        with trusting(trust), skipping_bad_images(skip):
            rc = command.main(args=argv, prog_name="cnnmod", standalone_mode=False)
        leave_together()  # under torchrun: no rank tears down its connections while another still works
    except UserError as e:
        sys.stderr.write(f"cnnmod: error: {e.for_command_line(FLAGS)}\n")
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
        shutdown_distributed()
    return rc if isinstance(rc, int) else 0


def run() -> None:
    sys.exit(main())
