"""Session-wide safety settings and the stand-in fixtures (sshd fleets, a local Cloud TPU API).

tests/ has no __init__.py on purpose: pytest then puts tests/ on sys.path, so `standins` imports as a package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# torch's x86_64 build pulls in triton (through open_clip -> torch._dynamo), whose compiled extension crashes the
# process (SIGSEGV) when it loads after TensorFlow's libraries; loaded before them, both work. Tests import both.
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401

import pytest
from standins.compute_api import SERVICE_PATH, FakeComputeApi
from standins.discovery import held_to_reference
from standins.gcs import GcsEmulator
from standins.guest_agent import GuestAgent
from standins.pod import PROJECT, RUN_RECIPE, Pod
from standins.pod import make_pod as stand_in_pod
from standins.sshfleet import Network, SshFleet, start_fleet
from standins.tpu_api import FakeTpuApi

ROOT = Path(__file__).resolve().parents[1]

# Set for the whole session. A client built without explicit credentials makes google-auth probe the GCE
# metadata server (a link-local address off this machine): these keep any probe on a closed local port instead.
SESSION_ENV = {
    "NO_GCE_CHECK": "true",  # lowercase: google-auth compares against "true"
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    # where tpuctl reads a pod run's gs:// paths: a closed local port, never Google (the `gcs` fixture's emulator
    # while a test has one)
    "TPUCTL_STORAGE_ENDPOINT": "http://127.0.0.1:9",
    # Compute Engine (TPU slices under backend auto, the project's metadata): the same, unless a test's stand-in
    "TPUCTL_COMPUTE_ENDPOINT": "http://127.0.0.1:9",
}
# The host's gcloud/ADC setup must not leak into tests.
UNSET_ENV = ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT")

_saved_env: dict[str, str | None] = {}
_session_dir: Path | None = None
# What every process of one test run shares (both xdist workers, their trainers, the stand-in workers: /var/tmp is
# not private to them): the XLA cache and the runs made once per test run. Made by the first process (the xdist
# controller, before it starts the workers, which inherit the variable), removed by it at the end.
RUN_SHARED_ENV = "TPUCTL_TESTS_RUN_DIR"
_made_run_dir = False
# Outside CI the XLA cache outlives the test run: a developer's next run compiles nothing the last one compiled (the
# quick tier: 137 s with an empty cache, 93 s with the last run's; RESULTS.md). JAX keys each program by its HLO, the
# compile options and the jax/jaxlib versions, so what a change alters is compiled again. Under /var/tmp: the stand-in
# workers see it too. CI (CI=true) starts from an empty one in the run's directory, as a new machine would; so does
# TPUCTL_TESTS_XLA_CACHE=run (or a path: that one). To clear it: rm -rf /var/tmp/tpuctl-tests-xla
XLA_CACHE_ENV = "TPUCTL_TESTS_XLA_CACHE"
# XLA:CPU's LLVM at -O0 for every JAX process of the tests: compiling the tests' small programs is most of their CPU
# (a trainer run of the tiny recipe: 20 of 48 CPU-s), and -O0 compiles in ~60% of the time; the steps then run ~2.5x
# slower, which the tests' few small steps hardly feel (RESULTS.md, issue 32). Every run of a comparison uses the same.
TESTS_XLA_FLAGS = "--xla_backend_optimization_level=0"
KEPT_XLA_CACHE = Path("/var/tmp/tpuctl-tests-xla")


def xla_cache_dir() -> Path:
    chosen = os.environ.get(XLA_CACHE_ENV, "")
    if chosen == "run" or (not chosen and os.environ.get("CI")):  # CI as standins.image reads it
        return Path(os.environ[RUN_SHARED_ENV]) / "xla"
    return Path(chosen) if chosen else KEPT_XLA_CACHE


def pytest_configure(config: pytest.Config) -> None:
    global _session_dir
    config.addinivalue_line("markers", "slow: takes more than 5 s")
    global _made_run_dir
    _session_dir = Path(tempfile.mkdtemp(prefix="tpuctl-tests-"))
    cloudsdk = _session_dir / "cloudsdk"
    cloudsdk.mkdir()
    if not os.environ.get(RUN_SHARED_ENV):
        os.environ[RUN_SHARED_ENV] = tempfile.mkdtemp(prefix="tpuctl-test-run-", dir="/var/tmp")
        _made_run_dir = True
    xla = xla_cache_dir()
    overrides: dict[str, str | None] = {
        **SESSION_ENV,
        # one persistent XLA cache for every trainer process of the run, keeping every program, however quick to
        # compile: the same small programs are otherwise compiled again in each of dozens of trainer processes
        "TRAINER_COMPILE_CACHE": str(xla),
        # and for the tests' own JAX (test_models, test_parts, test_convert...): the same models are initialised and
        # applied by several tests in both xdist workers (measured: 18% less CPU for those modules, RESULTS.md)
        "JAX_COMPILATION_CACHE_DIR": str(xla),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "XLA_FLAGS": TESTS_XLA_FLAGS,
        **dict.fromkeys(UNSET_ENV),
        "CLOUDSDK_CONFIG": str(cloudsdk),  # an empty gcloud config: no account, project or credentials
        # A config path that does not exist, so tpuctl never reads the developer's own config.
        "TPUCTL_CONFIG": str(_session_dir / "no-such-dir" / "config.toml"),
    }
    for name, value in overrides.items():
        _saved_env.setdefault(name, os.environ.get(name))
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# The full tier's modules: each of their tests runs the trainer, a pod of stand-in workers, a bucket emulator or the
# real open_clip (seconds to minutes each). `pytest -m "not slow"` (the quick tier) leaves them out; CI runs all.
SLOW_MODULES = {
    "test_babysit",  # recreated stand-in VMs, preemption drills
    "test_bench",  # the step benchmark end to end
    "test_bucket",  # trainer runs against the GCS emulator
    "test_compute_fleet",  # a MIG of stand-in workers: prepare, runs, the trainer on two hosts
    "test_convert",  # upstream open_clip (torch) against our towers
    "test_data_formats",  # TFDS builders written by tensorflow-datasets, trainer runs
    "test_first_steps",  # the README's first steps, a prepare on stand-in VMs among them
    "test_openvision_jax",  # orbax checkpoints and open_clip
    "test_prepare",  # offline `tpuctl prepare` builds a venv per stand-in worker
    "test_real_data",  # two trainer stages on real image files
    "test_runs",  # pods training through tmux
    "test_scale",  # 128 stand-in workers
    "test_secrets",  # runs on stand-in workers
    "test_train",  # trainer runs: kill -9, SIGTERM, two processes
    "test_wandb",  # trainer runs with wandb offline
}


# The order CI starts the tests in. Two long tests at once take 2-3x as long each, past a minute (the 128-worker pod
# beside the stop-and-resume drill: 69 and 76 s, 30 and 25 s alone; the two-process test beside the fleet drills:
# 187 s, 64 alone): the drills on many stand-in workers (sshds, tmux, the status script) keep more than one core
# busy. So `scheduled` orders the tests such that no two LONG_TESTS run at once, the LONG_TESTS early and in this
# order, those in SHIELDED beside the longest LIGHT_MODULES tests left (a long test beside a trainer test took up to
# 3x its time alone), the other tests longest first, the run ending on the shortest (benchmarks/RESULTS.md, issue 32).
# Modules whose tests drive tpuctl against stand-ins (sshd workers, the local APIs) and start no trainer, JAX,
# TensorFlow or pip: mostly waiting on sockets and subprocesses, they leave a core to the long test beside them.
LIGHT_MODULES = {
    "test_access",
    "test_chips",
    "test_cli",
    "test_cloud",
    "test_code",
    "test_compute",
    "test_config",
    "test_doctor",
    "test_exec",
    "test_keys",
    "test_lifecycle",
    "test_menu",
    "test_mux",
    "test_proxy",
    "test_recipe",
    "test_remote",
    "test_report",
    "test_storage",
    "test_sync",
}
LONG_TESTS = [
    "test_train.py::test_an_uninterrupted_run_trains_both_stages_and_logs",  # builds the reference the others read
    # first, those that are most CPU and slowed most beside another test: they get the light ones beside them
    "test_runs.py::test_the_local_target_trains_the_tiny_recipe_from_a_clean_checkout",
    "test_train.py::test_two_processes_stop_together_on_preemption",  # builds the two hosts' save
    "test_real_data.py::test_train_on_shards_with_zero_shot_and_retrieval_evals_in_the_loop",  # builds the shard run
    # open_clip's B/16 in torch and ours: 28-36 s alone, 65-82 s beside a trainer build
    "test_convert.py::test_imported_models_compute_what_open_clip_computes_and_export_back_exactly[ViT-B-16-B/16-cls]",
    # the heaviest neighbours (128 sshds' handshakes): a trainer test beside them took 3.5x its time alone. In this
    # order on one worker they share one pod (test_scale's `wide`): the first starts it and syncs the project in full
    "test_scale.py::test_a_pod_of_128_workers_execs_checks_and_syncs",
    "test_scale.py::test_a_pod_of_128_workers_runs_reports_and_stops",
    # 13 s alone, 78 s beside the 128-worker pods: long enough to keep away from the other long tests
    "test_train.py::test_a_two_host_save_resumes_on_another_mesh",
    # 40 s alone, 65 s beside the shard run and the 128-worker pod: two trainer starts against the GCS emulator
    "test_train.py::test_a_bucket_workdir_killed_and_resumed_continues_exactly",
    "test_bucket.py::test_an_eval_that_fails_on_one_host_of_two_is_reported_by_both_and_training_goes_on",
    # 22-33 s in CI, 67 s beside convert's B/16 import then a 128-worker pod: a trainer with its evals on the emulator
    "test_bucket.py::test_evals_read_from_the_bucket_and_a_failing_one_leaves_training_intact",
    # 20 s in one fresh-clone run, 69 and 76 s in the next two: kept away from the other long tests
    "test_data_formats.py::test_the_trainer_trains_on_a_mixture_of_a_tfds_builder_and_tars_with_every_eval_format",
    "test_runs.py::test_a_dead_worker_stops_the_others_and_status_names_it",
    "test_compute_fleet.py::test_the_trainer_runs_on_a_two_host_mig_joined_by_jax_distributed",
    "test_compute_fleet.py::test_a_four_worker_mig_slice_goes_through_a_pods_commands",
    "test_babysit.py::test_preemption_drill",
    "test_runs.py::test_two_workers_stop_and_resume_a_run_by_its_name",
    # libtpu compiles on both cores (two plans at once in the first): beside the 128 workers' start, one of their
    # sshds showed no banner within the start's timeout
    "test_plan.py::test_a_plan_compiles_each_stage_for_the_slice_and_says_what_a_chip_holds",
    "test_plan.py::test_a_stage_that_cannot_fit_is_refused_with_what_it_needs",
    "test_plan.py::test_remat_auto_takes_the_least_recomputation_that_fits",
    # 20-28 s alone, 66 s in two runs beside the plan's libtpu compiles: eight XLA:CPU devices compiling
    "test_step.py::test_a_step_on_8_devices_equals_the_step_on_1",
    # 22-35 s alone, 88 s beside the 128-worker pod: eight XLA:CPU devices compiling the accumulation
    "test_fsdp.py::test_grad_accum_all_reduces_the_gradient_once_and_keeps_the_whole_batch_s_update",
]
# The long tests slowed most beside a CPU-heavy test, and the heaviest neighbours: `scheduled` puts the light tests
# beside them (about 160 s of light tests in all: enough for these four, ~120 s beside light ones). The local
# target: 70 s in CI, 30 s alone.
SHIELDED = {
    # 30-37 s alone, 70-80 s beside each other or a trainer test: 128 sshds and their handshakes share the two cores
    "test_scale.py::test_a_pod_of_128_workers_runs_reports_and_stops",
    "test_scale.py::test_a_pod_of_128_workers_execs_checks_and_syncs",
    "test_runs.py::test_the_local_target_trains_the_tiny_recipe_from_a_clean_checkout",
    # open_clip's B/16 in torch and ours: 74 s in two runs beside test_parts' accumulation and a trainer test
    "test_convert.py::test_imported_models_compute_what_open_clip_computes_and_export_back_exactly[ViT-B-16-B/16-cls]",
}
# Each test's seconds (set-up, call and tear-down) in a full run; `TESTS_STORE_DURATIONS=1 pytest -n 2 ...` writes
# them anew. A test not in it counts as 1 s.
DURATIONS = Path(__file__).with_name("durations.json")
STORE_DURATIONS_ENV = "TESTS_STORE_DURATIONS"
_durations: dict[str, float] = {}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The quick tier (`-m "not slow"`) does not even import the slow modules: several import torch, open_clip or
    TensorFlow, seconds of each xdist worker's start."""
    if config.getoption("markexpr", "") == "not slow" and collection_path.stem in SLOW_MODULES:
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)

    if config.getoption("maxschedchunk", None) == 1:  # CI's way of handing tests out, which `scheduled` plays out
        items[:] = scheduled(items)


def test_id(nodeid: str) -> str:
    """A test's id in LONG_TESTS and DURATIONS: its node id from the tests' directory."""
    return nodeid.removeprefix("tests/")


def scheduled(items: list[pytest.Item], workers: int = 2) -> list[pytest.Item]:
    """The order for CI's `pytest -n 2 --maxschedchunk 1`: xdist then gives each worker two tests, and a worker that
    ends one starts the other and takes the next test in the order. Played out on DURATIONS, each next test is
    chosen as a worker takes it: the next of LONG_TESTS if no other worker is in one by the time it starts; beside
    one of SHIELDED, the longest test of LIGHT_MODULES left; else the longest other test left (light ones last)."""
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}

    def seconds(item: pytest.Item) -> float:
        return known.get(test_id(item.nodeid), 1.0)

    long = sorted(
        (i for i in items if test_id(i.nodeid) in LONG_TESTS), key=lambda i: LONG_TESTS.index(test_id(i.nodeid))
    )
    others = sorted((i for i in items if test_id(i.nodeid) not in LONG_TESTS), key=seconds, reverse=True)
    order: list[pytest.Item] = []
    ends: list[list[float]] = [[] for _ in range(workers)]  # when each test a worker took ends
    long_runs: list[tuple[int, float, float, str]] = []  # (worker, start, end, test) of each long test taken

    def light(item: pytest.Item) -> bool:
        return item.nodeid.split("::")[0].removeprefix("tests/").removesuffix(".py") in LIGHT_MODULES

    def take(worker: int) -> None:
        start = ends[worker][-1] if ends[worker] else 0.0
        # a long test may not start beside another, nor have one start beside it (the other worker's queued test)
        clash = bool(long) and any(
            w != worker and begin < start + seconds(long[0]) and start < end for w, begin, end, _ in long_runs
        )
        if long and (not clash or not others):
            item = long.pop(0)
        else:  # beside a shielded long test (running or due to start within it), the longest light one
            heavy = next((i for i in others if not light(i)), None)
            horizon = start + (seconds(heavy) if heavy is not None else 0.0)
            shield = any(
                name in SHIELDED and w != worker and begin < horizon and start < end
                for w, begin, end, name in long_runs
            )
            item = next((i for i in others if light(i) == shield), others[0])
            others.remove(item)
        order.append(item)
        ends[worker].append(start + seconds(item))
        if test_id(item.nodeid) in LONG_TESTS:
            long_runs.append((worker, start, ends[worker][-1], test_id(item.nodeid)))

    for worker in range(workers):  # the first two tests of each
        for _ in range(2):
            if long or others:
                take(worker)
    while long or others:
        take(min(range(workers), key=lambda w: ends[w][-2]))  # the first to end its current test
    return order


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not os.environ.get(STORE_DURATIONS_ENV):  # kept only for a run that stores them
        return
    test = test_id(report.nodeid)
    _durations[test] = _durations.get(test, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """With STORE_DURATIONS_ENV set, the run's durations replace those of its tests in DURATIONS (a partial run keeps
    the others'; xdist: its controller has every test's)."""
    if os.environ.get(STORE_DURATIONS_ENV) and not hasattr(session.config, "workerinput") and _durations:
        stored = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
        stored |= {k: round(v, 1) for k, v in _durations.items()}
        DURATIONS.write_text(json.dumps(dict(sorted(stored.items())), indent=0) + "\n")


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _saved_env.clear()
    if _session_dir is not None:
        shutil.rmtree(_session_dir, ignore_errors=True)
    if _made_run_dir:
        shutil.rmtree(os.environ.pop(RUN_SHARED_ENV), ignore_errors=True)


def run_dir() -> Path:
    """The directory every process of this test run shares (see RUN_SHARED_ENV)."""
    return Path(os.environ[RUN_SHARED_ENV])


def once_per_run(name: str, build: Callable[[Path], None]) -> Path:
    """RUN_DIR/NAME, made by `build(path)` once per test run: the first process to ask builds it, the others wait for
    it (a file lock) and get the same directory. Read it, don't write to it: another process may be reading."""
    import fcntl

    path = run_dir() / name
    with open(run_dir() / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / ".built").exists():
            shutil.rmtree(path, ignore_errors=True)  # a build that failed halfway
            path.mkdir()
            build(path)
            (path / ".built").touch()
    return path


@pytest.fixture(scope="session")
def xla_cache() -> Path:
    """The XLA cache TRAINER_COMPILE_CACHE names for the whole session (xla_cache_dir)."""
    return Path(os.environ["TRAINER_COMPILE_CACHE"])


@pytest.fixture(scope="session")
def gcs() -> Iterator[GcsEmulator]:
    """A GCS emulator for the session, with bucket "bucket"; this process's clients point at it while it runs (the
    trainer subprocesses get `gcs.env`; those reading shards through TensorFlow run under `gcs.namespaced`)."""
    emulator = GcsEmulator(("bucket",))
    saved = {name: os.environ.get(name) for name in emulator.env}
    os.environ.update(emulator.env)
    try:
        yield emulator
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        emulator.close()


@pytest.fixture
def bucket(gcs: GcsEmulator, request: pytest.FixtureRequest) -> str:
    """A fresh gs:// prefix of the emulator's bucket for one test."""
    import re
    import secrets

    return f"gs://bucket/{re.sub(r'[^A-Za-z0-9_-]+', '-', request.node.name)[:48]}-{secrets.token_hex(3)}"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """wandb offline and quiet, its files (config, cache) under the directory returned; WANDB_DIR is its host-a/."""
    root = tmp_path / "wandb-local"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "host-a"),
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(root / "config"),
        "WANDB_CACHE_DIR": str(root / "cache"),
        "WANDB_DATA_DIR": str(root / "data"),
        "WANDB_ERROR_REPORTING": "false",  # no Sentry
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # a closed local port, should anything try
        "WANDB_X_DISABLE_STATS": "true",  # system metrics probe cloud metadata servers
        "WANDB_X_DISABLE_MACHINE_INFO": "true",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield root
    import wandb

    wandb.teardown()  # the wandb-core service this test started


@pytest.fixture
def tpu_api() -> Iterator[FakeTpuApi]:
    """A started local Cloud TPU v2 API; point the client at `tpu_api.endpoint`. Every answer it gave during the test
    is then held to Google's discovery document for the API (standins/discovery.py): a stand-in that drifts from the
    real API fails the test that met the drift."""
    with held_tpu_api() as api:
        yield api


@contextlib.contextmanager
def held_tpu_api() -> Iterator[FakeTpuApi]:
    """A started local Cloud TPU v2 API whose answers are held to tpu.v2.json once it is closed (fixture tpu_api's,
    also for fixtures of a wider scope)."""
    with FakeTpuApi() as api:
        yield api
    found = reference_problems(api)
    assert not found, "the local Cloud TPU API answered unlike Google's reference:\n" + "\n".join(found[:20])


def reference_problems(api: FakeTpuApi) -> list[str]:
    """Each answer `api` gave that tpu.v2.json says the real API would not give, with the request it answered."""
    from standins import discovery

    doc = discovery.document("tpu.v2.json")
    found: dict[str, None] = {}  # each problem once, in the order met
    for answer in api.answers:
        r = answer.request
        numbers = "enum-encoding=int" in r.query.get("$alt", [""])[0]
        for problem in discovery.problems(doc, r.method, r.path, answer.status, answer.body, numbers):
            if api.beyond_reference and (
                "none of the values the reference knows" in problem or "none the reference knows" in problem
            ):
                continue
            found[f"{r.method} {r.path} -> {answer.status}: {problem}"] = None
    return list(found)


@pytest.fixture
def compute() -> Iterator[FakeComputeApi]:
    """A started local Compute Engine API with the stand-in project (no metadata): TPU VMs and their MIGs; every
    answer it gave is then held to compute.v1.json."""
    with FakeComputeApi() as api:
        api.projects[PROJECT] = {}
        yield api
    held_to_reference(api, "compute.v1.json", SERVICE_PATH, enums_as_numbers=False)


@pytest.fixture
def make_fleet() -> Iterator[Callable[..., SshFleet]]:
    """make_fleet(n) starts an n-worker sshd fleet; all are closed at teardown, also after a failure."""
    with contextlib.ExitStack() as closing:  # closes every fleet even if closing one of them raises

        def make(
            n: int,
            base_dir: Path | None = None,
            like: SshFleet | None = None,
            network: Network | None = None,
            agent: GuestAgent | None = None,
        ) -> SshFleet:
            fleet = start_fleet(n, base_dir, like, network, agent=agent)
            closing.callback(fleet.close)
            return fleet

        yield make


@pytest.fixture
def fleet(make_fleet: Callable[..., SshFleet]) -> SshFleet:
    return make_fleet(2)


@pytest.fixture
def fleet4(make_fleet: Callable[..., SshFleet]) -> SshFleet:
    return make_fleet(4)


@pytest.fixture
def make_pod(make_fleet: Callable[..., SshFleet], tpu_api: FakeTpuApi, tmp_path: Path) -> Callable[..., Pod]:
    """make_pod(n): an n-worker stand-in pod (sshd fleet + node "pod" in the local API) and a tpuctl runner."""

    def make(n: int, network: Network | None = None) -> Pod:
        return stand_in_pod(make_fleet(n, network=network), tpu_api, tmp_path / f"home{n}")

    return make


@pytest.fixture
def pod(make_pod: Callable[..., Pod]) -> Pod:
    return make_pod(2)


@pytest.fixture
def bucket_pod(make_pod: Callable[..., Pod], gcs: GcsEmulator) -> Pod:
    """A 2-worker stand-in pod whose VMs reach the GCS emulator (as TPU VMs reach Cloud Storage)."""
    return make_pod(2, network=gcs.network())


@pytest.fixture
def pod4(make_pod: Callable[..., Pod]) -> Pod:
    return make_pod(4)


def write_checkout(dest: Path) -> Path:
    """A clean checkout at `dest`: the files git tracks, as they are in this working tree (no .venv, no data/), plus
    RUN_RECIPE, the tests' tiny recipe with its first stage alone."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    one_stage = (dest / "tests" / "tiny_synthetic.toml").read_text().split("[[stages]]")[:2]
    (dest / RUN_RECIPE).write_text("[[stages]]".join(one_stage))
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_checkout(tmp_path / "project")


@pytest.fixture(scope="session")
def shard_run() -> Path:
    """A trainer run on real image shards (two stages, zero-shot and retrieval evals), its first stage started from an
    imported open_clip model (test_convert.train_from_an_import): made once per test run, for test_real_data and
    test_convert to read. Its directory holds data/ (the shards, recipe.toml and the run's workdir, data/run),
    imported/, args.json (the --set words it trained with) and out.txt. Copy it before writing to it."""

    def build(root: Path) -> None:
        from test_convert import train_from_an_import

        train_from_an_import(root)

    return once_per_run("shard-run", build)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every stand-in worker sees at the same path (their /tmp is their own), as a bucket mount would be."""
    path = Path(tempfile.mkdtemp(prefix="tpuctl-shared-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
