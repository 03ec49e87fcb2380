"""The one error type users see: a single line saying what is wrong, where, and how to fix it."""


class UserError(Exception):
    """Bad input from the user. The CLI prints it as one line and exits with code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (how docker, systemd, Slurm and `timeout` stop a process), raised where the program is, as
    Ctrl-C raises KeyboardInterrupt: every command handles the two alike (a run records "interrupted"
    and can be resumed, a sweep gives its trial back, a server shuts down)."""

    signal_name = "SIGTERM"
    exit_code = 143  # 128 + 15, as the shell reports a process ended by SIGTERM


_MEMORY_WORDS = ("can't allocate memory", "out of memory", "Cannot allocate memory")


def out_of_memory(error: BaseException) -> str | None:
    """What ran out when `error` is an out-of-memory error (Python's MemoryError, torch's OutOfMemoryError
    on a GPU, or the CPU allocator's RuntimeError), in a few words; else None."""
    if isinstance(error, MemoryError):
        return "memory"
    if type(error).__name__ == "OutOfMemoryError":
        return "GPU memory"
    text = str(error)
    if isinstance(error, RuntimeError) and any(words in text for words in _MEMORY_WORDS):
        asked = text.split("you tried to allocate ", 1)[-1].split(" bytes", 1)[0] if "tried to allocate" in text else ""
        return f"memory (an allocation of {int(asked) / 2**30:,.1f} GiB failed)" if asked.isdigit() else "memory"
    return None
