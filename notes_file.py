"""The results block of notes.md: found between two marker lines, replaced atomically, everything else left
byte-identical (summarize.py --write-notes writes it; notes_block there says what goes in it).
"""
import os

import cli
from results_file import RunError, UsageError

NOTES_START, NOTES_END = "<!-- results:start -->", "<!-- results:end -->"


def split_notes(text, path) -> tuple:
    """(everything up to and including the start marker, everything from the end marker on).
    RunError unless each marker is there exactly once, start before end."""
    n_start, n_end = text.count(NOTES_START), text.count(NOTES_END)
    if (n_start, n_end) != (1, 1):
        raise RunError(f"--write-notes {path}: needs the line {NOTES_START} and later the line {NOTES_END}, once "
                       f"each; found {n_start} and {n_end}. Add or remove markers so that exactly one pair surrounds "
                       f"the results block, then run this again. The file was left untouched.")
    start, end = text.index(NOTES_START), text.index(NOTES_END)
    if end < start:
        raise RunError(f"--write-notes {path}: {NOTES_END} comes before {NOTES_START}; swap them so the start "
                       f"marker is first, then run this again. The file was left untouched.")
    return text[:start + len(NOTES_START)], text[end:]


def replace_block(text, block, path) -> str:
    """text with only the part between the markers replaced by block (in the file's own line ends)."""
    before, after = split_notes(text, path)
    newline = "\r\n" if "\r\n" in text else "\n"
    return before + newline + block.replace("\n", newline) + newline + after


def read_notes(path) -> str:
    if not os.path.isfile(path):
        raise UsageError(f"--write-notes {path}: no such file. Give the notes file that holds the lines "
                         f"{NOTES_START} and {NOTES_END} (e.g. notes.md).")
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"--write-notes {path} could not be read as UTF-8 text ({e}); it was left untouched.")


def write_notes(notes_path, text, block) -> bool:
    """Put block between the markers; False (and no write) when it is already there."""
    new = replace_block(text, block, notes_path)
    if new == text:
        return False
    try:
        cli.write_atomic(notes_path, lambda f: f.write(new.encode("utf-8")))
    except OSError as e:
        raise RunError(f"--write-notes {notes_path} could not be written ({type(e).__name__}: {e}); it was left "
                       f"untouched. Check the folder's permissions and free space.")
    return True
