"""The deployment files agree with the code: compose services, Dockerfiles, .env.example, docs.

Nothing here runs Docker; the files are parsed and checked against the real CLI parser and the
real settings classes, so renaming a command or a setting breaks these tests.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.main import build_parser
from service.jobs import JobLimits
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
API_DOCKERFILE = ROOT / "docker" / "Dockerfile.api"
WORKER_DOCKERFILE = ROOT / "docker" / "Dockerfile.worker"
OPERATIONS_DOC = ROOT / "docs" / "OPERATIONS.md"
CONFIGURATION_DOC = ROOT / "docs" / "CONFIGURATION.md"

SERVICES = ("postgres", "redis", "migrate", "api", "worker")
# ${VAR}, ${VAR:-default}, ${VAR:?error} or $VAR, but not the $$ escape.
COMPOSE_VARIABLE = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")
ENV_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=", re.MULTILINE)
CUDA_TORCH_INDEX = re.compile(r"download\.pytorch\.org/whl/cu\d+")
CPU_TORCH_INDEX = "download.pytorch.org/whl/cpu"


def real_settings() -> set[str]:
    """Every environment variable the service reads: GRALORA_ + a Settings/JobLimits field."""
    fields = set(Settings.model_fields) | set(JobLimits.model_fields)
    return {f"GRALORA_{name.upper()}" for name in fields}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def env_example_assignments() -> dict[str, str]:
    """NAME -> value for the uncommented assignments in .env.example."""
    return {m.group(1): line.split("=", 1)[1]
            for line in ENV_EXAMPLE.read_text().splitlines()
            if (m := ENV_ASSIGNMENT.match(line))}


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, as a dict whether written as a mapping or a list."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def interpolate(text: str) -> str:
    """`text` with ${VAR...} filled in as compose would from .env.example ($$ left alone)."""
    env = env_example_assignments()

    def value(match: re.Match[str]) -> str:
        name, operator, word = match.group(1), match.group(2) or "", match.group(3) or ""
        if name in env and (env[name] or operator not in (":-", ":?")):
            return env[name]
        if operator in (":-", "-"):
            return word
        raise AssertionError(f"${{{name}}} has no value: {word or 'unset'}")

    return re.sub(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?([^}]*)\}", value, text)


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read_only) for a service's short-syntax volumes."""
    result = {}
    for entry in service.get("volumes", []):
        source, target, *options = interpolate(entry).split(":")
        result[target] = (source, "ro" in options)
    return result


def as_argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def parse_gralora(argv: list[str]) -> Any:
    """Parse a `gralora ...` command line with the real parser; fail the test if it refuses."""
    assert argv and argv[0] == "gralora", f"not a gralora command: {argv}"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"`{shlex.join(argv)}` is not a valid gralora command (exit {exc.code})")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with backslash continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    pairs = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def exec_form(arguments: str) -> list[str]:
    """The argv of an exec-form instruction (`["a", "b"]`)."""
    argv = json.loads(arguments)
    assert isinstance(argv, list), f"not exec form: {arguments}"
    return [str(a) for a in argv]


def last(path: Path, instruction: str) -> str:
    found = [args for name, args in dockerfile_instructions(path) if name == instruction]
    assert found, f"{path.name} has no {instruction}"
    return found[-1]


# --- services, dependencies, healthchecks ----------------------------------------------------

def test_all_services_are_defined(services: dict[str, Any]) -> None:
    missing = [name for name in SERVICES if name not in services]
    assert not missing, f"docker-compose.yml lacks services {missing}"


@pytest.mark.parametrize("name", ["postgres", "redis", "api"])
def test_long_running_backends_have_healthchecks(services: dict[str, Any], name: str) -> None:
    check = services[name].get("healthcheck") or {}
    assert check.get("test"), f"{name} has no healthcheck"
    assert not check.get("disable"), f"{name} disables its healthcheck"


def test_healthchecks_probe_the_right_thing(services: dict[str, Any]) -> None:
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert as_argv(services["redis"]["healthcheck"]["test"])[1:] == ["redis-cli", "ping"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])


def test_images_are_pinned_to_major_versions(services: dict[str, Any]) -> None:
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")


def test_redis_persists_with_append_only_file(services: dict[str, Any]) -> None:
    argv = as_argv(services["redis"]["command"])
    assert "--appendonly" in argv and argv[argv.index("--appendonly") + 1] == "yes"
    assert "/data" in mounts(services["redis"])


def test_postgres_keeps_its_data_in_a_volume(services: dict[str, Any]) -> None:
    assert "/var/lib/postgresql/data" in mounts(services["postgres"])


def test_migrate_is_one_shot_after_postgres(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert str(migrate.get("restart", "no")) in ("no", "False", "false"), \
        "a one-shot migration must not be restarted"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_api_and_worker_wait_for_migration_and_redis(services: dict[str, Any],
                                                     name: str) -> None:
    depends = services[name]["depends_on"]
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert depends["redis"]["condition"] == "service_healthy"


def test_worker_reserves_nvidia_gpus(services: dict[str, Any]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities",
                                                                               [])]
    assert gpus, "the worker reserves no nvidia GPU"
    for device in gpus:
        assert device.get("count") == "all" or isinstance(device.get("count"), int) \
            or device.get("device_ids"), f"GPU reservation names no count or ids: {device}"


def test_a_worker_that_sees_every_gpu_trains_on_one(services: dict[str, Any]) -> None:
    # One job per worker, one worker per GPU: with `count: all` the worker must pick its GPU.
    for name, service in services.items():
        devices = (service.get("deploy", {}).get("resources", {}).get("reservations", {})
                   .get("devices", []))
        if any(d.get("count") == "all" for d in devices):
            visible = environment(service).get("CUDA_VISIBLE_DEVICES", "")
            assert re.fullmatch(r"\d+", visible), \
                f"{name} sees every GPU but CUDA_VISIBLE_DEVICES={visible!r} names not one"


def test_api_is_published_on_its_port(services: dict[str, Any]) -> None:
    ports = [str(p) for p in services["api"]["ports"]]
    assert any(p.endswith(":8000") for p in ports), ports


# --- environment and volumes -----------------------------------------------------------------

def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = {source for service in services.values()
            for source, _ in mounts(service).values()
            if not source.startswith(("/", ".", "~"))}
    assert used, "no named volumes used"
    assert used <= declared, f"volumes used but not declared: {sorted(used - declared)}"


@pytest.mark.parametrize("name", ["migrate", "api", "worker"])
def test_service_containers_get_production_urls(services: dict[str, Any], name: str) -> None:
    env = environment(services[name])
    assert env["GRALORA_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["GRALORA_DATABASE_URL"]
    assert env["GRALORA_BROKER_URL"] == "redis://redis:6379/0"


def test_compose_environment_names_only_real_settings(services: dict[str, Any]) -> None:
    names = {key for service in services.values() for key in environment(service)
             if key.startswith("GRALORA_")}
    unknown = names - real_settings()
    assert not unknown, f"docker-compose.yml sets unknown settings {sorted(unknown)}"


def test_artifacts_are_shared_and_read_only_in_the_api(services: dict[str, Any]) -> None:
    api, worker = services["api"], services["worker"]
    artifacts_dir = environment(worker)["GRALORA_ARTIFACTS_DIR"]
    assert environment(api)["GRALORA_ARTIFACTS_DIR"] == artifacts_dir
    worker_source, worker_ro = mounts(worker)[artifacts_dir]
    api_source, api_ro = mounts(api)[artifacts_dir]
    assert worker_source == api_source, "the API must read the volume the worker writes"
    assert not worker_ro and api_ro


@pytest.mark.parametrize("variable", ["GRALORA_CHECKPOINTS_DIR", "GRALORA_CACHE_DIR",
                                      "HF_HOME"])
def test_worker_state_lives_in_volumes(services: dict[str, Any], variable: str) -> None:
    worker = services["worker"]
    path = environment(worker)[variable]
    assert path in mounts(worker), f"{variable}={path} is not a mounted volume in the worker"
    assert not mounts(worker)[path][1], f"{variable} must be writable"


@pytest.mark.parametrize("name", ["api", "worker"])
@pytest.mark.parametrize("variable", ["GRALORA_MODEL_ROOTS", "GRALORA_DATASET_ROOTS"])
def test_model_and_dataset_roots_are_mounted(services: dict[str, Any], name: str,
                                             variable: str) -> None:
    service = services[name]
    for root in environment(service)[variable].split(","):
        assert root in mounts(service), f"{name}: {variable} root {root} is not mounted"


def test_every_compose_variable_is_in_env_example() -> None:
    used = {a or b for a, b in COMPOSE_VARIABLE.findall(COMPOSE_FILE.read_text())}
    assert used, "the pattern found no variables at all"
    missing = used - set(env_example_assignments())
    assert not missing, f".env.example does not define {sorted(missing)}"


def test_env_example_names_only_real_settings() -> None:
    mentioned = set(re.findall(r"\bGRALORA_[A-Z0-9_]+", ENV_EXAMPLE.read_text()))
    assert mentioned
    unknown = mentioned - real_settings()
    assert not unknown, f".env.example mentions settings the code does not read: {unknown}"


def test_env_example_secrets_are_placeholders() -> None:
    assignments = env_example_assignments()
    assert assignments["POSTGRES_PASSWORD"] == "change-me"


def test_variable_pattern_skips_escapes_and_finds_defaults() -> None:
    text = 'a: ${ONE:-x} $TWO $${NOT_ME} ${THREE:?err}'
    assert {a or b for a, b in COMPOSE_VARIABLE.findall(text)} == {"ONE", "TWO", "THREE"}


def test_interpolation_uses_env_example_then_defaults() -> None:
    assert interpolate("${POSTGRES_PASSWORD:?set it}") == "change-me"
    assert interpolate("${NOT_IN_ENV_EXAMPLE:-./x}:/y") == "./x:/y"
    assert interpolate("$${KEEP}") == "$${KEEP}"
    with pytest.raises(AssertionError):
        interpolate("${NOT_IN_ENV_EXAMPLE:?needed}")


# --- commands ---------------------------------------------------------------------------------

def test_compose_commands_are_real_subcommands(services: dict[str, Any]) -> None:
    migrate = parse_gralora(as_argv(services["migrate"]["command"]))
    assert migrate.command == "migrate"
    api = parse_gralora(as_argv(services["api"]["command"]))
    assert (api.command, api.host, api.port) == ("api", "0.0.0.0", 8000)
    worker = parse_gralora(as_argv(services["worker"]["command"]))
    assert worker.command == "worker"


def test_a_renamed_command_would_be_caught() -> None:
    with pytest.raises(pytest.fail.Exception):
        parse_gralora(["gralora", "run-api"])


def test_dockerfile_commands_match_compose(services: dict[str, Any]) -> None:
    for path, name in ((API_DOCKERFILE, "api"), (WORKER_DOCKERFILE, "worker")):
        argv = exec_form(last(path, "CMD"))
        parsed = parse_gralora(argv)
        assert parsed.command == name, f"{path.name} CMD runs {parsed.command}, not {name}"
        assert argv == as_argv(services[name]["command"]), \
            f"{path.name} CMD and the compose {name} command differ"


@pytest.mark.parametrize("path", [API_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_images_run_as_a_non_root_user(path: Path) -> None:
    user = last(path, "USER").split(":")[0]
    assert user not in ("root", "0"), f"{path.name} runs as root"


def test_api_image_checks_health_on_healthz() -> None:
    assert "/healthz" in last(API_DOCKERFILE, "HEALTHCHECK")
    from api.routes.health import router

    assert "/healthz" in {getattr(route, "path", None) for route in router.routes}


def test_api_image_uses_cpu_torch_only() -> None:
    text = API_DOCKERFILE.read_text()
    assert last(API_DOCKERFILE, "FROM").startswith("python:3.11-slim")
    assert CPU_TORCH_INDEX in text
    assert "constraints-cpu.txt" in text
    assert not CUDA_TORCH_INDEX.search(text), "Dockerfile.api installs a CUDA torch build"


def test_worker_image_uses_cuda_torch() -> None:
    instructions = dockerfile_instructions(WORKER_DOCKERFILE)
    text = WORKER_DOCKERFILE.read_text()
    assert CUDA_TORCH_INDEX.search(text), "Dockerfile.worker installs no CUDA torch build"
    assert CPU_TORCH_INDEX not in text
    base = next(args for name, args in instructions if name == "FROM")
    args = {k: v for name, a in instructions if name == "ARG" and "=" in a
            for k, v in [a.split("=", 1)]}
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), base)
    assert base.startswith("nvidia/cuda:"), f"the worker is not built on a CUDA image: {base}"
    assert "python3.11" in text
    assert "HF_HOME" in text


@pytest.mark.parametrize("path", [API_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_images_copy_the_migrations(path: Path) -> None:
    # `gralora migrate` reads migrations/ beside the installed packages (service/schema.py).
    copied = [args for name, args in dockerfile_instructions(path) if name == "COPY"]
    assert any(args.split()[0] == "migrations" for args in copied)
    assert re.search(r"pip install[^\n]* -e \.", path.read_text()), \
        "a non-editable install loses migrations/"


# --- documentation -----------------------------------------------------------------------------

def test_operations_doc_commands_are_real() -> None:
    # `gralora ...` at the start of a code line or after a compose service name (`run api ...`).
    pattern = re.compile(r"(?:^\s*|\s(?:api|worker|migrate)\s+)(gralora\s+[^#|>\n]*)")
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", OPERATIONS_DOC.read_text(), re.S | re.M)
    commands = [shlex.split(match.group(1)) for block in blocks
                for line in block.splitlines() if (match := pattern.search(line))]
    assert len(commands) >= 5, f"too few gralora commands found in OPERATIONS.md: {commands}"
    for argv in commands:
        parse_gralora(argv)


def test_configuration_doc_lists_every_setting() -> None:
    text = CONFIGURATION_DOC.read_text()
    missing = sorted(name for name in real_settings() if f"`{name}`" not in text)
    assert not missing, f"docs/CONFIGURATION.md does not document {missing}"
    documented = set(re.findall(r"`(GRALORA_[A-Z0-9_]+)`", text))
    assert documented <= real_settings(), \
        f"docs/CONFIGURATION.md documents unknown settings {documented - real_settings()}"
