"""The one error type a job reports as a clean failure: one line, no traceback.

Role: jobs and the modules they call raise :class:`JobError` (or a subclass: ``CampaignError``,
``ServingInputError``, ``TemplateCheckError``, ``PublishRefusedError``, ...) when they cannot do
what was asked because of their input: a missing table, a bad date, an unknown version, a file that
does not parse. The message names the input and the reason. The job dispatcher
(:func:`carousel.cli.main`, what ``./spark-submit.sh <job>`` runs) catches it, logs it as one ERROR
line and exits with :attr:`JobError.exit_status` (1). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re


class JobError(RuntimeError):
    """A job cannot go on; the message names the input and the reason."""

    exit_status = 1


def one_line(err: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined with ``; ``)."""
    lines = [line.strip().removeprefix("- ").strip() for line in str(err).splitlines()]
    text = "; ".join(line for line in lines if line)
    return text.replace(":;", ":") or type(err).__name__


_ERROR_CLASS = re.compile(r"\[[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*\][^\n]*")


def _cause_messages(err: BaseException) -> list[str]:
    """The messages of ``err`` and of its causes, outermost first: a PySpark error's converted JVM
    causes (``_cause``, PySpark's own chain) or a Py4J error's Java exception chain."""
    messages: list[str] = []
    current: object | None = err
    while current is not None and len(messages) < 32:
        java = getattr(current, "java_exception", None)  # py4j.protocol.Py4JJavaError
        if java is not None:
            while java is not None and len(messages) < 32:
                messages.append(str(java.getMessage() or ""))
                java = java.getCause()
            break
        messages.append(str(getattr(current, "_desc", None) or current))
        current = getattr(current, "_cause", None) or getattr(current, "__cause__", None)
    return messages


def spark_reason(err: BaseException, limit: int = 400) -> str:
    """The telling line of a Spark error: the innermost ``[ERROR_CLASS] message`` of its cause
    chain (a failed read wraps the malformed record that failed it), first sentence only; else its
    first non-empty line."""
    found = [match.group(0) for text in _cause_messages(err) if (match := _ERROR_CLASS.search(text))]
    if found:
        line = found[-1].split(" SQLSTATE:")[0].split(". ")[0].strip().rstrip(".")
    else:
        line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return _clipped(line, limit)


_PYTHON_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b: ")


def telling_line(text: str, limit: int = 500) -> str:
    """The telling line of a failure's text: a Python handler's exception line (the last ``Class:
    message`` after a traceback, as a streaming query's failure quotes its Python worker's), else
    the first non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    raised = [line for line in lines if _PYTHON_ERROR_LINE.match(line)]
    return _clipped(raised[-1] if raised else lines[0] if lines else "unknown error", limit)


def java_reason(err: BaseException, limit: int = 400) -> str:
    """A Py4J error's Java exception as ``Class: message`` (its first line: the failed path and the
    reason, without the Java stack), else the telling line of its text."""
    java = getattr(err, "java_exception", None)  # py4j.protocol.Py4JJavaError
    if java is None:
        return telling_line(str(err), limit)
    lines = str(java.toString()).strip().splitlines()
    return _clipped(lines[0].strip() if lines else type(err).__name__, limit)


def _clipped(line: str, limit: int) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."
