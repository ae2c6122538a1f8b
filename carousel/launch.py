"""What ``./spark-submit.sh`` settles before it calls spark-submit: the job's launcher, the session
settings from config, the code zip, and, in cluster deploy mode, what must travel with the driver.

Role: ``python -m carousel.cli --launch-info [--code-dir DIR] [spark-submit options] <job> [job args]``
prints shell assignments that spark-submit.sh evaluates (``CAROUSEL_SPARK_ARG_COUNT``, how many of
the words are spark-submit options, read as spark-submit reads them; ``CAROUSEL_JOB_KIND``, the
master, driver memory, jars, ``CAROUSEL_JOB_ARGS``, the job's arguments as a bash array,
``CAROUSEL_CODE_ZIP``, ``CAROUSEL_DEPLOY_MODE`` and ``CAROUSEL_SPARK_HOME``).
For a Spark job it also writes the code zip (``--py-files``): the project's packages and its
``conf/`` folder (defaults, templates, payload schemas), so the code on any node finds its
configuration (:func:`carousel.config._unpacked_home`).

In ``--deploy-mode cluster`` the driver starts on a cluster node, without this machine's files:
the ``--config`` files given, and a templates or payload-schema folder configured outside
``conf/``, go into the zip under ``conf/submitted/`` and the job's arguments are rewritten to
read them there. What cannot travel safely is named (never its value) on stderr: ``CAROUSEL__*``
settings and secrets in this machine's environment (give them to the driver through the
cluster manager: ``spark.yarn.appMasterEnv.NAME``, ``spark.kubernetes.driverEnv.NAME`` or its
secrets), a storage root on a local disk, and job arguments naming paths on a local disk
(:func:`local_path_arguments`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import os
import re
import shlex
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from carousel.cli import JOBS, add_config_args
from carousel.config import (
    ENV_PREFIX,
    KAFKA_SECRET_ENV,
    PROJECT_ROOT,
    REDIS_PASSWORD_ENV,
    REDIS_USERNAME_ENV,
    CarouselConfig,
    ConfigError,
    config_file_path,
    load_config,
    on_local_disk,
)

# The project's Python packages, shipped to the executors (and a cluster-mode driver).
CODE_PACKAGES = ("carousel", "jobs", "streaming", "models")
# Where cluster deploy mode puts the files it ships from this machine, under the project root.
SUBMITTED = "conf/submitted"
DEPLOY_MODES = ("client", "cluster")
_DEPLOY_MODE_KEY = "spark.submit.deployMode"
# spark-submit's options, as its parser (org.apache.spark.launcher.SparkSubmitOptionParser, Spark
# 4.1) declares them: those that take a value (the next word, or after '=' in --name=value) and
# the switches. The first word that is neither is the application: here, the job's name.
SPARK_SUBMIT_OPTIONS_WITH_VALUE = frozenset(
    """--archives --class --conf -c --deploy-mode --driver-class-path --driver-cores
    --driver-default-class-path --driver-java-options --driver-library-path --driver-memory
    --executor-cores --executor-memory --files --jars --keytab --kill --master --remote --name
    --num-executors --packages --exclude-packages --principal --properties-file --proxy-user
    --py-files --queue --repositories --status --total-executor-cores""".split()
)
SPARK_SUBMIT_SWITCHES = frozenset(
    "--help -h --supervise --usage-error --verbose -v --version --load-spark-defaults".split()
)
_INLINE_VALUE = re.compile(r"(--[^=]+)=(.+)")
# spark-submit's actions that submit nothing (the wrapper always submits a job).
_NOT_A_SUBMISSION = ("--kill", "--status", "--version", "--usage-error")
CODE_ZIP_PREFIX = "carousel-code-"
# dist/ keeps the newest zips and any used within a week (see write_code_zip).
KEEP_ZIPS = 20
STALE_ZIP_S = 7 * 86_400.0
_SECRET_ENV = (*KAFKA_SECRET_ENV.values(), REDIS_PASSWORD_ENV, REDIS_USERNAME_ENV)


@dataclass(frozen=True)
class ClusterLaunch:
    """A job's arguments as a cluster-mode driver gets them, the files shipped for them (name in
    the zip -> file here), and warnings about what stays behind."""

    args: list[str]
    shipped: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def code_zip_members(root: Path, shipped: Mapping[str, Path] | None = None) -> dict[str, Path]:
    """Name in the zip -> file: every ``*.py`` of :data:`CODE_PACKAGES`, every file under ``conf/``
    (but an earlier launch's ``conf/submitted``), then ``shipped``."""
    members: dict[str, Path] = {}
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            members[path.relative_to(root).as_posix()] = path
    for path in sorted((root / "conf").rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_file() and not name.startswith(f"{SUBMITTED}/"):
            members[name] = path
    members.update(shipped or {})
    return members


def write_code_zip(folder: Path, members: Mapping[str, Path]) -> Path:
    """The zip of ``members`` in ``folder``, named by their content: launches with different code
    or submitted files (two cluster-mode jobs started together) never ship each other's zip, and
    one is never replaced while a job reads it. Written whole, under a temporary name first
    (readable by all, as the zip before it was), and touched when reused.

    The newest :data:`KEEP_ZIPS` zips are kept, and any used within :data:`STALE_ZIP_S`: a job
    whose executors fetch ``--py-files`` from the driver (client mode on a cluster) must not run
    longer than that while :data:`KEEP_ZIPS` other launches with other code happen."""
    digest = hashlib.sha256()
    for name, path in members.items():
        digest.update(f"{name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\0".encode())
    target = folder / f"{CODE_ZIP_PREFIX}{digest.hexdigest()[:16]}.zip"
    folder.mkdir(parents=True, exist_ok=True)
    if target.exists():
        os.utime(target)
    else:
        descriptor, staging = tempfile.mkstemp(prefix=f"{CODE_ZIP_PREFIX}staging-", suffix=".tmp", dir=folder)
        try:
            os.fchmod(descriptor, 0o644)
            with (
                os.fdopen(descriptor, "wb") as out,
                zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as bundle,
            ):
                for name, path in members.items():
                    bundle.write(path, name)
            Path(staging).replace(target)
        finally:
            Path(staging).unlink(missing_ok=True)
    _prune_zips(folder, target)
    return target


def _prune_zips(folder: Path, current: Path) -> None:
    """Remove the zips (and staging files a killed launch left) beyond the newest :data:`KEEP_ZIPS`
    that were not used within :data:`STALE_ZIP_S`."""
    found = []
    for path in folder.glob(f"{CODE_ZIP_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):  # another launch removed it first
            found.append((path.stat().st_mtime, path))
    stale = time.time() - STALE_ZIP_S
    for mtime, path in sorted(found, reverse=True)[KEEP_ZIPS:]:
        if path != current and mtime < stale:
            path.unlink(missing_ok=True)


def _folder_members(folder: Path, under: str) -> dict[str, Path]:
    return {
        f"{under}/{path.relative_to(folder).as_posix()}": path
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def cluster_launch(
    argv: Sequence[str], cfg: CarouselConfig, environ: Mapping[str, str], root: Path = PROJECT_ROOT
) -> ClusterLaunch:
    """The job arguments ``argv`` (job name first) rewritten for a driver on a cluster node: each
    ``--config FILE`` shipped as ``conf/submitted/<n>-<name>``, and a templates or payload-schema
    folder outside ``root/conf`` shipped and set with ``--set``; warnings name what stays here."""
    # The job's own options stay as given (argparse keeps their order); the configuration flags,
    # however spelt (argparse takes "--conf" for "--config"), are read the way the job reads them
    # and given again: files then --set values, the order load_config applies them in anyway.
    known, others = _config_parser().parse_known_args(list(argv[1:]))
    shipped: dict[str, Path] = {}
    flags: list[str] = []
    for file in known.config:
        name = f"{SUBMITTED}/{len(shipped) + 1}-{Path(file).name}"
        shipped[name] = config_file_path(file).resolve()
        flags += ["--config", name]
    flags += [arg for item in known.overrides for arg in ("--set", item)]
    conf_dir = (root / "conf").resolve()
    for key, value, under in (
        ("serving.templates_dir", cfg.serving.templates_dir, f"{SUBMITTED}/templates"),
        ("serving.payload_schemas_dir", cfg.serving.payload_schemas_dir, f"{SUBMITTED}/payload_schemas"),
    ):
        folder = Path(value).resolve()
        if folder.is_relative_to(conf_dir):
            continue
        if "://" in value or not folder.is_dir():
            raise ConfigError(f"{key} {value} is not a folder on this machine: cluster deploy mode ships it")
        shipped.update(_folder_members(folder, under))
        flags += ["--set", f"{key}={under}"]
    # Before a "--", after which the job would read them as positional values.
    cut = others.index("--") if "--" in others else len(others)
    args = [argv[0], *others[:cut], *flags, *others[cut:]]
    warnings = []
    left = sorted(k for k in environ if (k.startswith(ENV_PREFIX) or k in _SECRET_ENV) and environ[k])
    if left:
        warnings.append(
            "cluster deploy mode: these settings in this machine's environment do not reach the "
            f"driver: {', '.join(left)}; give them to it through the cluster manager "
            "(spark.yarn.appMasterEnv.NAME, spark.kubernetes.driverEnv.NAME or its secrets)"
        )
    if on_local_disk(cfg.storage.root):
        warnings.append(
            f"cluster deploy mode: storage.root {cfg.storage.root} is a local path, read on the node "
            "the driver lands on; use a shared store (s3a://, hdfs://, abfss://) or a mount every node has"
        )
    local = local_path_arguments(others)
    if local:
        warnings.append(
            f"cluster deploy mode: {', '.join(local)} {'is a path' if len(local) == 1 else 'are paths'} on "
            "this machine's disk, not shipped: the driver (on a cluster node) and the executors read "
            "and write their own disks there; give a shared location (s3a://, hdfs://, abfss://) or a "
            "mount every node has"
        )
    return ClusterLaunch(args, shipped, warnings)


# The jobs' options naming a file or folder they read or write (upload-catalog's file is positional).
PATH_OPTIONS = frozenset({"--input", "--output", "--file", "--snapshots"})


def local_path_arguments(job_args: Sequence[str]) -> list[str]:
    """The job's arguments (configuration flags taken out) naming a path on a local disk: the value
    of a :data:`PATH_OPTIONS` option (or an abbreviation argparse takes for it) without a shared
    ``scheme://`` (``file:`` is local), and any other word that is a file or folder on this machine
    (a catalog file given to upload-catalog). Shown as given."""
    found: list[str] = []
    words = list(job_args)
    takes_next = False  # the word before was a path option without its value
    for n, word in enumerate(words):
        if takes_next:
            takes_next = False
            continue
        option, inline, value = word.partition("=")
        if _path_option(option):
            if not inline:
                value = words[n + 1] if n + 1 < len(words) else ""
                takes_next = True
            if value and on_local_disk(value):
                found.append(f"{option} {value}")
        elif not word.startswith("-") and on_local_disk(word) and Path(word).exists():
            found.append(word)
    return found


def _path_option(option: str) -> bool:
    """Whether ``option`` is one of :data:`PATH_OPTIONS` or a prefix argparse would expand to one."""
    return option.startswith("--") and len(option) > 3 and any(p.startswith(option) for p in PATH_OPTIONS)


# Spark jobs that need no Spark when storage.root is on a local disk (client deploy mode): run as
# plain Python there, their spark-submit options unused.
_PYTHON_ON_A_LOCAL_ROOT = frozenset({"stop"})


def _config_parser() -> argparse.ArgumentParser:
    return add_config_args(argparse.ArgumentParser(add_help=False))


def _assignments(cfg: CarouselConfig, args: Sequence[str], code_zip: Path | None) -> list[str]:
    from carousel.session import spark_jars  # imported late: pyspark is slow to import

    return [
        "CAROUSEL_JOB_KIND=spark",
        f"CAROUSEL_MASTER={shlex.quote(cfg.spark.master)}",
        f"CAROUSEL_DRIVER_MEMORY={shlex.quote(cfg.spark.driver_memory)}",
        f"CAROUSEL_JARS={shlex.quote(','.join(spark_jars(cfg)))}",
        f"CAROUSEL_JOB_ARGS=({' '.join(shlex.quote(a) for a in args)})",
        f"CAROUSEL_CODE_ZIP={shlex.quote(str(code_zip or ''))}",
    ]


def java_properties(text: str) -> dict[str, str]:
    """A Java properties file's entries, as spark-submit reads ``--properties-file`` and
    ``spark-defaults.conf`` (``java.util.Properties.load``): ``#``/``!`` comments, ``key=value``,
    ``key: value`` or ``key value``, a line ending in an odd number of backslashes continued on the
    next, the escapes (``\\t``, ``\\uXXXX``, ``\\=``...) read; values trimmed, as Spark trims them."""
    entries: dict[str, str] = {}
    lines = iter(re.split(r"\r\n|\r|\n", text))
    for raw in lines:
        line = raw.lstrip(_PROPERTY_BLANKS)
        if not line or line[0] in "#!":
            continue
        while (len(line) - len(line.rstrip("\\"))) % 2:  # an odd number of backslashes: continued
            line = line[:-1] + next(lines, "").lstrip(_PROPERTY_BLANKS)
        end, escaped = len(line), False
        for position, char in enumerate(line):
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char in "=:" or char in _PROPERTY_BLANKS:
                end = position
                break
        value = line[end:].lstrip(_PROPERTY_BLANKS)
        if value[:1] in ("=", ":"):
            value = value[1:]
        entries[_unescape(line[:end])] = _unescape(value.lstrip(_PROPERTY_BLANKS)).strip()
    return entries


_PROPERTY_BLANKS = " \t\f"
_PROPERTY_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape(text: str) -> str:
    return re.sub(
        r"\\(u[0-9a-fA-F]{4}|.)",
        lambda m: chr(int(m[1][1:], 16)) if len(m[1]) == 5 else _PROPERTY_ESCAPES.get(m[1], m[1]),
        text,
    )


def spark_home(environ: Mapping[str, str]) -> Path:
    """The Spark that spark-submit runs: ``SPARK_HOME``, else this interpreter's pyspark (what
    pyspark's find-spark-home would find, were it run with this interpreter: it runs
    ``PYSPARK_DRIVER_PYTHON`` or ``python3``, which may not have pyspark)."""
    if environ.get("SPARK_HOME"):
        return Path(environ["SPARK_HOME"])
    found = importlib.util.find_spec("pyspark")
    if found is None or found.origin is None:
        raise ConfigError("pyspark is not installed for this interpreter: run 'make setup'")
    package = Path(found.origin).parent
    # A Spark that pyspark's install downloaded (PYSPARK_HADOOP_VERSION) comes first, as there.
    downloaded = package / "spark-distribution"
    return downloaded if downloaded.is_dir() else package


def spark_defaults_file(environ: Mapping[str, str]) -> Path | None:
    """The ``spark-defaults.conf`` spark-submit reads: under ``SPARK_CONF_DIR``, else under
    :func:`spark_home`'s ``conf/``; None when there is none."""
    conf_dir = environ.get("SPARK_CONF_DIR")
    path = (Path(conf_dir) if conf_dir else spark_home(environ) / "conf") / "spark-defaults.conf"
    return path if path.is_file() else None


def submit_options(words: Sequence[str]) -> tuple[list[tuple[str, str | None]], int]:
    """The spark-submit options at the head of ``words``, as spark-submit's parser reads them:
    (name, value) pairs, the value None for a switch, and how many words they take; they end at
    the first word that is not an option (the job). An unknown option, or one missing its value,
    raises :class:`ConfigError` (spark-submit would refuse it too)."""
    options: list[tuple[str, str | None]] = []
    rest = list(words)
    while rest and rest[0].startswith("-"):
        word = rest.pop(0)
        inline = _INLINE_VALUE.fullmatch(word)  # spark-submit's own pattern, on every option
        name, value = (inline.group(1), inline.group(2)) if inline else (word, None)
        if name in SPARK_SUBMIT_OPTIONS_WITH_VALUE:
            if value is None:
                if not rest:
                    raise ConfigError(f"spark-submit option {name} needs a value")
                value = rest.pop(0)
            options.append((name, value))
        elif name in SPARK_SUBMIT_SWITCHES:
            options.append((name, None))  # a value given to a switch is ignored, as spark-submit does
        else:
            raise ConfigError(f"unknown spark-submit option {name!r} (see ./spark-submit.sh --help)")
    return options, len(words) - len(rest)


def submitted_deploy_mode(spark_args: Sequence[str], environ: Mapping[str, str]) -> str:
    """The deploy mode spark-submit will use for these options (the ones before the job), by its
    own precedence: ``--deploy-mode``; else ``spark.submit.deployMode`` from ``--conf`` (the last),
    then from ``--properties-file``, then from ``spark-defaults.conf`` (read only without a
    properties file, or with ``--load-spark-defaults``); else ``DEPLOY_MODE``; else client.
    A value that is not client or cluster raises :class:`ConfigError` naming where it came from."""
    flag, conf, properties_file, load_defaults = None, None, None, False
    for name, value in submit_options(spark_args)[0]:
        if name == "--load-spark-defaults":
            load_defaults = True
        if value is None:
            continue
        if name == "--deploy-mode":
            flag = value
        elif name == "--properties-file":
            properties_file = value
        elif name in ("--conf", "-c"):
            key, _, setting = value.partition("=")
            if key == _DEPLOY_MODE_KEY:  # as spark-submit splits it: nothing trimmed
                conf = setting
    found: list[tuple[str | None, str]] = [
        (flag, "--deploy-mode"),
        (conf, f"--conf {_DEPLOY_MODE_KEY}"),
    ]
    files = [Path(properties_file)] if properties_file else []
    if not properties_file or load_defaults:
        defaults = spark_defaults_file(environ)
        files += [defaults] if defaults else []
    for path in files:
        try:
            entries = java_properties(path.read_text(encoding="utf-8", errors="replace"))
        except OSError as err:
            raise ConfigError(f"cannot read the Spark properties file {path}: {err.strerror}") from None
        found.append((entries.get(_DEPLOY_MODE_KEY), f"{_DEPLOY_MODE_KEY} in {path}"))
    found.append((environ.get("DEPLOY_MODE"), "DEPLOY_MODE in the environment"))
    for value, where in found:
        if value is not None:
            if value not in DEPLOY_MODES:
                raise ConfigError(f"{where} must be one of {list(DEPLOY_MODES)}, got {value!r}")
            return value
    return "client"


def launch_info(argv: Sequence[str], environ: Mapping[str, str], root: Path = PROJECT_ROOT) -> str:
    """Shell assignments for spark-submit.sh. ``argv``: ``[--code-dir DIR] [spark-submit options]
    <job> [job args]``, the words as typed: how many are spark-submit options
    (``CAROUSEL_SPARK_ARG_COUNT``, :func:`submit_options`), whether they name a master, the kind of
    job (help, unknown, python or spark) and, for a Spark job, its launch in the deploy mode the
    options give (:func:`submitted_deploy_mode`), with the code zip written to ``DIR``; a bad option
    or configuration raises :class:`ConfigError`."""
    rest, code_dir = list(argv), None
    if len(rest) >= 2 and rest[0] == "--code-dir":  # the wrapper's own, once: a user's is refused
        code_dir = Path(rest[1])
        rest = rest[2:]
    options, count = submit_options(rest)
    action = next((name for name, _ in options if name in _NOT_A_SUBMISSION), None)
    if action is not None:
        raise ConfigError(
            f"spark-submit's {action} submits no job: run {spark_home(environ) / 'bin' / 'spark-submit'} "
            f"{action} ... itself"
        )
    spark_args, rest = rest[:count], rest[count:]
    head = [
        f"CAROUSEL_SPARK_ARG_COUNT={count}",
        f"CAROUSEL_MASTER_GIVEN={int(any(name == '--master' for name, _ in options))}",
    ]
    if not rest or rest[0] == "help" or any(name in ("--help", "-h") for name, _ in options):
        return "\n".join([*head, "CAROUSEL_JOB_KIND=help"])
    if rest[0] not in JOBS:
        return "\n".join([*head, "CAROUSEL_JOB_KIND=unknown"])
    if not JOBS[rest[0]].spark:
        return "\n".join([*head, "CAROUSEL_JOB_KIND=python"])
    deploy_mode = submitted_deploy_mode(spark_args, environ)
    known, _ = _config_parser().parse_known_args(rest[1:])
    cfg = load_config(known.config, known.overrides, environ)
    if rest[0] in _PYTHON_ON_A_LOCAL_ROOT and deploy_mode == "client" and on_local_disk(cfg.storage.root):
        # A stop request under a local root is a file written here: no JVM (~15 s) needed for it.
        return "\n".join([*head, "CAROUSEL_JOB_KIND=python"])
    launch = cluster_launch(rest, cfg, environ, root) if deploy_mode == "cluster" else ClusterLaunch(rest)
    for warning in launch.warnings:
        print(f"carousel: {warning}", file=sys.stderr)
    code_zip = None if code_dir is None else write_code_zip(code_dir, code_zip_members(root, launch.shipped))
    return "\n".join(
        [
            *head,
            *_assignments(cfg, launch.args, code_zip),
            f"CAROUSEL_DEPLOY_MODE={deploy_mode}",
            f"CAROUSEL_SPARK_HOME={shlex.quote(str(spark_home(environ)))}",
        ]
    )
