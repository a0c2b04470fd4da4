"""The `shared_state:` config section: absent = one replica alone; bad values name the field."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from router.config import ConfigError, parse_config
from router.shared_state.settings import SharedStateSettings, url_problem


def test_absent_section_means_no_shared_state() -> None:
    assert parse_config("seed: 1").shared_state is None


def test_section_with_defaults() -> None:
    s = parse_config("shared_state: {url: 'redis://10.0.0.5:6380/2', prefix: fleet}").shared_state
    assert s == SharedStateSettings(url="redis://10.0.0.5:6380/2", prefix="fleet")


@pytest.mark.parametrize(
    ("yaml", "names"),
    [
        ("shared_state: {backend: memcached}", ["shared_state.backend", "'redis'", "'valkey'"]),
        ("shared_state: {url: 'http://127.0.0.1:6379'}", ["shared_state.url", "scheme"]),
        ("shared_state: {url: 'redis://127.0.0.1:port/0'}", ["shared_state.url"]),
        ("shared_state: {url: 'redis://:6379/0'}", ["shared_state.url", "no host"]),
        ("shared_state: {url: 'redis://h:6379/zero'}", ["shared_state.url", "'zero'"]),
        ("shared_state: {lease_s: 0}", ["shared_state.lease_s"]),
        ("shared_state: {lease_s: 1, heartbeat_s: 2}", ["shared_state.heartbeat_s"]),
        ("shared_state: {leese_s: 3}", ["shared_state.leese_s", "lease_s"]),
    ],
)
def test_bad_values_are_config_errors_naming_the_field(yaml: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("\n" + yaml, "router.yaml")
    msg = str(e.value)
    assert msg.startswith("router.yaml:2:")
    for name in names:
        assert name in msg


@given(
    scheme=st.sampled_from(["redis", "rediss"]),
    host=st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True),
    port=st.none() | st.integers(1, 65535),
    db=st.none() | st.integers(0, 15),
)
def test_every_well_formed_redis_url_is_accepted(
    scheme: str, host: str, port: int | None, db: int | None
) -> None:
    url = f"{scheme}://{host}" + (f":{port}" if port else "") + (f"/{db}" if db is not None else "")
    assert url_problem(url) is None
    assert SharedStateSettings(url=url).url == url


@given(st.text(max_size=40))
def test_text_without_a_redis_scheme_is_refused(text: str) -> None:
    assume(not text.startswith(("redis://", "rediss://", "unix://")))
    assert url_problem(text) is not None
