import pytest

from routerq.api.auth import OPEN_TENANT, Tokens, token_hash
from routerq.api.server import check_auth
from routerq.core.errors import SettingsError
from routerq.core.settings import DEFAULT_MAX_UPLOAD_MB, Settings


def test_each_token_is_its_own_tenant_named_by_its_hash_never_by_the_token() -> None:
    tokens = Tokens(["alpha", "beta"])
    a, b = tokens.tenant("Bearer alpha"), tokens.tenant("bearer beta")
    assert a and b and a != b
    assert "alpha" not in a and a == token_hash("alpha")[:32]


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer gamma", "Basic alpha", "alpha"])
def test_a_missing_or_unknown_token_has_no_tenant(header: str | None) -> None:
    assert Tokens(["alpha"]).tenant(header) is None


def test_without_tokens_every_caller_is_the_one_open_tenant() -> None:
    assert Tokens([]).tenant(None) == OPEN_TENANT


def test_serve_needs_tokens_or_an_explicit_no_auth_and_no_auth_only_on_loopback() -> None:
    with pytest.raises(SettingsError, match="ROUTERQ_API_KEYS is not set"):
        check_auth(Settings(), "127.0.0.1", no_auth=False)
    with pytest.raises(SettingsError, match="loopback"):
        check_auth(Settings(), "0.0.0.0", no_auth=True)
    with pytest.raises(SettingsError, match="choose one"):
        check_auth(Settings(ROUTERQ_API_KEYS="t"), "127.0.0.1", no_auth=True)  # type: ignore[call-arg]
    assert not check_auth(Settings(), "::1", no_auth=True).required
    assert check_auth(Settings(ROUTERQ_API_KEYS="t1, t2"), "0.0.0.0", no_auth=False).required  # type: ignore[call-arg]


def test_the_upload_limit_is_openais_200_mb_unless_set() -> None:
    assert DEFAULT_MAX_UPLOAD_MB == 200 and Settings().max_upload_mb == 200
