"""The results CSV: its columns, and how every script reads, checks and appends to it.

Torch-free on purpose, so that summarize.py can use it without importing torch. common.py re-exports the appender, the columns and the error classes.

Three layouts are valid: this version's 39 columns (CSV_COLUMNS) and the earlier versions' first 38
and first 28 (LAYOUTS). An older file keeps working as it is: it is never rewritten, new rows are
appended in its own columns, and the note returned by append_result says which fields were left out. A file
that Excel re-saved is handled the same way by every script: a byte-order mark ("CSV UTF-8") is
simply skipped, and a semicolon-separated file is refused with the cause named (excel_problem).
"""
import csv
import io
import os

try:
    import fcntl  # POSIX file locks (macOS, Linux); not on Windows
except ImportError:  # pragma: no cover
    fcntl = None

OLD_COLUMNS = [
    # the nine columns other tools rely on, in this order
    "ts", "method", "dataset", "backbone", "tuned_params_%", "acc@1", "ece", "train_time_s", "epochs",
    # what someone needs to reproduce the row
    "time_per_epoch_s", "eval_time_s", "img_size", "train_samples", "eval_samples", "batch_size",
    "lr", "weight_decay", "seed", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
    "train_head", "precision", "threads", "weights", "torch", "calibration_file",
]
# Added after the first version, in this order; any of them may be blank (e.g. no validation split).
NEW_COLUMNS = ["val_samples", "val_acc@1", "val_ece", "temperature", "ece_ts", "head_lr", "norm_lr",
               "compile_time_s", "cpu", "run_key",
               "weights_sha256"]  # of the --weights file: names the weights wherever the file lives
CSV_COLUMNS = OLD_COLUMNS + NEW_COLUMNS
# Every header a version of the scripts wrote, newest first; each is a start of CSV_COLUMNS.
LAYOUTS = (CSV_COLUMNS, CSV_COLUMNS[:38], OLD_COLUMNS)


class UsageError(Exception):
    """A flag value or path is wrong: exit code 2."""


class RunError(Exception):
    """The run (or the summary) cannot go on, e.g. a damaged file: exit code 1."""


# ----------------------------------------------------------------------------- the header

def parse_header(first_line: str) -> list:
    """Column names of a first line; a leading byte-order mark (Excel's 'CSV UTF-8') is dropped."""
    return next(csv.reader([first_line.lstrip("\ufeff").rstrip("\r\n")]), [])


def excel_problem(first_line: str, path) -> str:
    """Why a file Excel re-saved cannot be used, or "" if it can. The one diagnosis every script uses.

    Excel writes semicolons instead of commas where the comma is the decimal separator (most of
    Europe). Read as commas, such a header is one long field, so the file would look empty or alien.
    """
    line = first_line.lstrip("\ufeff").rstrip("\r\n")
    by_comma = next(csv.reader([line]), [])
    by_semicolon = next(csv.reader([line], delimiter=";"), [])
    if len(by_semicolon) > len(by_comma) and "method" in by_semicolon:
        return (f"{path} has semicolons between its columns: Excel saved it with semicolons (its CSV format "
                f"where the decimal separator is a comma), and this project reads only comma-separated files. "
                f"It was left untouched. Re-save it as comma-separated CSV (set Excel's list separator to a comma, "
                f"then Save As 'CSV UTF-8'), or start a new results file, e.g. --results results_week1_v2.csv.")
    return ""


def layout_of(first_line: str, path) -> list:
    """The columns a file with this first line is appended in: one of LAYOUTS.
    UsageError, with the fix, for any other header (the file is never touched)."""
    problem = excel_problem(first_line, path)
    if problem:
        raise UsageError(problem)
    header = parse_header(first_line)
    if header in LAYOUTS:
        return list(header)
    n = max(len(header), len(CSV_COLUMNS))
    padded, expected = header + [""] * (n - len(header)), CSV_COLUMNS + [""] * (n - len(CSV_COLUMNS))
    diff = [f"column {i + 1}: file has {a!r}, expected {b!r}" for i, (a, b) in enumerate(zip(padded, expected))
            if a != b]
    raise UsageError(f"--results {path} has a different header than this version writes "
                     f"({'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}). It was left untouched: "
                     f"pass --results with a new file name, e.g. --results results_week1_v2.csv.")


def _first_line(f) -> bytes:
    f.seek(0)
    return f.readline()


def _decode(line: bytes) -> str:
    return line.decode("utf-8", errors="replace")  # a header is ASCII; never fail on a stray byte


def left_out_note(path, columns) -> str:
    """What an older layout does not record, and how to get it; "" for this version's layout."""
    if columns == CSV_COLUMNS:
        return ""
    left_out = ", ".join(CSV_COLUMNS[len(columns):])
    return (f"note: {path} has an earlier version's {len(columns)}-column header, so the row was appended "
            f"in those columns and these were left out: {left_out}. Nothing in the file was "
            f"rewritten. To record them, pass --results with a new file name (e.g. --results results_week2.csv); "
            f"summarize.py reads both files.")


# ----------------------------------------------------------------------------- checking and appending

def check_results_file(path) -> list:
    """Fail early, before any training, if the results CSV cannot take our row.
    Returns the columns the row will be written in (CSV_COLUMNS for a new or empty file)."""
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise UsageError(f"--results {path} is a folder; give a CSV file name, e.g. "
                         f"{os.path.join(path, 'results_week1.csv')}.")
    if not os.path.isdir(folder):
        raise UsageError(f"--results {path}: folder {folder} does not exist; create it or pick another path.")
    if not os.path.exists(path):
        if not os.access(folder, os.W_OK):
            raise UsageError(f"--results {path}: folder {folder} is not writable; pick another path.")
        return list(CSV_COLUMNS)
    if not os.access(path, os.W_OK):
        raise UsageError(f"--results {path} is not writable; fix its permissions or pick another file.")
    with open(path, "rb") as f:
        first = _first_line(f)
    return layout_of(_decode(first), path) if first else list(CSV_COLUMNS)


def csv_line(values, newline="\n") -> str:
    """One CSV line with its newline; fields holding commas or quotes are quoted."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator=newline).writerow(list(values))
    return buf.getvalue()


def _values(row: dict, columns) -> list:
    # The first 28 must be there (a missing one is a bug); the newer ones may be absent: blank.
    return [row[c] if c in OLD_COLUMNS else row.get(c, "") for c in columns]


def append_result(path, row: dict) -> str:
    """Append one row atomically: exclusive lock, header check, one write() call, fsync.

    A new or empty file gets CSV_COLUMNS' header. A file in an earlier layout (38 or 28 columns) gets
    the row in its own columns; the note that says so is printed and returned ("" otherwise).
    Any other header: UsageError, file untouched. A file's CRLF line ends (Excel) are kept.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    with os.fdopen(fd, "r+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            columns, newline = list(CSV_COLUMNS), "\n"
            data = csv_line(columns)
        else:
            first = _first_line(f)
            columns = layout_of(_decode(first), path)
            newline = "\r\n" if first.endswith(b"\r\n") else "\n"
            f.seek(size - 1)
            data = "" if f.read(1) == b"\n" else newline
        data += csv_line(_values(row, columns), newline)
        os.write(f.fileno(), data.encode("utf-8"))  # O_APPEND: lands at the end, in one piece
        os.fsync(f.fileno())
    note = left_out_note(path, columns)
    if note:
        print(note)
    return note


# ----------------------------------------------------------------------------- reading

def read_rows(path, needed=OLD_COLUMNS) -> list:
    """Every row as a dict with all of CSV_COLUMNS (a column the file lacks, or a blank field, is "")
    plus "_line", the row's line number in the file. Reads every layout and a byte-order mark.

    A missing file has no rows: []. RunError, saying how to fix it, for a folder, a non-UTF-8 file,
    a semicolon-separated file, a header without the `needed` columns, or a row with too many fields.
    """
    if not os.path.exists(path):
        return []
    if os.path.isdir(path):
        raise RunError(f"{path} is a folder, not a results file; pass the CSV inside it.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: skips a BOM if there is one
            text = f.read()
    except UnicodeDecodeError as e:
        raise RunError(f"{path} is not UTF-8 text (byte {e.start}): Excel's plain 'CSV' format writes another "
                       f"encoding. Re-save it as 'CSV UTF-8', or use the file as the scripts wrote it.")
    problem = excel_problem(text.split("\n", 1)[0], path)
    if problem:
        raise RunError(problem)
    reader = csv.DictReader(io.StringIO(text), restval="")
    header = reader.fieldnames or []
    missing = [c for c in needed if c not in header]
    if header and missing:
        raise RunError(f"{path} is not a results file of this project: it lacks the column(s) {', '.join(missing)}.")
    rows = []
    for raw in reader:
        if None in raw:  # DictReader puts fields beyond the header under the key None
            raise RunError(f"{path} line {reader.line_num} has {len(header) + len(raw[None])} fields but the header "
                           f"has {len(header)}. Fix or delete that line (the other rows are fine).")
        row = dict.fromkeys(CSV_COLUMNS, "")
        row.update(raw)
        row["_line"] = reader.line_num
        rows.append(row)
    return rows
