"""What the command-line tools share, written once and torch-free (summarize.py must not load torch):
  Parser           argparse with a one-line error (flags.py, summarize.py)
  format_duration  seconds as m:ss or h:mm:ss (run.py's progress, bench.py, summarize.py)
  write_atomic     replace a file all at once (checkpoints, adapters, notes.md)
"""
import argparse
import contextlib
import os
import stat


class Parser(argparse.ArgumentParser):
    """argparse that never takes an abbreviation (--epoch is not --epochs, as run_week1.sh refuses it
    too, so a typo never passes for another flag) and says a wrong flag in one line: exit code 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}{full_names(self, message)}\n"
                     f"(`python {self.prog} --help` lists every flag)\n")


def full_names(parser: argparse.ArgumentParser, message: str) -> str:
    """For an unrecognized --flag that begins real ones (--epoch): name them."""
    if not message.startswith("unrecognized arguments:"):
        return ""
    words = [w.split("=")[0] for w in message.split() if w.startswith("--")]
    full = sorted({o for w in words for o in parser._option_string_actions if o.startswith(w) and o != w})
    return f". Flags are not abbreviated; write them in full: {' or '.join(full)}" if full else ""


def format_duration(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def write_atomic(path, write):
    """Replace the file at `path` all at once: write(f) into a binary file <path>.tmp beside it, fsync,
    rename it over `path`, fsync the folder. A kill, a full disk or a power cut at any moment leaves
    the previous file or the new one, never half of one. A symlink stays a symlink (its target is
    replaced), and a file that was there keeps its permissions."""
    target = os.path.realpath(path)
    tmp = target + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(target):
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(tmp, target)
    except BaseException:  # a full disk, a second Ctrl-C: drop the partial file, keep the previous one
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError, AttributeError):  # the rename itself reaches the disk (POSIX only)
        fd = os.open(os.path.dirname(target), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
