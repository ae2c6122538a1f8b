"""Dependency hygiene: versions that must agree, and a log4j without the known CVEs everywhere.

The pins live in pyproject.toml (pip) and jvm/pom.xml (Maven); `make setup` installs both and checks
the same things. These tests read what is actually installed, so drift fails CI even when set-up was
skipped or the virtualenv was changed by hand.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

from carousel import broker
from carousel.config import PROJECT_ROOT

SPARK_JARS_DIR = PROJECT_ROOT / ".jars" / "spark"
MIN_LOG4J = (2, 25, 4)  # the first release without the known CVEs of older 2.x
POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _jar_versions(folder: Path, pattern: str) -> dict[str, str]:
    """``{artifact: version}`` of the jars in ``folder`` matching ``pattern`` (``NAME-X.Y.Z.jar``)."""
    versions: dict[str, str] = {}
    for jar in sorted(folder.glob(pattern)):
        match = re.fullmatch(r"(.+)-(\d+(?:\.\d+)+)\.jar", jar.name)
        assert match, f"cannot read the version of {jar}"
        artifact, version = match.groups()
        assert artifact not in versions, f"two {artifact} jars in {folder}: {versions[artifact]}, {version}"
        versions[artifact] = version
    return versions


def _pom_property(name: str) -> str:
    root = ET.parse(PROJECT_ROOT / "jvm" / "pom.xml").getroot()
    value = root.find(f"m:properties/m:{name}", POM_NS)
    assert value is not None and value.text, f"jvm/pom.xml has no <{name}>"
    return value.text.strip()


def _pyspark_jars_dir() -> Path:
    spec = importlib.util.find_spec("pyspark")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "jars"


def test_delta_pins_agree():
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    pins = [dep for dep in pyproject["project"]["dependencies"] if dep.startswith("delta-spark==")]
    assert pins == [f"delta-spark=={_pom_property('delta.version')}"]


def test_installed_delta_spark_matches_its_jar():
    pip_version = importlib.metadata.version("delta-spark")
    jars = _jar_versions(SPARK_JARS_DIR, "delta-spark_*.jar")
    assert len(jars) == 1, f"expected one delta-spark jar in {SPARK_JARS_DIR} (run `make setup`): {jars}"
    (jar_version,) = jars.values()
    assert pip_version == jar_version, f"pip delta-spark {pip_version} but jar {jar_version}"


def test_broker_classpath_log4j_is_patched():
    log4j = _jar_versions(broker.DEFAULT_JARS_DIR, "log4j-*.jar")
    assert {"log4j-api", "log4j-core", "log4j-slf4j2-impl"} <= log4j.keys(), log4j
    assert all(_version(v) >= MIN_LOG4J for v in log4j.values()), log4j
    assert set(log4j.values()) == {_pom_property("log4j2.version")}


def test_spark_classpath_log4j_is_patched():
    # Every Spark JVM from this virtualenv loads pyspark/jars/*; setup.sh replaced its bundled log4j.
    log4j = _jar_versions(_pyspark_jars_dir(), "log4j-*.jar")
    assert {"log4j-api", "log4j-core"} <= log4j.keys(), log4j
    assert all(_version(v) >= MIN_LOG4J for v in log4j.values()), log4j
    assert len(set(log4j.values())) == 1, f"mixed log4j versions in pyspark/jars: {log4j}"


def test_running_spark_loads_the_patched_log4j(spark):
    jvm = spark.sparkContext._jvm
    for class_name in ("org.apache.logging.log4j.LogManager", "org.apache.logging.log4j.core.LoggerContext"):
        cls = jvm.java.lang.Class.forName(class_name)
        location = str(cls.getProtectionDomain().getCodeSource().getLocation().getPath())
        match = re.search(r"log4j-[a-z]+-(\d+(?:\.\d+)+)\.jar$", location)
        assert match, f"{class_name} loaded from {location}"
        assert _version(match.group(1)) >= MIN_LOG4J, f"{class_name} loaded from {location}"


def test_hadoop_aws_matches_the_hadoop_pyspark_bundles():
    # S3A uses its Hadoop release's internals: hadoop-aws at another release fails at the first s3a:// path.
    bundled = _jar_versions(_pyspark_jars_dir(), "hadoop-client-api-*.jar")
    resolved = _jar_versions(SPARK_JARS_DIR, "hadoop-aws-*.jar")
    assert resolved == {"hadoop-aws": bundled["hadoop-client-api"]}, (bundled, resolved)
    assert _pom_property("hadoop.version") == bundled["hadoop-client-api"]


def test_training_image_is_built_by_the_projects_own_set_up():
    """The AWS Batch image (Dockerfile) cannot be built here (no Docker): check what makes it the
    project's image. Its Python is the one pyproject.toml requires, its Java what Spark 4 needs,
    the venv and jars come from scripts/setup.sh (the same pins and version checks), and the
    runner's relative ``./spark-submit.sh`` command runs from its WORKDIR with no ENTRYPOINT."""
    from packaging.specifiers import SpecifierSet

    from jobs.aws_batch import container_command

    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines() if line.strip() and not line.startswith("#")]
    base = re.search(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)-", dockerfile, re.M)
    requires = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert base and SpecifierSet(requires).contains(f"{base.group(1)}.0"), (base, requires)
    assert all(int(v) >= 17 for v in re.findall(r"openjdk-(\d+)-", dockerfile)), "Spark 4 needs Java 17+"
    assert "scripts/setup.sh" in dockerfile and "CAROUSEL_SETUP_ONLINE_STORE=skip" in dockerfile
    workdirs = {line.split()[1] for line in lines if line.startswith("WORKDIR")}
    assert len(workdirs) == 1, workdirs
    assert container_command("s3://b/in", "s3://b/out", "item2vec", [])[0] == "./spark-submit.sh"
    assert not any(line.startswith("ENTRYPOINT") for line in lines)
    ignored = (PROJECT_ROOT / ".dockerignore").read_text().split()
    for local_output in (".venv", ".jars", ".state", "data", "dist"):  # made inside the image, never copied
        assert local_output in ignored, local_output
