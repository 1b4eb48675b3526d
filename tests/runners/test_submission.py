"""Flink, Dataflow and Dask submission, checked offline: the deploy scripts' flags parse, the
pipeline graph builds and serialises with them (worker environment and staged package
included), and the worker container agrees with setup.py and the installed Beam."""
from __future__ import annotations

import ast
import os
import re
import subprocess
from dataclasses import replace

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import (DebugOptions, FlinkRunnerOptions,
                                                  GoogleCloudOptions, PipelineOptions,
                                                  PortableOptions, SetupOptions, StandardOptions,
                                                  WorkerOptions)
from apache_beam.pipeline import PipelineVisitor
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.portability.portable_runner import PortableRunner
from apache_beam.transforms import environments
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from pipeline.cli.nightly import parse_nightly_args
from pipeline.run import build_pipeline
from tests.runners import manifest_path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy")
IMAGE = "europe-west4-docker.pkg.dev/proj/beam/inctrl-beam:test"
JOB = ["nightly", "--manifest", "gs://bucket/manifest.parquet", "--output", "gs://bucket/out",
       "--date", "2024-05-01", "--k", "4"]


def dry_run(script: str, args: list[str], **env: str) -> list[str]:
    """The command a deploy script would run (DRY_RUN prints it, one argument per line)."""
    out = subprocess.run(["bash", os.path.join(DEPLOY, script), *args], check=True,
                         capture_output=True, text=True, env={**os.environ, "DRY_RUN": "1", **env})
    return out.stdout.splitlines()


def job_args(command: list[str]) -> list[str]:
    """``python -m pipeline nightly ...`` → the arguments after the sub-command."""
    assert command[1:4] == ["-m", "pipeline", "nightly"], command[:4]
    return command[4:]


def build_local(args: list[str], tmp_path) -> tuple[beam.Pipeline, PipelineOptions]:
    """The job's graph with the script's flags, reading the local test manifest."""
    config, _, beam_args = parse_nightly_args(args)
    options = PipelineOptions(beam_args)
    p = beam.Pipeline(runner=FnApiRunner(), options=options)
    local = replace(config, manifest=manifest_path(), output=str(tmp_path),
                    feature_cache=str(tmp_path / "cache"))
    build_pipeline(p, local, identity=local.suite.identity(), manifest_schema=None)
    return p, options


class _Handlers(PipelineVisitor):
    def __init__(self) -> None:
        self.handlers = []

    def enter_composite_transform(self, node) -> None:
        handler = getattr(node.transform, "_model_handler", None)
        if handler is not None:
            self.handlers.append(handler)


def model_handlers(p: beam.Pipeline) -> list:
    visitor = _Handlers()
    p.visit(visitor)
    return visitor.handlers


def docker_image(env: beam_runner_api_pb2.Environment) -> str:
    assert env.urn == common_urns.environments.DOCKER.urn
    return beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image


def staged_names(env: beam_runner_api_pb2.Environment) -> set[str]:
    return {beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(a.role_payload).staged_name
            for a in env.dependencies}


DATAFLOW_ENV = {"GCP_PROJECT": "proj", "GCP_REGION": "us-central1", "GCS_TEMP": "gs://bucket/tmp",
                "WORKER_IMAGE": IMAGE}


def test_dataflow_gpu_flags(tmp_path):
    command = dry_run("run_dataflow.sh", JOB, **DATAFLOW_ENV)
    config, _, beam_args = parse_nightly_args(job_args(command))
    options = PipelineOptions(beam_args)
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    gcp = options.view_as(GoogleCloudOptions)
    assert (gcp.project, gcp.region) == ("proj", "us-central1")
    assert gcp.temp_location.startswith("gs://bucket/tmp")
    accelerator = [o for o in gcp.dataflow_service_options if o.startswith("worker_accelerator=")]
    assert len(accelerator) == 1
    parts = dict(p.partition(":")[::2] for p in accelerator[0].partition("=")[2].split(";"))
    assert parts == {"type": "nvidia-l4", "count": "1", "install-nvidia-driver": ""}
    workers = options.view_as(WorkerOptions)
    assert workers.machine_type.startswith("g2-")  # G2 machines carry the L4 GPUs
    assert workers.sdk_container_image == IMAGE
    setup = options.view_as(SetupOptions)
    assert setup.setup_file == os.path.join(REPO, "setup.py") and setup.sdk_location == "container"
    experiments = options.view_as(DebugOptions).experiments
    assert "use_runner_v2" in experiments
    # Default: one model copy per VM served to every SDK process (RunInference large-model mode).
    assert "no_use_multiple_sdk_containers" not in experiments
    assert config.share_model_across_processes
    assert config.backbone.device == "cuda" and config.backbone.precision == "bf16"
    assert config.run_date == "2024-05-01" and config.k == 4


def test_dataflow_graph_builds_and_serialises_with_the_custom_container(tmp_path):
    args = job_args(dry_run("run_dataflow.sh", JOB, **DATAFLOW_ENV))
    p, options = build_local(args, tmp_path)
    # One model per VM, served to every SDK process: RunInference's large-model mode.
    handlers = model_handlers(p)
    assert handlers and all(h.share_model_across_processes() for h in handlers)
    # As the Dataflow runner does: the default environment is the custom container, and the
    # --setup_file sdist of this package is staged with it (built offline here).
    env = environments.DockerEnvironment.from_container_image(
        options.view_as(WorkerOptions).sdk_container_image,
        artifacts=environments.python_sdk_dependencies(options, str(tmp_path / "staging")))
    proto = p.to_runner_api(default_environment=env)
    data = proto.SerializeToString()
    again = beam_runner_api_pb2.Pipeline.FromString(data)
    (default_env,) = [e for e in again.components.environments.values()
                      if e.urn == common_urns.environments.DOCKER.urn]
    assert docker_image(default_env) == IMAGE
    assert "workflow.tar.gz" in staged_names(default_env)
    assert beam.Pipeline.from_runner_api(again, FnApiRunner(), options) is not None


def test_dataflow_cpu_workers_and_bad_settings():
    args = job_args(dry_run("run_dataflow.sh", JOB, GPU_TYPE="none", **DATAFLOW_ENV))
    config, _, beam_args = parse_nightly_args(args)
    gcp = PipelineOptions(beam_args).view_as(GoogleCloudOptions)
    assert not [o for o in (gcp.dataflow_service_options or []) if "accelerator" in o]
    assert config.backbone.device == "cpu"
    for env in ({**DATAFLOW_ENV, "MODEL_SHARING": "both"},
                {k: v for k, v in DATAFLOW_ENV.items() if k != "WORKER_IMAGE"}):
        with pytest.raises(subprocess.CalledProcessError):
            dry_run("run_dataflow.sh", JOB, **{"WORKER_IMAGE": "", **env})


def test_flink_submission_builds_a_portable_job(tmp_path):
    command = dry_run("run_flink.sh", JOB, FLINK_MASTER="flink-jobmanager:8081",
                      WORKER_IMAGE=IMAGE, PARALLELISM="8")
    args = job_args(command)
    p, options = build_local(args, tmp_path)
    assert options.view_as(StandardOptions).runner == "FlinkRunner"
    flink = options.view_as(FlinkRunnerOptions)
    assert flink.flink_master == "flink-jobmanager:8081" and flink.parallelism == 8
    assert flink.flink_version in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
    assert flink.flink_submit_uber_jar
    portable = options.view_as(PortableOptions)
    assert (portable.environment_type, portable.environment_config) == ("DOCKER", IMAGE)
    # What the Flink runner submits: the optimised proto with the workers' environment.
    options.view_as(SetupOptions).setup_file = None  # staging is checked in the Dataflow test
    proto = PortableRunner.get_proto_pipeline(p, options)
    again = beam_runner_api_pb2.Pipeline.FromString(proto.SerializeToString())
    images = {docker_image(e) for e in again.components.environments.values()
              if e.urn == common_urns.environments.DOCKER.urn}
    assert images == {IMAGE}

    endpoint = dry_run("run_flink.sh", JOB, JOB_ENDPOINT="localhost:8099", WORKER_IMAGE=IMAGE)
    opts = PipelineOptions(parse_nightly_args(job_args(endpoint))[2])
    assert opts.view_as(StandardOptions).runner == "PortableRunner"
    assert opts.view_as(PortableOptions).job_endpoint == "localhost:8099"
    with pytest.raises(subprocess.CalledProcessError):
        dry_run("run_flink.sh", JOB, WORKER_IMAGE=IMAGE, FLINK_MASTER="", JOB_ENDPOINT="")


def test_dask_submission_flags():
    command = dry_run("run_dask.sh", JOB, DASK_SCHEDULER="tcp://scheduler:8786",
                      DASK_PARTITIONS="16")
    _, _, beam_args = parse_nightly_args(job_args(command))
    assert beam_args == ["--runner=DaskRunner", "--dask_client_address=tcp://scheduler:8786",
                         "--dask_npartitions=16"]
    pytest.importorskip("dask")
    from apache_beam.runners.dask.dask_runner import DaskOptions

    dask = PipelineOptions(beam_args).view_as(DaskOptions).get_all_options(
        drop_default=True, current_only=True)
    assert dask == {"address": "tcp://scheduler:8786", "npartitions": 16}


# -- the worker container ----------------------------------------------------------------------

def setup_py() -> tuple[list[str], str]:
    """install_requires and python_requires of setup.py, read without running it."""
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    requires = next(ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                    and any(getattr(t, "id", None) == "REQUIRES" for t in n.targets))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    python = next(ast.literal_eval(k.value) for k in call.keywords if k.arg == "python_requires")
    return requires, python


def worker_requirements() -> dict[str, Requirement]:
    lines = open(os.path.join(DEPLOY, "requirements-worker.txt")).read().splitlines()
    reqs = [Requirement(line) for line in (l.split("#")[0].strip() for l in lines) if line]
    return {canonicalize_name(r.name): r for r in reqs}


def pinned(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not pinned"
    return spec.version


def test_container_requirements_agree_with_setup_py():
    requires, _ = setup_py()
    worker = worker_requirements()
    for line in requires:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in worker, f"{req.name} of setup.py is missing from requirements-worker.txt"
        version = pinned(worker[name])
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements-worker.txt pins {req.name}=={version}, setup.py asks {req.specifier}")
    # gcsfs is released in step with fsspec.
    assert pinned(worker["gcsfs"]) == pinned(worker["fsspec"])
    # the optional extras the container carries satisfy setup.py's extras too
    extras = setup_py_extras()
    for line in extras["openvino"]:
        req = Requirement(line)
        version = pinned(worker[canonicalize_name(req.name)])
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements-worker.txt pins {req.name}=={version}, setup.py asks {req.specifier}")


def setup_py_extras() -> dict[str, list[str]]:
    """setup.py's extras_require, read without running it."""
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))


def dockerfile_args() -> tuple[dict[str, str], str]:
    text = open(os.path.join(DEPLOY, "Dockerfile")).read()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    return args, base


def test_dockerfile_uses_the_sdk_image_of_our_beam_and_python():
    args, base = dockerfile_args()
    assert base == "apache/beam_python${PY_VERSION}_sdk:${BEAM_VERSION}"
    beam_pin = pinned(worker_requirements()["apache-beam"])
    assert args["BEAM_VERSION"] == beam_pin == beam.__version__
    _, python_requires = setup_py()
    assert SpecifierSet(python_requires).contains(args["PY_VERSION"] + ".0")
    # The image is built with the submitting interpreter's versions, not the defaults.
    build = open(os.path.join(DEPLOY, "build_image.sh")).read()
    assert "PY_VERSION=$PY_VERSION" in build and "BEAM_VERSION=$BEAM_VERSION" in build
    text = open(os.path.join(DEPLOY, "Dockerfile")).read()
    for copied in ("setup.py", "pipeline", "transforms", "deploy/requirements-worker.txt"):
        assert re.search(rf"^COPY {re.escape(copied)}\b", text, re.M), copied
    ignore = open(os.path.join(DEPLOY, "Dockerfile.dockerignore")).read().split()
    assert "*" in ignore and {"!setup.py", "!pipeline/", "!transforms/"} <= set(ignore)


def test_scripts_are_executable_and_valid_bash():
    for name in ("run_dataflow.sh", "run_flink.sh", "run_dask.sh", "run_nightly.sh",
                 "build_image.sh"):
        path = os.path.join(DEPLOY, name)
        assert os.access(path, os.X_OK), name
        subprocess.run(["bash", "-n", path], check=True)
