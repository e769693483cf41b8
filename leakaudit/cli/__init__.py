"""The `leakaudit` command. Thin: each topic module registers its commands; bad input exits 2 in one line."""

from __future__ import annotations

import codecs
import errno
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import typer
import typer.main

from leakaudit.errors import InputError, first_line
from leakaudit.threads import configure_threads

app = typer.Typer(
    name="leakaudit",
    help="Measure what a fine-tuned language model leaks about the data it was tuned on.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from leakaudit import package_version

        print(f"leakaudit {package_version('leakaudit')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print leakaudit's version and exit.",
                                       is_eager=True, callback=_print_version)) -> None:
    """Measure what a fine-tuned language model leaks about the data it was tuned on."""

# One module per topic; each defines register(app).
from leakaudit.cli import backdoor, core, generate, mia, pii, run, train  # noqa: E402

for _topic in (core, mia, train, generate, pii, backdoor, run):
    _topic.register(app)


#: the exit code of a run stopped by Ctrl-C (128 + SIGINT), and by SIGTERM (128 + SIGTERM: `kill`, a scheduler)
INTERRUPTED = 130
TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Python next runs: the same orderly stop as Ctrl-C (locks released, the
    texts scored so far saved, the message printed) instead of dying silently mid-write."""


#: the signal that stopped the command (SIGTERM, SIGHUP), if one did: typer turns the KeyboardInterrupt it
#: raises into a plain exit code 130, and the process exits 128 + this number instead
_terminated: int | None = None


def _on_signal(signum, frame) -> None:
    global _terminated
    _terminated = signum
    if signum == getattr(signal, "SIGHUP", None):
        _off_the_closed_terminal()
    if sys.exc_info()[0] is not None and _other_rank():
        # a launched process other than rank 0, stopped by the launcher while it reports an error (rank 0
        # reports it): raised here, Terminated chained onto that error and printed its unmasked message
        os._exit(128 + signum)
    raise Terminated


def _off_the_closed_terminal() -> None:
    """Point stdout and stderr, where they were the terminal that hung up, at /dev/null: the first write to it
    (a progress bar's last refresh as the stop unwinds it) raised OSError EIO in place of the stop, which
    ended in exit 1 and a traceback, not 129. A hung-up terminal is a character device that is no longer a
    tty; a stream sent to a file (or a terminal still open, under `kill -HUP`) keeps its lines."""
    import stat

    for fd in (1, 2):
        try:
            if not stat.S_ISCHR(os.fstat(fd).st_mode) or os.isatty(fd):
                continue
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
        except OSError:  # a stream already closed
            pass


def _stop_signals() -> list[int]:
    """SIGTERM (`kill`, a scheduler, a launcher) and SIGHUP (the terminal closed under a run started without
    nohup: the process died outright, mid-write). SIGHUP only where it is not ignored already: under `nohup`
    the run goes on, as asked. Windows has no SIGHUP."""
    stops = [signal.SIGTERM]
    hup = getattr(signal, "SIGHUP", None)
    if hup is not None and signal.getsignal(hup) is signal.SIG_DFL:
        stops.append(hup)
    return stops


def _other_rank() -> bool:
    """A launched process other than rank 0 (distributed.world, already imported by `_one_process`)."""
    from leakaudit.distributed import world

    try:
        rank, size = world()
    except (ValueError, InputError):  # a launcher's variable that is no number: not this handler's to say
        return False
    return size > 1 and rank != 0


#: OSErrors that are the machine's, not the input's or a bug's: one line instead of a traceback
MACHINE_ERRNOS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO)


def main() -> None:
    """Console entry point: bad input (InputError or a click usage error) prints ONE `error: ...` line, exit 2;
    Ctrl-C, SIGTERM and SIGHUP stop in order and say that what finished is kept."""
    global _terminated
    _terminated = None  # called in-process again (tests, a notebook): an earlier SIGTERM is not this one's
    try:
        os.getcwd()
    except FileNotFoundError:  # deleted under the shell (rebuilt in another terminal): torch's import then dies
        _fail("the working directory no longer exists (deleted or moved since the shell entered it): cd into an "
              "existing folder and rerun")  # with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so", exit 2
    # first of all: before numpy or torch start (leakaudit/threads.py). numpy's BLAS threads, started by an
    # import before it, were counted as other processes' busy CPUs, and every command ran on one thread
    configure_threads()
    # transformers' and the hub's tqdm bars (loading weights, writing shards) are noise among a command's lines;
    # read when they are imported, after this. A library caller's own setting is left alone (models/load.py)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _printable_streams()
    from leakaudit.distributed import mpi_launch_without_rank, world

    try:  # the launch itself, before anything asks which process this is
        world()  # RANK=abc
    except InputError as exc:
        _fail(exc.format())
    if (why := mpi_launch_without_rank()) is not None and "--help" not in sys.argv:
        _fail(why)
    with _one_process():
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            _main()
            return
        previous = {signum: signal.signal(signum, _on_signal) for signum in _stop_signals()}
        try:
            _main()
        finally:
            for signum, handler in previous.items():  # called in-process (tests, a notebook): the caller's again
                signal.signal(signum, handler)


def _printable_streams() -> None:
    """stdout that writes any text, as stderr already does (backslashreplace): one not in UTF-8 (Windows with
    stdout redirected to a file writes cp1252; LC_ALL=C where Python does not switch to UTF-8 writes ASCII)
    failed on the first `≥` of mia's table with a rich traceback and exit 1, after the command's work, where a
    character it cannot show is now written as `\\u2265`. A path's undecodable bytes (surrogates) still go out
    as the bytes they were, as the C locale's surrogateescape wrote them."""
    stream = sys.stdout
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    if (encoding != "utf8" and getattr(stream, "errors", None) in ("strict", "surrogateescape")
            and hasattr(stream, "reconfigure")):
        codecs.register_error("leakaudit.escape", _escape_or_bytes)
        stream.reconfigure(errors="leakaudit.escape")


def _escape_or_bytes(exc: UnicodeError) -> tuple[str | bytes, int]:
    """The error handler of `_printable_streams`: a run of surrogateescape'd bytes goes out as those bytes, any
    other character the encoding lacks as its backslash escape."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    text = exc.object
    end = exc.start
    if "\udc80" <= text[end] <= "\udcff":
        while end < exc.end and "\udc80" <= text[end] <= "\udcff":
            end += 1
        return bytes(ord(c) - 0xDC00 for c in text[exc.start:end]), end
    while end < exc.end and not "\udc80" <= text[end] <= "\udcff":
        end += 1
    return text[exc.start:end].encode("ascii", "backslashreplace").decode("ascii"), end


#: commands that do not run data-parallel (sampling, generation, merging): under a launcher rank 0 runs them
#: alone; every process did all the work, printed every line and appended to the same resumable sample file
ONE_PROCESS = ("pii", "generate", "audit-data", "merge", "model-info", "seeds", "backdoor extract",
               "backdoor identify", "backdoor detect")


#: options that print and exit before any work: under a launcher rank 0 alone answers them
ANSWERED_BY_RANK_0 = frozenset({"--help", "-h", "--version"})


@contextmanager
def _one_process() -> Iterator[None]:
    """Under a launcher, a command of ONE_PROCESS runs on rank 0 as if alone; the other processes stop at once
    (exit 0) and rank 0 says so."""
    from leakaudit.distributed import alone, world

    words = [a for a in sys.argv[1:] if not a.startswith("-")][:2]
    command = next((c for c in (" ".join(words), words[0] if words else "") if c in ONE_PROCESS), None)
    rank, size = world()
    if size > 1 and rank != 0 and ANSWERED_BY_RANK_0.intersection(sys.argv[1:]):
        sys.exit(0)  # help and the version are rank 0's to print: every process printed them, N copies on stdout
    if size == 1 or command is None:
        yield
        return
    if rank != 0:
        sys.exit(0)
    if "--help" not in sys.argv:
        print(f"note: `leakaudit {command}` runs in one process: rank 0 does it alone, the other {size - 1} "
              f"process{'es' if size > 2 else ''} stopped", file=sys.stderr)
    with alone():
        yield


def _main() -> None:
    # peft (<= 0.21) reads transformers' deprecated `is_gradient_checkpointing` on every adapter: noise to users.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # typer may vendor its own click; its exception classes live where typer.BadParameter does
    clk = importlib.import_module(typer.BadParameter.__module__)
    try:
        if (twice := _repeated_option(sys.argv[1:])) is not None:
            _fail(f"option '{twice}': given twice: it takes one value, and the last would win silently (a list is "
                  f"one comma list: {twice} a,b)")
        from leakaudit.outputs import forget_created

        forget_created()
        # errors come back to us instead of click's multi-line usage box
        code = app(args=[_home_in_value(a) for a in sys.argv[1:]], standalone_mode=False)
    except InputError as exc:
        from leakaudit.outputs import remove_unwritten

        remove_unwritten()
        _fail(exc.format())
    except clk.NoArgsIsHelpError as exc:  # no arguments: the help (typer prints it while raising), exit 2
        if exc.format_message().strip():
            exc.show()
        sys.exit(exc.exit_code)
    except clk.UsageError as exc:
        _fail(_usage_line(exc))
    except (typer.Abort, KeyboardInterrupt) as exc:  # Ctrl-C: say that nothing finished is lost
        if isinstance(exc.__cause__, EOFError):  # click turns any EOFError into Abort: a failure, not Ctrl-C
            exc.__cause__.__suppress_context__ = True
            _bug(exc.__cause__)
        code = INTERRUPTED
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # a path given (a name of 90 CJK characters is 270 bytes): bad input
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}a name in a path is longer than the file system allows ({exc.strerror})")
        if exc.errno not in MACHINE_ERRNOS:  # anything else may be a bug: keep its traceback
            _bug(exc)
        from leakaudit.data.pii_mask import mask_message

        where = f"{exc.filename}: " if exc.filename else ""
        _say(f"error: {mask_message(where + (first_line(exc) if exc.strerror is None else exc.strerror))}")
        sys.exit(1)
    except clk.ClickException as exc:
        from leakaudit.data.pii_mask import mask_message

        _say(f"error: {mask_message(exc.format_message())}")
        sys.exit(exc.exit_code)
    except Exception as exc:
        if not _full_disk(exc):  # anything else may be a bug: keep its traceback
            _bug(exc)
        from leakaudit.data.pii_mask import mask_message

        _say(f"error: {mask_message(first_line(exc))} (the disk is full: free space and rerun the same command to "
             "resume)")
        sys.exit(1)
    from leakaudit.distributed import is_main

    if code == INTERRUPTED and _terminated is not None:
        code = 128 + _terminated
    if (code == INTERRUPTED or _terminated is not None and code == 128 + _terminated) and is_main():
        try:  # typer turns Ctrl-C into the code, silently
            print("interrupted: what finished is kept; rerun the same command to resume", file=sys.stderr)
        except OSError:  # SIGHUP: the terminal it would go to is gone
            pass
    sys.exit(code if isinstance(code, int) else 0)


def _bug(exc: BaseException) -> None:
    """Print the traceback of an error that may be a bug, its messages PII-masked (`mask_message`), and exit 1.
    Why: a library's message quotes the data it choked on (a tokenizer's text, a KeyError's address), and a
    traceback is what users paste into a bug report or a CI log. Frames (paths and source lines) are code."""
    import traceback

    from leakaudit.data.pii_mask import mask_message

    parts = traceback.format_exception(exc)
    text = "".join(p if p.startswith("  File ") else "".join(mask_message(line) for line in p.splitlines(True))
                   for p in parts)
    sys.stderr.write(text)
    sys.exit(1)


#: how libraries that are not Python's file API say the disk is full, by their exception type's name:
#: safetensors ("No space left on device (os error 28)"), sqlite (the score cache: "database or disk is full")
FULL_DISK = {"SafetensorError": ("No space left on device", "os error 28"),
             "OperationalError": ("database or disk is full",)}


def _full_disk(exc: BaseException) -> bool:
    """A full disk reported by a library as its own exception type (a traceback of 78 lines, where Python's
    own OSError ENOSPC gets one). Only those types and messages: another error that quotes the words keeps its
    traceback."""
    return any(text in str(exc) for text in FULL_DISK.get(type(exc).__name__, ()))


def _repeated_option(args: list[str]) -> str | None:
    """The first option that takes one value given twice (refused: click keeps the last silently, and `--attacks
    loss --attacks zlib` ran zlib alone; `backdoor detect --model` is repeatable, so the habit comes from there)."""
    command = typer.main.get_command(app)
    rest = list(args)
    while hasattr(command, "commands"):  # a group: on to the subcommand the arguments name
        word = next((w for w in rest if not w.startswith("-")), None)
        if word is None or word not in command.commands:
            return None  # click says what is wrong
        rest = rest[rest.index(word) + 1:]
        command = command.commands[word]
    options = {name: p for p in command.params if getattr(p, "param_type_name", "") == "option"
               for name in (*p.opts, *p.secondary_opts)}
    if any(arg in ("-h", "--help") for arg in rest):
        return None  # the help, whatever else is given
    seen: dict[str, int] = {}
    value_next = False
    for arg in rest:
        if value_next or arg == "--":  # an option's value (`--id-field --out` names a field "--out"), or the end
            if arg == "--":
                break
            value_next = False
            continue
        param = options.get(arg.split("=", 1)[0])
        if param is None or param.is_flag or param.count:
            continue
        value_next = "=" not in arg
        if param.multiple:
            continue
        seen[param.name] = seen.get(param.name, 0) + 1
        if seen[param.name] == 2:
            return param.opts[0]
    return None


def _home_in_value(arg: str) -> str:
    """`--out=~/runs/x` as the shell reads `--out ~/runs/x`: bash and zsh expand `~` only at a word's start, and
    the path given was a folder named `~` in the working directory (a later `rm -rf ~` removes the home)."""
    option, eq, value = arg.partition("=")
    if arg.startswith("--") and eq and (value == "~" or value.startswith("~/")):
        return f"{option}={os.path.expanduser(value)}"
    return arg


def _usage_line(exc) -> str:
    """`option '--x': message` for a bad value, click's own sentence for the rest; always one line."""
    param = getattr(exc, "param", None)
    if exc.__class__.__name__ == "BadParameter" and param is not None:
        kind = "option" if getattr(param, "param_type_name", "") == "option" else "argument"
        name = param.opts[0] if kind == "option" and param.opts else (param.human_readable_name or param.name)
        text = f"{kind} '{name}': {exc.message}"
    else:
        text = exc.format_message()
    return " ".join(text.split())


def _fail(message: str) -> None:
    """Print the one error line, PII masked (`mask_message`): messages quote bad values, often real PII (a
    label, an id, a user); the file, line and field say where to look."""
    from leakaudit.data.pii_mask import mask_message

    _say(f"error: {mask_message(message)}")
    sys.exit(2)


#: how long a launched process other than rank 0 waits before it prints its error: long enough for the
#: launcher to stop it when rank 0 failed too (torchrun stops the others within a second of one failing)
ECHO_GRACE_S = 3.0


def _say(line: str) -> None:
    """Print an error line. Under a launcher every process meets the same bad file or input, and each printed
    it: a process other than rank 0 waits ECHO_GRACE_S first (stopped by then when rank 0 failed as well) and
    names its rank, so an error only it met (a file it cannot see) is still shown."""
    from leakaudit.distributed import world

    try:
        rank, size = world()
    except InputError:  # the error being said may be that RANK is no number
        rank, size = 0, 1
    if size > 1 and rank != 0:
        import time

        if threading.current_thread() is threading.main_thread():
            # stopped by the launcher while waiting: end quietly. SIGTERM raised Terminated inside the handler
            # of the error, and the chained traceback printed the unmasked message rank 0 had masked
            signal.signal(signal.SIGTERM, lambda *_: os._exit(TERMINATED))
        time.sleep(ECHO_GRACE_S)
        line = f"[rank {rank}] {line}"
    print(line, file=sys.stderr)
