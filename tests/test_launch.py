"""The launcher behind ``./spark-submit.sh``: the code zip, and what a ``--deploy-mode cluster``
driver gets (carousel/launch.py, the code-zip branch of carousel/config.py).

A cluster-mode driver cannot be started here (standalone Spark refuses Python apps in cluster
mode; there is no YARN or Kubernetes), so the last tests start what such a driver is: the
project's ``cli.py`` and the shipped zip alone, in an empty folder, with none of the project's
environment, through pyspark's own spark-submit.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from pyspark.testing import assertDataFrameEqual

from carousel import config as config_module
from carousel import session as session_module
from carousel.config import PROJECT_ROOT, ConfigError, load_config
from carousel.launch import (
    CODE_ZIP_PREFIX,
    STALE_ZIP_S,
    cluster_launch,
    code_zip_members,
    java_properties,
    launch_info,
    submit_options,
    submitted_deploy_mode,
    write_code_zip,
)
from carousel.query_lifecycle import stop_main, stop_marker
from carousel.session import spark_jars
from jobs import simulate_events as sim
from jobs import upload_catalog as uc

VENV_BIN = Path(sys.executable).parent


def _assignments(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def _custom_templates(folder: Path) -> Path:
    """A copy of the project's templates with a marker in the push title, outside conf/."""
    for source in (PROJECT_ROOT / "conf" / "templates").rglob("*.j2"):
        target = folder / source.relative_to(PROJECT_ROOT / "conf" / "templates")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text())
    return folder


# ---------------------------------------------------------------------------------------------
# The code zip
# ---------------------------------------------------------------------------------------------
def test_code_zip_holds_the_packages_and_conf_and_is_named_by_its_content(tmp_path, monkeypatch):
    extra = tmp_path / "extra.yaml"
    extra.write_text("spark: {shuffle_partitions: 3}\n")
    members = code_zip_members(PROJECT_ROOT, {"conf/submitted/1-extra.yaml": extra})
    for name in ("carousel/config.py", "jobs/nightly.py", "streaming/serve.py", "conf/carousel.yaml"):
        assert name in members, name
    assert any(n.startswith("conf/templates/push/") for n in members)
    assert any(n.startswith("conf/payload_schemas/") for n in members)
    assert members["conf/submitted/1-extra.yaml"] == extra

    dist = tmp_path / "dist"
    first = write_code_zip(dist, members)
    assert first.name.startswith(CODE_ZIP_PREFIX)
    assert stat.S_IMODE(first.stat().st_mode) == 0o644  # readable by whoever shares the checkout
    with zipfile.ZipFile(first) as bundle:
        assert sorted(bundle.namelist()) == sorted(members)
        assert bundle.read("conf/submitted/1-extra.yaml") == extra.read_bytes()
    old = time.time() - STALE_ZIP_S - 60
    os.utime(first, (old, old))
    assert write_code_zip(dist, members) == first  # same content, same zip: reused and touched
    assert first.stat().st_mtime > old

    # Other content, another zip. Beyond the newest KEEP_ZIPS, a zip unused for STALE_ZIP_S goes,
    # with a staging file a killed launch left; a zip used since stays (a job may be reading it).
    monkeypatch.setattr("carousel.launch.KEEP_ZIPS", 1)
    leftover = dist / f"{CODE_ZIP_PREFIX}staging-x.tmp"
    leftover.write_bytes(b"")
    os.utime(leftover, (old, old))
    extra.write_text("spark: {shuffle_partitions: 4}\n")
    second = write_code_zip(dist, members)
    assert sorted(p.name for p in dist.iterdir()) == sorted([first.name, second.name])
    os.utime(first, (old, old))
    extra.write_text("spark: {shuffle_partitions: 5}\n")
    third = write_code_zip(dist, members)
    assert sorted(p.name for p in dist.iterdir()) == sorted([second.name, third.name])


def test_code_zip_leaves_out_an_earlier_launchs_submitted_files(tmp_path):
    root = tmp_path / "project"
    (root / "carousel").mkdir(parents=True)
    (root / "carousel" / "a.py").write_text("")
    (root / "conf" / "submitted").mkdir(parents=True)
    (root / "conf" / "carousel.yaml").write_text("{}\n")
    (root / "conf" / "submitted" / "1-old.yaml").write_text("{}\n")
    assert sorted(code_zip_members(root)) == ["carousel/a.py", "conf/carousel.yaml"]


def test_code_zip_unpacks_its_conf_once_per_content(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node-tmp"))
    (tmp_path / "node-tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    archive = write_code_zip(tmp_path / "dist", code_zip_members(PROJECT_ROOT))
    home = config_module._unpacked_home(archive)
    assert home.parent == tmp_path / "node-tmp"
    assert (home / "conf" / "carousel.yaml").read_text() == (PROJECT_ROOT / "conf/carousel.yaml").read_text()
    assert not (home / "carousel").exists()  # only conf/: the code runs from the zip
    assert config_module._unpacked_home(archive) == home
    assert [p.name for p in (tmp_path / "node-tmp").iterdir()] == [home.name]  # no staging left
    assert str(os.getuid()) in home.name and stat.S_IMODE(home.stat().st_mode) == 0o700
    # A folder of that name that is not a complete copy (a tmp cleaner emptied it, or it was put
    # there by someone else) is not trusted: a private copy is unpacked beside it.
    (home / ".carousel-unpacked").unlink()
    private = config_module._unpacked_home(archive)
    assert private != home and (private / "conf" / "carousel.yaml").is_file()
    # Not a zip (unreadable): the archive's own path, as before.
    assert config_module._unpacked_home(tmp_path / "missing.zip") == tmp_path / "missing.zip"


# ---------------------------------------------------------------------------------------------
# Cluster deploy mode: the driver's arguments and files
# ---------------------------------------------------------------------------------------------
def test_cluster_launch_ships_config_files_and_templates_from_outside_conf(tmp_path):
    prod = tmp_path / "prod.yaml"
    prod.write_text("spark: {shuffle_partitions: 3}\n")
    eu = tmp_path / "eu" / "prod.yaml"
    eu.parent.mkdir()
    eu.write_text("spark: {shuffle_partitions: 4}\n")
    templates = _custom_templates(tmp_path / "templates")
    overrides = [f"serving.templates_dir={templates}", "storage.root=s3a://bucket/carousel"]
    cfg = load_config([prod, eu], overrides)
    environ = {
        "CAROUSEL__SPARK__MASTER": "k8s://api.internal",
        "CAROUSEL_KAFKA_SASL_PASSWORD": "hunter2",
        "HOME": "/x",
    }
    # "--conf" is argparse's abbreviation of --config: the job reads it as one, and so it ships.
    argv = ["campaign", "--config", str(prod), "--name", "spring", f"--conf={eu}"]
    argv += [arg for item in overrides for arg in ("--set", item)]

    launch = cluster_launch(argv, cfg, environ)

    assert launch.args == [
        "campaign",
        "--name", "spring",
        "--config", "conf/submitted/1-prod.yaml",
        "--config", "conf/submitted/2-prod.yaml",
        "--set", f"serving.templates_dir={templates}",
        "--set", "storage.root=s3a://bucket/carousel",
        "--set", "serving.templates_dir=conf/submitted/templates",
    ]  # fmt: skip
    assert launch.shipped["conf/submitted/1-prod.yaml"] == prod
    assert launch.shipped["conf/submitted/2-prod.yaml"] == eu
    assert (
        launch.shipped["conf/submitted/templates/push/default.title.j2"]
        == templates / "push/default.title.j2"
    )
    # The payload schemas are the project's own (under conf/): already in the zip.
    assert not any(n.startswith("conf/submitted/payload_schemas") for n in launch.shipped)
    # What stays behind is named, never its value; the storage root is shared: no warning for it.
    assert len(launch.warnings) == 1, launch.warnings
    assert "CAROUSEL_KAFKA_SASL_PASSWORD, CAROUSEL__SPARK__MASTER" in launch.warnings[0]
    assert "hunter2" not in launch.warnings[0] and "api.internal" not in launch.warnings[0]


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_cluster_launch_warns_of_a_storage_root_on_a_local_disk(tmp_path, scheme):
    root = f"{scheme}{tmp_path}/data"
    cfg = load_config(overrides=[f"storage.root={root}"])
    launch = cluster_launch(["ingest"], cfg, {})
    assert launch.args == ["ingest"] and launch.shipped == {}
    assert len(launch.warnings) == 1 and f"storage.root {root} is a local path" in launch.warnings[0]


def test_cluster_launch_warns_of_job_paths_on_a_local_disk(tmp_path):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("item_id\nsku-1\n")
    cfg = load_config(overrides=["storage.root=s3a://b/c"])
    upload = cluster_launch(["upload-catalog", str(catalog), "--partial"], cfg, {})
    assert upload.args == ["upload-catalog", str(catalog), "--partial"]  # not shipped: named
    assert len(upload.warnings) == 1 and f"{catalog} is a path on this machine's disk" in upload.warnings[0]
    campaign = cluster_launch(["campaign", "weekly-email", "--output", "out", "--run-id=r1"], cfg, {})
    assert len(campaign.warnings) == 1 and "--output out is a path" in campaign.warnings[0]
    erase = cluster_launch(["forget-user", "--file", "ids.csv", "--snapshots=/mnt/snaps"], cfg, {})
    assert "--file ids.csv, --snapshots /mnt/snaps are paths" in erase.warnings[0]
    abbreviated = cluster_launch(["campaign", "weekly", "--out", "file:///tmp/out", "--output="], cfg, {})
    assert "--out file:///tmp/out is a path" in abbreviated.warnings[0]
    shared = cluster_launch(["train", "--input=s3a://b/snap", "--output", "hdfs://nn/out"], cfg, {})
    assert shared.warnings == []


def test_cluster_launch_keeps_what_follows_a_double_dash_last(tmp_path):
    prod = tmp_path / "prod.yaml"
    prod.write_text("{}\n")
    cfg = load_config([prod], ["storage.root=s3a://b/c"])
    launch = cluster_launch(["upload-catalog", "--config", str(prod), "--", "--odd-file-name.csv"], cfg, {})
    assert launch.args == [
        "upload-catalog",
        "--config",
        "conf/submitted/1-prod.yaml",
        "--",
        "--odd-file-name.csv",
    ]


def test_cluster_launch_refuses_a_template_folder_it_cannot_ship(tmp_path):
    cfg = load_config(overrides=[f"serving.templates_dir={tmp_path}/missing", "storage.root=s3a://b/c"])
    with pytest.raises(ConfigError, match="serving.templates_dir .*/missing is not a folder on this machine"):
        cluster_launch(["serve"], cfg, {})


def test_client_launch_keeps_the_arguments(tmp_path):
    prod = tmp_path / "prod.yaml"
    prod.write_text("spark: {shuffle_partitions: 3}\n")
    text = launch_info(
        ["--code-dir", str(tmp_path / "dist"), "--deploy-mode", "client", "ingest", "--config", str(prod)],
        {"CAROUSEL__SPARK__MASTER": "local[1]"},
    )
    values = _assignments(text)
    assert values["CAROUSEL_JOB_KIND"] == "spark"
    assert values["CAROUSEL_SPARK_ARG_COUNT"] == "2"
    assert values["CAROUSEL_MASTER_GIVEN"] == "0"
    assert values["CAROUSEL_DEPLOY_MODE"] == "client"
    assert values["CAROUSEL_MASTER"] == "'local[1]'"  # the environment applies on this machine
    assert values["CAROUSEL_JOB_ARGS"] == f"(ingest --config {prod})"
    assert Path(values["CAROUSEL_CODE_ZIP"]).parent == tmp_path / "dist"


@pytest.mark.parametrize(
    ("root", "deploy_mode", "kind"),
    [
        ("/srv/carousel", "client", "python"),
        ("file:///srv/carousel", "client", "python"),
        ("s3a://bucket/carousel", "client", "spark"),
        ("hdfs://namenode/carousel", "client", "spark"),
        ("/srv/carousel", "cluster", "spark"),
    ],
)
def test_a_stop_request_under_a_local_root_starts_no_jvm(root, deploy_mode, kind, tmp_path):
    words = ["--code-dir", str(tmp_path / "dist"), "--deploy-mode", deploy_mode, "stop", "ingest"]
    words += ["--set", f"storage.root={root}"]
    values = _assignments(launch_info(words, {"CAROUSEL__SPARK__MASTER": "yarn"}))
    assert values["CAROUSEL_JOB_KIND"] == kind
    assert values["CAROUSEL_SPARK_ARG_COUNT"] == "2"  # shifted away by spark-submit.sh either way


def test_stop_writes_the_request_under_a_local_root_without_spark(tmp_path, monkeypatch):
    def no_session(*_args, **_kwargs):
        raise AssertionError("a Spark session was built to write a local stop request")

    monkeypatch.setattr(session_module, "build_session", no_session)
    root = tmp_path / "data"
    cfg = load_config(overrides=[f"storage.root=file://{root}"], environ={})
    marker = Path(stop_marker(cfg, cfg.ingest.query_name).removeprefix("file://"))
    assert stop_main(["ingest", "--set", f"storage.root=file://{root}", "--reason", "by the test"]) == 0
    assert marker.read_text().rstrip().endswith("by the test")
    assert marker.parent == root / "checkpoints" / cfg.ingest.query_name


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["simulate", "--help"], {"CAROUSEL_SPARK_ARG_COUNT": "0", "CAROUSEL_JOB_KIND": "python"}),
        (
            ["--master=yarn", "-v", "simulate"],
            {"CAROUSEL_SPARK_ARG_COUNT": "2", "CAROUSEL_JOB_KIND": "python"},
        ),
        (
            ["--name", "no-such-job", "no-such-job"],
            {"CAROUSEL_SPARK_ARG_COUNT": "2", "CAROUSEL_JOB_KIND": "unknown"},
        ),
        ([], {"CAROUSEL_SPARK_ARG_COUNT": "0", "CAROUSEL_JOB_KIND": "help"}),
        (["--master", "local[1]", "--help"], {"CAROUSEL_SPARK_ARG_COUNT": "3", "CAROUSEL_JOB_KIND": "help"}),
        (["help"], {"CAROUSEL_SPARK_ARG_COUNT": "0", "CAROUSEL_JOB_KIND": "help"}),
    ],
)
def test_the_launcher_counts_the_spark_submit_options_before_the_job(words, expected):
    values = _assignments(launch_info(words, {}))
    assert values == {
        "CAROUSEL_MASTER_GIVEN": str(int(any(w.startswith("--master") for w in words))),
        **expected,
    }


@pytest.mark.parametrize(
    ("words", "options", "count"),
    [
        # A value that reads like an option is a value, as spark-submit's parser takes it.
        (
            ["--name", "--conf", "--deploy-mode", "cluster", "ingest"],
            [("--name", "--conf"), ("--deploy-mode", "cluster")],
            4,
        ),
        (
            ["--conf=spark.a=--deploy-mode", "-c", "--master", "serve", "x"],
            [("--conf", "spark.a=--deploy-mode"), ("-c", "--master")],
            3,
        ),
        (
            ["--supervise", "--load-spark-defaults", "--queue", "q", "api"],
            [("--supervise", None), ("--load-spark-defaults", None), ("--queue", "q")],
            4,
        ),
        (["ingest", "--master", "yarn"], [], 0),
        # spark-submit splits "--name=value" on every option, a switch's value ignored.
        (["--verbose=true", "--name=a=b", "job"], [("--verbose", None), ("--name", "a=b")], 2),
    ],
)
def test_spark_submit_options_are_read_as_spark_submit_reads_them(words, options, count):
    assert submit_options(words) == (options, count)


def test_an_unknown_spark_submit_option_or_one_without_its_value_is_refused():
    with pytest.raises(ConfigError, match="unknown spark-submit option '--mastr'"):
        submit_options(["--mastr", "yarn", "ingest"])
    with pytest.raises(ConfigError, match="unknown spark-submit option '-c=spark.a=1'"):
        submit_options(["-c=spark.a=1", "ingest"])  # spark-submit splits '=' off '--' options only
    with pytest.raises(ConfigError, match="spark-submit option --master needs a value"):
        submit_options(["--master"])
    with pytest.raises(ConfigError, match="unknown spark-submit option '--mastr'"):
        submit_options(["--mastr=yarn", "ingest"])  # named as spark-submit names it
    with pytest.raises(ConfigError, match="unknown spark-submit option '--code-dir'"):
        launch_info(["--code-dir", "dist", "--code-dir", "elsewhere", "simulate"], {})  # the launcher's only
    with pytest.raises(ConfigError, match="spark-submit's --kill submits no job: run .*spark-submit --kill"):
        launch_info(["--code-dir", "dist", "--kill", "driver-1"], {})


def test_an_option_value_that_reads_like_an_option_does_not_set_the_deploy_mode():
    args = ["--name", "--deploy-mode", "--conf", "spark.submit.deployMode=cluster"]
    assert submitted_deploy_mode(args, {}) == "cluster"
    assert (
        submitted_deploy_mode(["--name", "--deploy-mode", "--verbose"], {"DEPLOY_MODE": "cluster"})
        == "cluster"
    )


# ---------------------------------------------------------------------------------------------
# The deploy mode, read from the spark-submit options as spark-submit reads it
# ---------------------------------------------------------------------------------------------
def test_java_properties_are_read_as_spark_submit_reads_them():
    text = (
        "# a comment\n! another\n\n"
        "spark.submit.deployMode cluster\n"
        "spark.master=yarn\n"
        "  spark.app.name : nightly  \n"
        "spark.driver.extraJavaOptions = -Da=1 \\\n    -Db=2\n"
        "spark.flag\n"
        "spark.escaped\\=key\fclu\\u0073ter\\\\\r\n"
    )
    assert java_properties(text) == {
        "spark.submit.deployMode": "cluster",
        "spark.master": "yarn",
        "spark.app.name": "nightly",
        "spark.driver.extraJavaOptions": "-Da=1 -Db=2",
        "spark.flag": "",
        "spark.escaped=key": "cluster\\",
    }


@pytest.mark.parametrize(
    ("options", "files", "environ", "expected"),
    [
        ([], {}, {}, "client"),
        ([], {"defaults": "cluster"}, {}, "cluster"),
        ([], {"defaults": "cluster"}, {"DEPLOY_MODE": "client"}, "cluster"),
        ([], {}, {"DEPLOY_MODE": "cluster"}, "cluster"),
        # A properties file replaces spark-defaults.conf, unless --load-spark-defaults adds it back.
        (["--properties-file", "{props}"], {"props": None, "defaults": "cluster"}, {}, "client"),
        (
            ["--properties-file", "{props}", "--load-spark-defaults"],
            {"props": None, "defaults": "cluster"},
            {},
            "cluster",
        ),
        (["--properties-file={props}"], {"props": "cluster", "defaults": "client"}, {}, "cluster"),
        (
            ["--properties-file", "{props}", "--load-spark-defaults"],
            {"props": "client", "defaults": "cluster"},
            {},
            "client",
        ),
        # --conf before the files, --deploy-mode before all.
        (["--conf", "spark.submit.deployMode=client"], {"defaults": "cluster"}, {}, "client"),
        (
            ["-c", "spark.submit.deployMode=cluster", "--conf=spark.submit.deployMode=client"],
            {},
            {},
            "client",
        ),
        (["--deploy-mode", "cluster", "--conf", "spark.submit.deployMode=client"], {}, {}, "cluster"),
        (["--master", "yarn", "--deploy-mode=client"], {"defaults": "cluster"}, {}, "client"),
    ],
)
def test_the_deploy_mode_comes_from_the_options_the_files_or_the_environment(
    tmp_path, options, files, environ, expected
):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    props = tmp_path / "job.properties"
    for name, mode in files.items():
        path = props if name == "props" else conf_dir / "spark-defaults.conf"
        path.write_text("spark.executor.cores 2\n" + (f"spark.submit.deployMode={mode}\n" if mode else ""))
    args = [option.format(props=props) for option in options]
    assert submitted_deploy_mode(args, {"SPARK_CONF_DIR": str(conf_dir), **environ}) == expected


def test_a_bad_deploy_mode_is_refused_naming_where_it_came_from(tmp_path):
    props = tmp_path / "job.properties"
    props.write_text("spark.submit.deployMode sideways\n")
    with pytest.raises(ConfigError, match=f"spark.submit.deployMode in {props} must be one of .*'sideways'"):
        submitted_deploy_mode(["--properties-file", str(props)], {"SPARK_CONF_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="cannot read the Spark properties file"):
        submitted_deploy_mode(["--properties-file", str(tmp_path / "missing")], {})


def test_spark_submit_sh_takes_the_deploy_mode_from_a_properties_file(tmp_path):
    """The wrapper passes its spark-submit options to the launcher: a properties file that says
    cluster makes the launcher prepare a cluster launch, and spark-submit, reading the same file,
    refuses cluster mode on a local master, as it would not if they disagreed."""
    props = tmp_path / "job.properties"
    props.write_text("spark.submit.deployMode=cluster\n")
    environ = {**os.environ, "SPARK_CONF_DIR": str(tmp_path)}
    submit = PROJECT_ROOT / "spark-submit.sh"
    ran = subprocess.run(
        [str(submit), "--master", "local[1]", "--properties-file", str(props), "maintain"],
        capture_output=True, text=True, env=environ, timeout=120,
    )  # fmt: skip
    assert ran.returncode != 0
    assert "cluster deploy mode: storage.root" in ran.stderr  # the launcher's cluster launch
    assert "Cluster deploy mode is not compatible with master" in ran.stderr  # spark-submit's own
    props.write_text("spark.submit.deployMode=sideways\n")
    ran = subprocess.run(
        [str(submit), "--properties-file", str(props), "maintain"],
        capture_output=True, text=True, env=environ, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 2
    assert f"carousel: spark.submit.deployMode in {props} must be one of ['client', 'cluster']" in ran.stderr


def test_spark_submit_sh_reads_the_options_before_the_job_as_spark_submit_does():
    """The wrapper takes its split of the words from the launcher: an option's value that reads
    like an option stays a value, an unknown option is refused with its name, --help after options
    prints the usage, and a Python job gets its own arguments."""
    submit = str(PROJECT_ROOT / "spark-submit.sh")

    def run(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([submit, *words], capture_output=True, text=True, timeout=120)

    refused = run("--mastr", "yarn", "ingest")
    assert refused.returncode == 2
    assert "carousel: unknown spark-submit option '--mastr'" in refused.stderr
    usage = run("--name", "--master", "--help")
    assert usage.returncode == 0 and usage.stdout.startswith("usage: ./spark-submit.sh")
    job_help = run("--name", "--verbose", "-v", "simulate", "--help")
    assert job_help.returncode == 0 and job_help.stdout.startswith("usage: simulate")


def test_a_relative_config_file_missing_here_is_read_from_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_module.config_file_path("conf/carousel.yaml") == PROJECT_ROOT / "conf/carousel.yaml"
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "carousel.yaml").write_text("{}\n")
    assert config_module.config_file_path("conf/carousel.yaml") == Path("conf/carousel.yaml")  # here first
    assert config_module.config_file_path("nowhere.yaml") == Path("nowhere.yaml")  # named as given


# ---------------------------------------------------------------------------------------------
# A driver with only the shipped files
# ---------------------------------------------------------------------------------------------
def _driver_environment(node_tmp: Path) -> dict[str, str]:
    """This process's environment without the project's: no CAROUSEL_HOME, PYTHONPATH or settings."""
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CAROUSEL_HOME", "PYTHONPATH") and not k.startswith(("CAROUSEL__", "PYSPARK_"))
    }
    node_tmp.mkdir(parents=True, exist_ok=True)
    return {**environ, "TMPDIR": str(node_tmp), "PYSPARK_PYTHON": sys.executable}


def _cluster_launch(tmp_path: Path, job_args: list[str]) -> tuple[Path, list[str]]:
    """The zip and job arguments ``./spark-submit.sh --deploy-mode cluster`` would submit."""
    info = subprocess.run(
        [sys.executable, "-m", "carousel.cli", "--launch-info", "--code-dir", str(tmp_path / "dist")]
        + ["--deploy-mode", "cluster", *job_args],
        capture_output=True, text=True, check=True, cwd=PROJECT_ROOT,
        env={**os.environ, "CAROUSEL_HOME": str(PROJECT_ROOT)},
    )  # fmt: skip
    script = f'{info.stdout}\nprintf "%s\\n" "$CAROUSEL_CODE_ZIP" "${{CAROUSEL_JOB_ARGS[@]}}"'
    lines = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    code_zip, *args = lines.splitlines()
    return Path(code_zip), args


def test_a_driver_with_only_the_zip_finds_its_config_and_templates(tmp_path):
    submitted = tmp_path / "client" / "job.yaml"
    submitted.parent.mkdir()
    submitted.write_text(yaml.safe_dump({"spark": {"shuffle_partitions": 7}}))
    templates = _custom_templates(tmp_path / "client" / "templates")
    title = templates / "push" / "default.title.j2"
    title.write_text("From the client: " + title.read_text())
    code_zip, args = _cluster_launch(
        tmp_path, ["campaign", "--config", str(submitted), "--set", f"serving.templates_dir={templates}"]
    )
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    check = (
        "import sys, carousel.config as c\n"
        "from carousel.cli import add_config_args\n"
        "from carousel.payloads import check_templates\n"
        "import argparse\n"
        "known, _ = add_config_args(argparse.ArgumentParser()).parse_known_args(sys.argv[2:])\n"
        "cfg = c.load_config(known.config, known.overrides)\n"
        "renderer = check_templates(cfg)\n"
        "print(c.__file__, c.PROJECT_ROOT, cfg.spark.shuffle_partitions, sep='\\n')\n"
        "print(cfg.serving.templates_dir)\n"
        "print(renderer.texts['push/default.title.j2'].splitlines()[0])\n"
    )
    environ = {**_driver_environment(tmp_path / "node-tmp"), "PYTHONPATH": str(code_zip)}
    done = subprocess.run(
        [sys.executable, "-c", check, *args], capture_output=True, text=True, cwd=driver_dir, env=environ
    )
    assert done.returncode == 0, done.stderr[-3000:]
    module_file, home, partitions, templates_dir, first_line = done.stdout.splitlines()[-5:]
    assert module_file.startswith(str(code_zip)), module_file  # the code came from the zip
    assert Path(home).parent == tmp_path / "node-tmp"
    assert partitions == "7"
    assert templates_dir == f"{home}/conf/submitted/templates"
    assert first_line.startswith("From the client: ")


@pytest.mark.integration
@pytest.mark.slow
def test_a_spark_job_runs_from_the_zip_alone(spark, tmp_path):
    """``upload-catalog`` started the way a cluster manager starts the driver: ``cli.py`` and the
    zip in an empty folder, the configuration only from the submitted file."""
    cfg = load_config(overrides=[f"storage.root={tmp_path}/cluster-data"])
    submitted = tmp_path / "client" / "cluster.yaml"
    submitted.parent.mkdir()
    submitted.write_text(yaml.safe_dump({"storage": {"root": cfg.storage.root}}))
    world = sim.build_world(cfg.simulator.model_copy(update={"items": 12, "users": 3}))
    catalog_file = sim.write_outputs(world, tmp_path / "sim")["catalog.csv"]
    code_zip, args = _cluster_launch(
        tmp_path, ["upload-catalog", str(catalog_file), "--config", str(submitted)]
    )
    assert args[2:] == ["--config", "conf/submitted/1-cluster.yaml"]

    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    (driver_dir / "cli.py").write_text((PROJECT_ROOT / "carousel" / "cli.py").read_text())
    command = [
        str(VENV_BIN / "spark-submit"),
        "--master", "local[1]",
        "--driver-memory", "1g",
        "--jars", ",".join(spark_jars(cfg)),
        "--py-files", str(code_zip),
        "--conf", "spark.ui.enabled=false",
        "cli.py", *args,
    ]  # fmt: skip
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=driver_dir,
        env=_driver_environment(tmp_path / "node-tmp"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert list((tmp_path / "node-tmp").glob("carousel-home-*/conf/submitted/1-cluster.yaml"))

    expected = spark.createDataFrame(
        [(item.item_id, item.title) for item in world.items], "item_id string, title string"
    )
    assertDataFrameEqual(uc.read_active_catalog(spark, cfg).select("item_id", "title"), expected)
