"""service/raycluster.py without a cluster: where the token is found, and what each refusal
says (the GCS's answer stubbed). tests/service/test_raycluster_cli.py joins a real one."""

import grpc
import pytest
import ray

from service import raycluster
from service.raycluster import RayConnectError, Token, find_token, join_cluster

GCS = "127.0.0.1:6391"


def write_token(home, text):
    path = home / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- find_token


def test_no_token_anywhere(tmp_path):
    assert find_token({}, tmp_path) is None


def test_the_default_file_first_line_trimmed(tmp_path):
    path = write_token(tmp_path, "  abc123 \nsecond line\n")
    assert find_token({}, tmp_path) == Token("abc123", str(path))


def test_an_empty_default_file_is_no_token(tmp_path):
    write_token(tmp_path, "\n")
    assert find_token({}, tmp_path) is None


def test_the_path_variable_beats_the_default_file(tmp_path):
    write_token(tmp_path, "from-home")
    named = tmp_path / "cluster.token"
    named.write_text("from-path\n")
    token = find_token({"RAY_AUTH_TOKEN_PATH": str(named)}, tmp_path)
    assert token == Token("from-path", f"RAY_AUTH_TOKEN_PATH={named}")


def test_the_token_variable_beats_both(tmp_path):
    write_token(tmp_path, "from-home")
    named = tmp_path / "cluster.token"
    named.write_text("from-path")
    env = {"RAY_AUTH_TOKEN": " from-env ", "RAY_AUTH_TOKEN_PATH": str(named)}
    assert find_token(env, tmp_path) == Token("from-env", "RAY_AUTH_TOKEN")


def test_an_empty_token_variable_is_skipped_as_ray_skips_it(tmp_path):
    path = write_token(tmp_path, "from-home")
    assert find_token({"RAY_AUTH_TOKEN": ""}, tmp_path) == Token("from-home", str(path))


@pytest.mark.parametrize("content", [None, "", "\n \n"])
def test_a_path_variable_naming_no_token_is_an_error(tmp_path, content):
    named = tmp_path / "cluster.token"
    if content is not None:
        named.write_text(content)
    write_token(tmp_path, "from-home")  # Ray does not fall back to it either
    with pytest.raises(RayConnectError, match=f"RAY_AUTH_TOKEN_PATH={named}"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(named)}, tmp_path)


def test_the_token_never_shows_in_a_repr():
    assert "s3cret" not in repr(Token("s3cret", "RAY_AUTH_TOKEN"))


# ---------------------------------------------------------------- join_cluster


@pytest.fixture
def cluster(monkeypatch):
    """A stub GCS at GCS answering ``cluster.answer``; records what join_cluster did."""

    class Stub:
        answer = grpc.StatusCode.OK
        token_mode = False
        probed = 0
        joined: list[str] = []

    stub = Stub()

    def probe(gcs):
        assert gcs == GCS
        stub.probed += 1
        return stub.answer

    def enable():
        stub.token_mode = True

    monkeypatch.setattr(raycluster, "_gcs_address", lambda address: GCS)
    monkeypatch.setattr(raycluster, "probe", probe)
    monkeypatch.setattr(raycluster, "_enable_token_mode", enable)
    monkeypatch.setattr(raycluster.ray, "init", lambda address, **kw: stub.joined.append(address))
    stub.joined = []
    return stub


def test_a_token_in_the_default_file_is_sent_when_the_mode_is_unset(tmp_path, cluster):
    write_token(tmp_path, "t")
    join_cluster(GCS, env={"HOME": str(tmp_path)})
    assert cluster.token_mode and cluster.joined == [GCS]


def test_without_a_token_the_driver_joins_an_open_cluster_as_before(tmp_path, cluster):
    join_cluster("auto", env={"HOME": str(tmp_path)})
    assert not cluster.token_mode and cluster.joined == ["auto"]


def test_an_explicit_token_mode_is_left_to_ray(tmp_path, cluster):
    write_token(tmp_path, "t")
    join_cluster(GCS, env={"HOME": str(tmp_path), "RAY_AUTH_MODE": "token"})
    assert not cluster.token_mode and cluster.joined == [GCS]  # already on: Ray sends it


def test_a_cluster_that_wants_a_token_and_none_found(tmp_path, cluster):
    cluster.answer = grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(RayConnectError) as err:
        join_cluster(GCS, env={"HOME": str(tmp_path)})
    message = str(err.value)
    assert f"the Ray cluster at {GCS} requires an authentication token and none was found" in (
        message
    )
    for where in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token", "get-auth-token"):
        assert where in message
    assert cluster.joined == []


def test_a_wrong_token_is_named_by_where_it_came_from(tmp_path, cluster):
    cluster.answer = grpc.StatusCode.UNAUTHENTICATED
    write_token(tmp_path, "right-one-elsewhere")
    with pytest.raises(
        RayConnectError, match="refused the authentication token from RAY_AUTH_TOKEN:"
    ):
        join_cluster(GCS, env={"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "old"})
    assert cluster.joined == []


def test_auth_mode_disabled_is_named_when_the_cluster_wants_a_token(tmp_path, cluster):
    cluster.answer = grpc.StatusCode.UNAUTHENTICATED
    write_token(tmp_path, "t")
    with pytest.raises(RayConnectError, match="RAY_AUTH_MODE=disabled in this environment"):
        join_cluster(GCS, env={"HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"})
    assert not cluster.token_mode


def test_token_mode_without_a_token_fails_before_asking(tmp_path, cluster):
    with pytest.raises(RayConnectError, match="RAY_AUTH_MODE=token but no authentication token"):
        join_cluster(GCS, env={"HOME": str(tmp_path), "RAY_AUTH_MODE": "Token"})
    assert cluster.probed == 0


@pytest.mark.parametrize("answer", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_no_cluster_at_the_address(tmp_path, cluster, answer):
    cluster.answer = answer
    with pytest.raises(RayConnectError, match=f"no Ray cluster answered at {GCS}"):
        join_cluster(GCS, env={"HOME": str(tmp_path)})


def test_the_cli_prints_one_line_and_exits_2(tmp_path, cluster, monkeypatch, capsys):
    from service.cli import main

    cluster.answer = grpc.StatusCode.UNAUTHENTICATED
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    # The suite's in-process Ray (another test's fixture) must not stand in for the cluster.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    argv = ["demo", "--trainer.ray-address", GCS, "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 2
    last, *before = reversed(capsys.readouterr().err.splitlines())
    assert last.startswith("streamtrain: error: the Ray cluster at"), last
    assert [line for line in before if "error" in line.lower()] == []
