"""Checkpoints: everything needed to continue an interrupted run exactly, and nothing more.

A run is identified by its settings: every flag that changes its numbers (method, seed, rates, sizes, data,
weights...), not the ones that only change how or where it runs (threads, --compile, the results path...).
Those settings hash to the run key, which names the run's one checkpoint file,
<results stem>_checkpoints/<method>_seed<seed>_<key>.pt, and goes into the results row, so that
run_week1.sh can tell a finished run (its row is in the results file) from one to resume.

A checkpoint holds the trainable tensors (not the frozen backbone, which is rebuilt from the settings), the
AdamW and scheduler state, how far the run got (epoch, step, that epoch's data order), the data-order /
augmentation generator and torch's global RNG (LoRA dropout draws from it), the losses and training time
so far. Restored into a model built the same way, the run continues as if it had never stopped.

One process runs a run at a time: it holds a lock file beside the checkpoint (run_lock), and the same
command started again meanwhile is refused.

Read top to bottom: settings and names -> the run's state before training -> one process per run ->
writing and reading files -> saving and restoring a run -> stopping on a signal.
"""
import contextlib
import csv
import glob
import hashlib
import json
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

try:
    import fcntl  # POSIX file locks (Linux, macOS); on Windows runs are not locked against a second start
except ImportError:  # pragma: no cover
    fcntl = None

import cli

FORMAT = 1  # bump when the file's layout changes: older files are then refused as unreadable
REQUIRED = {"format", "settings", "run_key", "trainable", "optimizer", "scheduler", "data_rng", "torch_rng",
            "progress"}
# What defines a run: these settings, and only these, hash to its run key. Every flag of every script is in
# one of the two lists (a test checks), so a new flag cannot enter or leave the key unnoticed.
RUN_KEY = ("backbone", "batch_size", "data_dir", "epochs", "eval_samples", "head_lr", "img_size", "lora_alpha",
           "lora_dropout", "lora_r", "lora_targets", "lr", "method", "no_pretrained", "no_train_head", "norm_lr",
           "precision", "seed", "train_samples", "val_samples", "weight_decay", "weights")
# How or where a run happens, not what it computes: these may differ between the interrupted command and
# the one that resumes it.
NOT_RUN_KEY = ("threads", "compile", "results", "save_adapter", "checkpoint_every", "resume", "run_state")
# Per-group rates exist only for the methods that have the flag: absent (None) they are not in the key.
ONLY_IF_GIVEN = ("head_lr", "norm_lr")


class Refused(Exception):
    """This command cannot go on with the checkpoint as it is (exit code 2): the message says what to do."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped training at a step boundary; exit code 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# ----------------------------------------------------------------------------- settings and names

def run_settings(values: dict) -> dict:
    """What decides a run's numbers: the RUN_KEY values, paths made absolute (the same run started from
    another folder is the same run), tuples as lists (as JSON and the checkpoint file keep them)."""
    settings = {k: (list(values.get(k)) if isinstance(values.get(k), tuple) else values.get(k))
                for k in RUN_KEY if not (k in ONLY_IF_GIVEN and values.get(k) is None)}
    for key in ("data_dir", "weights"):
        if settings.get(key):
            settings[key] = os.path.abspath(os.path.expanduser(settings[key]))
    return settings


def run_key(settings: dict) -> str:
    """Short hash of the settings: equal keys = the same run."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def folder_for(results: str) -> str:
    return os.path.splitext(results)[0] + "_checkpoints"


def file_for(s) -> str:
    """The checkpoint file of this run: one per settings, next to the results file."""
    return os.path.join(folder_for(s.results), f"{s.method}_seed{s.seed}_{s.run_key}.pt")


def resume_command() -> str:
    """This very command with --resume: what the user runs to continue."""
    python = "python" if shutil.which("python") == sys.executable else sys.executable
    argv = [a for a in sys.argv[1:] if a != "--resume"]
    return shlex.join([python, sys.argv[0], *argv, "--resume"])


def describe_differences(ours: dict, theirs: dict) -> str:
    """'--lr 0.003 here, 0.001 in the checkpoint; ...' for every setting that differs."""
    def flag(key):
        return key if key == "method" else "--" + key.replace("_", "-")

    def value(settings, key):
        return json.dumps(settings[key]) if key in settings else "(not recorded)"
    keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k, ()) != theirs.get(k, ()))
    return "; ".join(f"{flag(k)} {value(ours, k)} here, {value(theirs, k)} in the checkpoint" for k in keys)


# ----------------------------------------------------------------------------- before training

def has_row(results: str, key: str) -> bool:
    """True if the results file has a row with this run key."""
    return bool(row_lines(results, key))


def row_lines(results: str, key: str) -> list:
    """The line numbers of the results file's rows with this run key. A file without a run_key column
    (written by an older version) has no recognisable rows."""
    if not os.path.isfile(results):
        return []
    with open(results, newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        if "run_key" not in header:
            return []
        col = header.index("run_key")
        return [rows.line_num for row in rows if len(row) > col and row[col] == key]


def check_before_start(s):
    """Right after the flags are parsed, before any data or weights are loaded: answer --run-state, and refuse
    what would lose or mix up work."""
    path = file_for(s)
    if s.run_state:  # for run_week1.sh: done / checkpoint / new, a tab, the checkpoint file; exit 0
        state = "done" if has_row(s.results, s.run_key) else "checkpoint" if os.path.exists(path) else "new"
        print(f"{state}\t{path}")
        sys.exit(0)
    pid = running_elsewhere(s)  # before anything about its checkpoint, which that process is writing
    if pid:
        raise Refused(already_running_message(s, pid))
    if s.resume:
        if not os.path.exists(path):
            raise Refused(no_checkpoint_message(s, path))
        load(path, s)  # refuses a damaged file or other settings now, not after loading the data
    elif os.path.exists(path):
        raise Refused(f"a checkpoint of a run with these settings already exists: {path}. Add --resume to "
                      f"continue it (with the same numbers as a run that was never interrupted), or delete it "
                      f"to start this run over: rm {shlex.quote(path)}. It is never overwritten.")
    lines = row_lines(s.results, s.run_key)
    if lines:  # a deliberate repeat is legitimate; an accidental one should not pass unnoticed
        print(f"note: this run (run_key {s.run_key}: the same settings) is already in {s.results} "
              f"(line {', '.join(map(str, lines))}); it runs again and adds another row, of which summarize.py "
              f"counts only the newest (./run_week1.sh skips such runs). Change a setting, e.g. --seed, to run "
              f"a new one.")


def no_checkpoint_message(s, path) -> str:
    """--resume without a checkpoint for these settings: say so, and what there is instead."""
    msg = f"--resume: there is no checkpoint for these settings ({path} does not exist)."
    others = []
    for other in sorted(glob.glob(os.path.join(folder_for(s.results), f"{s.method}_seed{s.seed}_*.pt"))):
        try:
            theirs = torch.load(other, map_location="cpu", weights_only=True)["settings"]
        except Exception:
            continue  # a damaged neighbour says nothing about these settings
        others.append(f"{os.path.basename(other)}: {describe_differences(s.run_settings, theirs)}")
    if others:
        msg += (f" There is a checkpoint of {s.method} seed {s.seed} with other settings ("
                + "; and ".join(others[:3]) + "): to continue it, give the flags it was made with.")
    if has_row(s.results, s.run_key):
        msg += f" This run has already finished: its row is in {s.results}."
    return msg + " Leave out --resume to start this run from zero."


# ----------------------------------------------------------------------------- one process per run

def lock_file_for(s) -> str:
    """The run's lock file, beside its checkpoint: <method>_seed<seed>_<key>.lock."""
    return os.path.splitext(file_for(s))[0] + ".lock"


def running_elsewhere(s) -> int:
    """Another process's id if one is running this very run (it holds the run's lock), -1 if one is but
    its id is unknown, 0 if none is. A shared lock taken and dropped at once: it only asks."""
    path = lock_file_for(s)
    if fcntl is None or not os.path.exists(path):
        return 0
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                return 0  # free; closing the file drops our shared lock
            except BlockingIOError:
                text = f.read().strip()
                return int(text) if text.isdigit() else -1
    except OSError:
        return 0


def already_running_message(s, pid: int) -> str:
    who = f"process {pid}" if pid > 0 else "another process"
    return (f"this run is already running: {who} holds its lock {lock_file_for(s)} (the same script and "
            f"settings, the same results file). Two copies would train on one checkpoint and write two rows. "
            f"Wait for it to finish: its row then appears in {s.results}. To run something else meanwhile, "
            f"change a setting (e.g. --seed) or --results.")


@contextlib.contextmanager
def run_lock(s):
    """Hold the run's lock while it trains, evaluates and writes its row, so that the same command started
    twice at once runs once: the second is Refused (exit 2). The OS drops the lock when this process ends,
    however it ends (a crash, kill -9), so a stale lock file never blocks a run; on a normal end the file
    goes too. Without fcntl (Windows) nothing is locked."""
    if fcntl is None:
        yield
        return
    path = lock_file_for(s)
    f = _acquire(path, s)
    try:
        yield
    finally:
        if f is not None:
            with contextlib.suppress(OSError):
                os.remove(path)  # while still locked: _acquire re-checks the file after locking
                os.rmdir(os.path.dirname(path))  # the checkpoints folder too, once empty
            f.close()


def _acquire(path, s):
    """Lock `path` (made if missing) and write our process id into it; -> the open file, None if it cannot
    be made (then the run goes on unlocked, with a warning). Refused if another process holds it after a
    second of retries (a run that only asked, running_elsewhere, lets go at once)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        print(f"warning: could not create {os.path.dirname(path)} ({e}); this run is not locked against a "
              f"second start of itself.", file=sys.stderr)
        return None
    busy = 0
    while True:
        try:
            f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="ascii")
        except OSError as e:
            print(f"warning: could not open {path} ({e}); this run is not locked against a second start of "
                  f"itself.", file=sys.stderr)
            return None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            busy += 1
            if busy > 20:
                raise Refused(already_running_message(s, running_elsewhere(s)))
            time.sleep(0.05)
            continue
        # The previous holder removes the file when it ends: if it did after we opened it, we hold the lock
        # of a deleted file, which nobody else can see. Lock the file that is there now instead.
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                f.seek(0)
                f.truncate()
                f.write(str(os.getpid()))
                f.flush()
                return f
        f.close()


# ----------------------------------------------------------------------------- files

def atomic_save(obj, path):
    """torch.save, through cli.write_atomic: a kill or power loss at any moment leaves either the
    previous file or the new one, never a half-written one."""
    cli.write_atomic(path, lambda f: torch.save(obj, f))


def load(path, s) -> dict:
    """Read a checkpoint and check that it continues this run; Refused (exit 2) otherwise."""
    start_over = f"delete it and run the same command without --resume to start this run over: rm {shlex.quote(path)}"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors/dicts/numbers only
    except Exception as e:
        first = str(e).split(". ")[0].splitlines()[0][:160] if str(e) else ""  # torch's advice doesn't apply
        raise Refused(f"--resume: the checkpoint {path} is damaged or truncated ({type(e).__name__}: {first}); "
                      f"a disk that filled up, or a copy cut short, does this. It cannot be continued: {start_over}.")
    if not (isinstance(ckpt, dict) and REQUIRED <= set(ckpt) and ckpt["format"] == FORMAT):
        raise Refused(f"--resume: {path} is not a checkpoint this version can continue (damaged, or written by "
                      f"another version): {start_over}.")
    theirs, ours = ckpt["settings"], s.run_settings
    for what in ("method", "backbone"):
        if theirs.get(what) != ours.get(what):
            raise Refused(f"--resume: the checkpoint {path} was made for {what} {theirs.get(what) or 'default'}, "
                          f"and this run is {what} {ours.get(what) or 'default'}; it cannot continue it. Resume it "
                          f"with the script and flags it was made with, or {start_over}.")
    if theirs != ours:
        raise Refused(f"--resume: the checkpoint {path} was made with other settings "
                      f"({describe_differences(ours, theirs)}). Resume it with the flags it was made with, "
                      f"or {start_over}.")
    return ckpt


def discard(s):
    """After the run's row is written: its checkpoint has served its purpose."""
    path = file_for(s)
    if os.path.exists(path):
        os.remove(path)
        print(f"checkpoint: removed {path}")
        with contextlib.suppress(OSError):  # the folder too, once empty
            os.rmdir(os.path.dirname(path))


# ----------------------------------------------------------------------------- saving and restoring a run

@dataclass
class Progress:
    """How far training got, besides the tensors and RNG states."""
    epoch: int = 1                              # the epoch under way, 1-based (epochs + 1 once all are done)
    order: Optional[torch.Tensor] = None        # its data order, drawn when it starts
    losses: list = field(default_factory=list)  # its per-step losses so far
    time_s: float = 0.0                         # its training seconds so far, summed over pieces
    epoch_losses: list = field(default_factory=list)  # per-step losses of each finished epoch
    epoch_times: list = field(default_factory=list)   # training seconds of each finished epoch

    def finish_epoch(self):
        self.epoch_losses.append(self.losses)
        self.epoch_times.append(self.time_s)
        self.epoch, self.order, self.losses, self.time_s = self.epoch + 1, None, [], 0.0

    def where(self, steps_per_epoch: int, epochs: int) -> str:
        if not self.losses:
            return f"after epoch {self.epoch - 1} of {epochs}" if self.epoch > 1 else "before the first step"
        return f"at epoch {self.epoch}/{epochs}, step {len(self.losses)}/{steps_per_epoch}"


def save(path, model, opt, sched, g: torch.Generator, progress: Progress, s) -> bool:
    """Write the run's checkpoint; on failure (e.g. a full disk) warn and return False: training goes on, and
    the previous checkpoint, if any, is intact."""
    ckpt = dict(format=FORMAT, settings=dict(s.run_settings), run_key=s.run_key,
                trainable={n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                data_rng=g.get_state(), torch_rng=torch.get_rng_state(), progress=vars(progress))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_save(ckpt, path)
        return True
    except OSError as e:
        print(f"warning: could not write the checkpoint {path} ({e}); training goes on, and the previous "
              f"checkpoint, if any, is intact.", file=sys.stderr)
        return False


def restore(path, s, model, opt, sched, g: torch.Generator) -> Progress:
    """Load the checkpoint into a model, optimizer and scheduler built exactly as at the start of the run, and
    set both RNGs; returns how far the run got."""
    ckpt = load(path, s)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = ckpt["trainable"]
    if set(saved) != set(trainable) or any(saved[n].shape != p.shape for n, p in trainable.items()):
        raise Refused(f"--resume: the tensors in {path} do not fit this model (damaged, or written by another "
                      f"version): delete it to start over: rm {shlex.quote(path)}.")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(saved[n])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    g.set_state(ckpt["data_rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    return Progress(**ckpt["progress"])


# ----------------------------------------------------------------------------- stopping on a signal

class StopRequest:
    """Why training should pause at the next step boundary: a signal (Ctrl-C, SIGTERM) or the checkpoint
    clock. The loop reads it between steps, so a checkpoint is never taken in the middle of a step."""

    def __init__(self, every_s: float):
        self.signum = 0  # the signal received, 0 if none
        self.every_s = every_s
        self.next_save = time.monotonic() + every_s

    def due(self) -> bool:
        return bool(self.signum) or time.monotonic() >= self.next_save

    def saved(self):
        self.next_save = time.monotonic() + self.every_s


@contextlib.contextmanager
def stop_on_signals(every_min: float):
    """Inside: SIGINT and SIGTERM only set stop.signum, and the loop stops at the next step boundary; a second
    Ctrl-C stops at once. With every_min = 0 (no checkpoints) nothing changes: Ctrl-C stops at once. Outside the
    training loop (data loading, evaluation) both signals keep their usual, immediate effect."""
    stop = StopRequest(every_min * 60 if every_min else float("inf"))
    if not every_min:
        yield stop
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and stop.signum == signal.SIGINT:
            raise KeyboardInterrupt  # pressed twice: don't wait for the step to end
        stop.signum = signum
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def interrupted(signum: int, path: str, saved: bool, where: str) -> Interrupted:
    """The exception (and message) for a run stopped by a signal at a step boundary."""
    what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    if not saved:
        return Interrupted(f"{what} {where}; the checkpoint could not be written (see the warning above), so "
                           f"this run must start over. No row was written to the results file.", signum)
    return Interrupted(f"{what} {where}: progress saved to {path}. No row was written to the results file. "
                       f"To continue where it stopped, run:\n  {resume_command()}", signum)
