"""Fault injection for the kill tests: SIGKILL the whole job at a named point, set by the environment.

Role: the kill tests (``tests/test_*_recovery.py``, the campaign and serve kill tests) start a real
``./spark-submit.sh`` job with an environment variable naming a point in the job; when the job
reaches it, :func:`kill_job` SIGKILLs its process group (the driver's Python, the SparkSubmit JVM
and its Python workers), exactly as a lost machine would, at the worst moment rather than at a
timed guess. Without the variable nothing happens. Inputs: the variable's name and the point's
value; output: none (the process is gone).
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


def injected(env_name: str, point: object) -> bool:
    """Whether the environment variable ``env_name`` names ``point`` (compared as text)."""
    target = os.environ.get(env_name)
    return target is not None and target.strip() == str(point)


def kill_job(reason: str) -> None:
    """SIGKILL this job's whole process group, after flushing the log line that says why."""
    log.warning("fault injection: killing the job %s", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.killpg(os.getpgid(0), signal.SIGKILL)
