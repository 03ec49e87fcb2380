"""`peftlab COMMAND ...`: one module per command in this folder, each with add_parser() and run();
a new command is a new module here (found automatically).

Bad input (UserError) and operating-system errors (a file that cannot be written: too large, no
space, read-only) print one line and exit 2; --debug shows the traceback instead. SIGTERM is handled
as Ctrl-C is (errors.Terminated): "interrupted", exit 143 (Ctrl-C: 130)."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import warnings

from peftlab.errors import Terminated, UserError, out_of_memory
from peftlab.files import WRITE_ERRORS, os_error_of, write_error



def command_names() -> list[str]:
    import pkgutil

    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


class _BadArguments(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line, like every other bad input (argparse would add the usage)."""

    def error(self, message: str):
        raise _BadArguments(f"{self.prog}: error: {message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="peftlab", description="Fine-tune transformer text classifiers with "
                                     "parameter-efficient methods, and measure what each method buys.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name in command_names():
        module = importlib.import_module(f"peftlab.cli.{name}")
        module.add_parser(sub).set_defaults(command_module=module)
        modules[name] = module
    try:
        args = parser.parse_args(argv)
    except _BadArguments as e:
        print(e, file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    terminate_as_interrupt()
    # library deprecation chatter (e.g. transformers 5 renames) is not the user's business
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.command_module.run(args) or 0
    except UserError as e:
        if args.debug:
            raise
        print(f"peftlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"peftlab {args.command}: {interrupted(e)}", file=sys.stderr)
        return exit_code(e)
    except Exception as e:  # noqa: BLE001 - only operating-system errors are answered here
        memory = None if args.debug else out_of_memory(e)
        if memory is not None:
            hint = getattr(args.command_module, "MEMORY_HINT", "give it less to hold at once")
            print(f"peftlab {args.command}: error: out of {memory}: {hint}", file=sys.stderr)
            return 2
        # a write (or read) the command did not translate itself: still one line naming the file, exit 2
        found = os_error_of(e)
        if args.debug or found is None or found.errno not in WRITE_ERRORS:
            raise
        where = getattr(e, "filename", None) or getattr(found, "filename", None) or "a file"
        print(f"peftlab {args.command}: error: {write_error(found, where)}", file=sys.stderr)
        return 2


def _raise_terminated(signum, frame):
    raise Terminated()


def terminate_as_interrupt() -> None:
    """SIGTERM raises Terminated (a KeyboardInterrupt) wherever the main thread is, so that every command
    stops as it does on Ctrl-C (its record, its claim, its temporaries), not in silence."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def interrupted(error: KeyboardInterrupt) -> str:
    return f"interrupted ({error.signal_name})" if isinstance(error, Terminated) else "interrupted"


def exit_code(error: KeyboardInterrupt) -> int:
    return error.exit_code if isinstance(error, Terminated) else 130


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The config options every config-driven command shares."""
    p.add_argument("config", nargs="?", help="YAML config file (every field optional; defaults in peftlab/config/schema.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config field, e.g. --set method.r=8 --set method.target_modules=[query,value]")
