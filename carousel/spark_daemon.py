"""The Python worker daemon for local Spark: PySpark's own daemon, without a per-task zip re-read.

Role: Spark starts one daemon per executor (``python -m <spark.python.daemon.module>``) and forks
the Python workers (``mapInArrow``, UDFs, ``foreachBatch`` helpers' tasks) from it.
:func:`carousel.session.build_session` names this module for ``local`` masters, where the daemon
runs this project's interpreter; on a cluster set ``spark.conf."spark.python.daemon.module"`` to it
only when ``carousel`` is installed in the executors' Python.

Why: at every task PySpark's worker calls ``importlib.invalidate_caches()`` (so that files added
with ``addPyFile`` become importable). Under Python 3.11 that makes every ``zipimporter`` re-read
its archive's whole directory: ``pyspark.zip``, the py4j zip and the shipped code zip, once per
package path imported from them. Measured on this machine (2 cores): about 150 ms per Python task,
which is most of a serving micro-batch's fixed cost (bench/README.md "Serving"). Python 3.12
re-reads lazily (CPython gh-103200). Here an archive is re-read only when its size or
modification time changed since it was last read, so a zip replaced in place still loads anew.

Inputs / outputs: none of its own; Spark runs it with the worker module as its one argument.
"""

from __future__ import annotations

import gc
import os
import zipimport
from collections.abc import Callable

_reread: Callable[[zipimport.zipimporter], None] = zipimport.zipimporter.invalidate_caches
_read_stamps: dict[str, tuple[int, int] | None] = {}


def _stamp(archive: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(archive)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


def invalidate_unless_unchanged(importer: zipimport.zipimporter) -> None:
    """``zipimporter.invalidate_caches``, skipped while the archive is the one last read."""
    stamp = _stamp(importer.archive)
    cache = zipimport._zip_directory_cache  # type: ignore[attr-defined]  # CPython's shared cache
    if stamp is not None and _read_stamps.get(importer.archive) == stamp and importer.archive in cache:
        importer._files = cache[importer.archive]  # type: ignore[attr-defined]
        return
    _reread(importer)
    _read_stamps[importer.archive] = stamp


def install() -> None:
    """Patch ``zipimporter.invalidate_caches`` in this process (and the workers it forks)."""
    zipimport.zipimporter.invalidate_caches = invalidate_unless_unchanged  # type: ignore[method-assign]


def remember_read_archives() -> None:
    """Stamp the archives this process has read so far, so that forked workers skip them too."""
    for archive in list(zipimport._zip_directory_cache):  # type: ignore[attr-defined]
        _read_stamps.setdefault(archive, _stamp(archive))


def freeze_imports() -> None:
    """Move what this process holds now out of the garbage collector's generations.

    PySpark's daemon calls ``gc.collect()`` in a worker after every task; a full collection visits
    every tracked object, and the modules a worker imports are hundreds of thousands of them:
    about 20 ms a task here, paid before the worker can take the next task. Objects frozen in the
    daemon stay frozen in the workers it forks (and are not copied on write by collections).
    """
    gc.collect()
    gc.freeze()


if __name__ == "__main__":
    install()
    # Imported here, after the patch: pyspark.daemon reads its worker module from sys.argv.
    from pyspark.daemon import manager

    remember_read_archives()
    # Every module loaded so far (PySpark's worker, pyarrow, ...) into the permanent generation,
    # before any worker is forked: the daemon runs a full gc.collect() after each task, and
    # without this each of those collections visits them all again (freeze_imports says more).
    freeze_imports()
    manager()
