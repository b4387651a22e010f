"""What ships beside the code agrees with it: the compose file, the configuration page, settings'
repr. Pure file and model checks: no services."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from routerq.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_settings_repr_hides_secrets() -> None:
    secrets = {
        "OPENROUTER_API_KEY": "sk-or-v1-secret-key",
        "REDIS_PASSWORD": "redis-secret",
        "PHOENIX_API_KEY": "phoenix-secret",
        "ROUTERQ_API_KEYS": "token-secret",
    }
    settings = Settings(**secrets)  # type: ignore[arg-type]
    assert "redis-secret" in settings.redis_url  # REDIS_PASSWORD goes into the URL the clients use
    shown = repr(settings) + str(settings)
    for value in secrets.values():
        assert value not in shown  # the URL holding the password is not shown either
    dumped = str(settings.model_dump(exclude={"redis_url"}))
    assert not any(value in dumped for value in secrets.values())


def test_compose_file_wires_the_same_settings_the_code_reads() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    known = {field.alias for field in Settings.model_fields.values()}
    worker_env = services["worker"]["environment"]
    assert set(worker_env) <= known, set(worker_env) - known
    assert {"REDIS_URL", "OPENROUTER_API_KEY", "PHOENIX_COLLECTOR_ENDPOINT"} <= set(worker_env)
    assert "${REDIS_PASSWORD" in worker_env["REDIS_PASSWORD"] and "@" not in worker_env["REDIS_URL"]
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    api_env = services["api"]["environment"]
    assert set(api_env) <= known, set(api_env) - known
    assert "${ROUTERQ_API_KEYS:?" in api_env["ROUTERQ_API_KEYS"]  # never an open API from compose
    assert ":latest" not in services["phoenix"]["image"]

    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--requirepass" in redis_command
    assert "noeviction" in redis_command
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port} is published beyond loopback"
    assert services["phoenix"]["image"].startswith("arizephoenix/phoenix")
    phoenix_env = services["phoenix"]["environment"]
    assert phoenix_env["PHOENIX_POSTGRES_HOST"] == "postgres" and "postgres" in services
    assert services["phoenix"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "${POSTGRES_PASSWORD" in phoenix_env["PHOENIX_POSTGRES_PASSWORD"]
    assert "PHOENIX_DEFAULT_RETENTION_POLICY_DAYS" in phoenix_env
    assert services["worker"]["build"] == "."
    assert "deploy" not in services["worker"] or "replicas" not in services["worker"]["deploy"]


@pytest.mark.parametrize("name", ["docs/configuration.md"])
def test_the_configuration_page_lists_every_setting(name: str) -> None:
    readme = (ROOT / name).read_text()
    for field in Settings.model_fields.values():
        assert f"`{field.alias}`" in readme, f"{field.alias} is not documented in {name}"
