"""What the ``questdiff`` commands share: a parser that shows every default, adds a command's options only when
that command runs (so ``questdiff --help`` imports nothing heavy) and reports a bad option in one line; option
types that refuse bad values while parsing; and ``run_command``, which turns every failure into one line
``questdiff <command>: error: ...`` (exit code 2 for bad input, 1 for anything else, 130 for Ctrl-C).

Nothing here imports torch or diffusers at module level.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

from .folders import Kind, checkpoint_kinds, describe, other_kind

logger = logging.getLogger("questdiff")

USAGE_ERROR, FAILURE, INTERRUPTED = 2, 1, 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to every option; an option whose default is ``None`` says in its own help what
    it falls back to (``default: the pipeline's``), so it is not shown as ``None``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose options are added by ``add_arguments(parser)`` on first use (parsing or help),
    and whose errors are one line ``<prog>: error: <message>`` (exit code 2), without the usage block."""

    def __init__(self, *args: Any, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def _populate(self) -> None:
        if self._add_arguments is not None:
            add, self._add_arguments = self._add_arguments, None
            add(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        self._populate()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._populate()
        return super().format_help()

    def format_usage(self) -> str:
        self._populate()
        return super().format_usage()

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- option types: argparse reports "argument --name: <message>" --------------------------------------------------
def _number(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def alpha_or_off(text: str) -> float | str:
    """``--smooth``: a number (checked by ``ActivationSpec``) or ``off``."""
    if text.strip().lower() == "off":
        return "off"
    return _number(text, float)


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def folder(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string (use . for the current folder)")
    return text


def add_nproc_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--nproc`` option of a command that can run on several processes (``questdiff.launch`` starts them)."""
    parser.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                        help="run on N processes (one per GPU; gloo on CPU) started by torchrun; ignored under torchrun "
                             "(default: one process)")


# -- quantized checkpoints given as --quantized ----------------------------------------------------------------------
def _missing_key(path: str, err: KeyError) -> ValueError:
    from .checkpoint import CONFIG_NAME

    return ValueError(f"--quantized {path}: {CONFIG_NAME} has no {err} entry (edited by hand or written by another "
                      "questdiff version); quantize the model again")


def quantized_metadata(path: str) -> tuple[dict[str, Any], bool]:
    """``(json, deployed)`` of the checkpoint in ``--quantized`` (a fake-quant folder from ``questdiff quantize`` or
    a deployed one from ``questdiff convert``), read before any model loads; raises a one-line ``ValueError``."""
    from .checkpoint import read_metadata
    from .deploy.checkpoint import read_deployed_metadata

    kinds = checkpoint_kinds(path)
    if len(kinds) > 1:
        raise ValueError(f"--quantized {path}: holds both a fake-quant and a deployed checkpoint (a folder mixed by an "
                         "older questdiff), so which one is current is unknown; move deployed.safetensors and "
                         "questdiff-deployed.json into a folder of their own and pass the one you mean")
    deployed = kinds == ["deployed"]
    try:
        return (read_deployed_metadata(path, verify=False) if deployed else read_metadata(path)), deployed
    except (ValueError, OSError) as err:
        raise ValueError(f"--quantized {path}: {err}") from None


def checkpoint_label(path: str) -> str:
    """The preset name of the checkpoint in ``--quantized`` (``"W4A4"``, ``"W4A4 deployed"``): read before any
    model loads, so a wrong folder fails first."""
    meta, deployed = quantized_metadata(path)
    try:
        return (meta["quant_config"].get("name") or "quantized") + (" deployed" if deployed else "")
    except KeyError as err:
        raise _missing_key(path, err) from None


def load_quantized(path: str, base: Any) -> Any:
    """The denoiser in ``--quantized``: ``questdiff.load(path, base)`` for a fake-quant folder, or
    ``questdiff.load_deployed`` (on ``base``'s device; ``base``'s weights unused) for a deployed one. A checkpoint
    made from another model than ``base`` (the ``--model`` pipeline's denoiser) is refused naming ``--model``,
    and a malformed json is a one-line ``ValueError``."""
    from . import load
    from .deploy import load_deployed
    from .prepare import fingerprint

    meta, deployed = quantized_metadata(path)
    try:
        found = fingerprint(base)
        if meta["base_fingerprint"] != found:
            raise ValueError(f"--model: {path} was quantized from another model (base fingerprint "
                             f"{meta['base_fingerprint']}) than this pipeline's {type(base).__name__} ({found}); pass "
                             "the --model it was quantized from (questdiff quantize's --model; default: the embedded "
                             "zoo model)")
        if deployed:
            return load_deployed(path, device=next(base.parameters()).device)
        return load(path, base=base)
    except KeyError as err:
        raise _missing_key(path, err) from None


def check_out_kind(out: str | Path, kind: Kind, option: str = "--out") -> None:
    """Refuse an output folder that holds another kind of checkpoint than the ``kind`` the command writes there
    (a folder holds one kind: a reader could not tell which model is current)."""
    other = other_kind(out, kind)
    if other is not None:
        raise ValueError(f"{option} {out}: holds {describe(other)}; a folder holds one kind of checkpoint: choose "
                         f"another {option}")


def command_line(*words: str) -> str:
    """``words`` as one shell command line, each quoted where the shell needs it (paths with spaces)."""
    return shlex.join(words)


def table(rows: list[tuple[str, Any]]) -> str:
    """Aligned ``key  value`` lines of a command's summary."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# -- running a command ---------------------------------------------------------------------------------------------
class Interrupted(Exception):
    """Raised by a command to replace the generic Ctrl-C message with one that says what was kept."""


def _describe(err: BaseException) -> tuple[str, int]:
    """One line and the exit code for an exception that ended a command."""
    from safetensors import SafetensorError

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    full = isinstance(err, OSError) and err.errno == errno.ENOSPC
    if isinstance(err, SafetensorError):
        full = full or "No space left" in text or "StorageFull" in text
        if not full:
            return f"could not read or write a safetensors file ({text})", USAGE_ERROR
    if full:
        where = f" while writing {err.filename}" if isinstance(err, OSError) and err.filename else ""
        return f"the disk is full{where}; free some space or choose another --out folder", USAGE_ERROR
    if isinstance(err, (ValueError, OSError, ImportError)):
        return text, USAGE_ERROR
    return f"{type(err).__name__}: {text} (run with -v for the traceback)", FAILURE


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Raise ``KeyboardInterrupt`` on SIGTERM inside the block (main thread only), so a killed command runs the same
    clean-up as Ctrl-C instead of leaving a half-written ``--out`` behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(prog: str, command: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                verbose: bool = False) -> int:
    """``command(args)`` with every failure reported as one line ``<prog>: error: ...`` on stderr.

    Exit codes: 2 for bad input and environment (``ValueError``, ``OSError``, ``ImportError``, a full disk), 1 for
    anything else (with ``verbose`` its traceback is raised instead), 130 for Ctrl-C or a SIGTERM (``timeout``, a
    job scheduler), which are handled alike: the command cleans up and says what it kept."""
    try:
        with _sigterm_as_interrupt():
            return command(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Interrupted as note:
        print(f"{prog}: interrupted: {note}", file=sys.stderr)
        return INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the command line reports every failure in one line
        message, code = _describe(err)
        if verbose and code == FAILURE:
            raise
        logger.debug("%s failed", prog, exc_info=True)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code
