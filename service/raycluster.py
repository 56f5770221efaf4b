"""Joining a running Ray cluster: its address, the token its authentication asks for, and an
error that says what to set when the join cannot work. Imports nothing from ``workers/``.

Token authentication (Ray 2.60). A head node turns it on when ``RAY_AUTH_MODE=token`` or,
with the variable unset, when a token file exists (``ray start --head`` since 2.59; any
local ``ray.init()`` writes ``~/.ray/auth_token``). ``ray.init(address=...)`` attaches the
token only when ``RAY_AUTH_MODE=token`` is set in the driver's own environment (ray#64755),
so a driver that holds the cluster's token was refused with a screen of gcs_client retries
and "Failed to connect". ``join_cluster`` finds the token where Ray would read it, turns
token mode on for this process when ``RAY_AUTH_MODE`` is unset and a token exists (a cluster
without authentication ignores the token), and asks the GCS once, before ``ray.init``,
whether it accepts this driver, so a refusal becomes one message.

Where Ray looks for the token, first found wins (``AuthenticationTokenLoader``):

    RAY_AUTH_TOKEN        the token itself, if non-empty
    RAY_AUTH_TOKEN_PATH   a file whose first line is the token (unreadable or empty: an error)
    ~/.ray/auth_token     ($HOME's), first line
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import ray

log = logging.getLogger(__name__)

AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
# How long the GCS has to answer the check; ray.init itself retries for about 20 s.
PROBE_TIMEOUT_S = 15.0
_WHERE = (
    f"{AUTH_TOKEN} (the token), {AUTH_TOKEN_PATH} (a file holding it) or ~/.ray/auth_token; "
    "`ray get-auth-token` on the head node prints it (deploy/README.md, 'Token authentication')"
)


class RayConnectError(ConnectionError):
    """The driver cannot join the cluster; the message says what to set."""


@dataclass(frozen=True)
class Token:
    """An authentication token and where it was found (the value never shows in a repr)."""

    value: str = field(repr=False)
    source: str


def _first_line(path: Path) -> str:
    with path.open() as f:
        return f.readline().strip()


def find_token(env: Mapping[str, str], home: Path) -> Token | None:
    """The token Ray would send, looked up in Ray's order; None when there is none.

    Raises:
        RayConnectError: ``RAY_AUTH_TOKEN_PATH`` is set but its file cannot be read or is
            empty (Ray aborts the process on that).
    """
    if env.get(AUTH_TOKEN, "").strip():
        return Token(env[AUTH_TOKEN].strip(), AUTH_TOKEN)
    named = env.get(AUTH_TOKEN_PATH, "")
    if named:
        try:
            value = _first_line(Path(named))
        except OSError as exc:
            raise RayConnectError(
                f"{AUTH_TOKEN_PATH}={named} names a file that cannot be read "
                f"({exc.strerror}): point it at a file holding the cluster's token, or unset it"
            ) from exc
        if not value:
            raise RayConnectError(
                f"{AUTH_TOKEN_PATH}={named} names an empty file: put the cluster's token in "
                "it, or unset it"
            )
        return Token(value, f"{AUTH_TOKEN_PATH}={named}")
    default = home / ".ray" / "auth_token"
    try:
        value = _first_line(default)
    except OSError:
        return None
    return Token(value, str(default)) if value else None


def probe(gcs_address: str, timeout: float = PROBE_TIMEOUT_S) -> grpc.StatusCode:
    """Ask the GCS for the cluster id as ``ray.init`` does first; the answer's status code.

    The channel is Ray's own (TLS from ``RAY_USE_TLS``, the token attached when token mode is
    on in this process), so the answer is the one ``ray.init`` would get.
    """
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    channel = init_grpc_channel(gcs_address)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        # wait_for_ready: a GCS that is still starting gets the whole timeout to answer.
        stub.GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(),  # type: ignore[attr-defined]  # generated
            timeout=timeout,
            wait_for_ready=True,
        )
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


def _enable_token_mode() -> None:
    """``RAY_AUTH_MODE=token`` for this process and its children, as Ray sets it itself."""
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()


def _refusal(gcs: str, mode: str, token: Token | None) -> str:
    """Why the GCS at ``gcs`` refused this driver, and what to set."""
    if mode == "disabled":
        return (
            f"the Ray cluster at {gcs} requires an authentication token, and "
            f"{AUTH_MODE}=disabled in this environment keeps it from being sent: unset "
            f"{AUTH_MODE} (or set it to token) and make the cluster's token available in {_WHERE}"
        )
    if token is None:
        return (
            f"the Ray cluster at {gcs} requires an authentication token and none was found: "
            f"set {_WHERE}"
        )
    return (
        f"the Ray cluster at {gcs} refused the authentication token from {token.source}: it is "
        f"not this cluster's token. Set the cluster's token in {_WHERE}"
    )


def _gcs_address(address: str) -> str:
    """``host:port`` of the GCS that ``ray.init(address=address)`` will dial."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        gcs = canonicalize_bootstrap_address(address)
    except ConnectionError as exc:  # "auto" and no cluster started on this machine
        raise RayConnectError(
            f"trainer.ray_address={address!r}: {exc} Start one with `ray start --head`, or "
            "leave trainer.ray_address empty to start a local Ray"
        ) from exc
    if gcs is None:
        raise ValueError(f"`trainer.ray_address` names no cluster. Received: {address!r}")
    return gcs


def join_cluster(address: str, env: Mapping[str, str] | None = None) -> None:
    """``ray.init(address=address)`` with the cluster's token when it asks for one.

    Args:
        address: ``host:port`` of the head's GCS, ``auto`` (the cluster ``ray start``
            started on this machine, or ``RAY_ADDRESS``) or ``ray://...`` (Ray Client,
            passed to Ray untouched).
        env: the environment read for ``RAY_AUTH_*`` and ``HOME``; ``os.environ`` by default.

    Raises:
        RayConnectError: no cluster answers at ``address``, or it refuses this driver (no
            token, a wrong one, or ``RAY_AUTH_MODE=disabled``); the message says what to set.
    """
    env = os.environ if env is None else env
    mode = env.get(AUTH_MODE, "").strip().lower()
    if address.startswith("ray://") or mode not in ("", "token", "disabled"):
        ray.init(address=address, log_to_driver=True)
        return
    gcs = _gcs_address(address)
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    token = None if mode == "disabled" else find_token(env, home)
    if mode == "token" and token is None:
        raise RayConnectError(
            f"{AUTH_MODE}=token but no authentication token was found for the Ray cluster at "
            f"{gcs}: set {_WHERE}"
        )
    if token is not None and mode == "":
        # What `ray start --head` does on finding a token, and what ray.init skips for an
        # explicit address; a cluster without authentication ignores the token.
        _enable_token_mode()
    code = probe(gcs)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        raise RayConnectError(_refusal(gcs, mode, token))
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        raise RayConnectError(
            f"no Ray cluster answered at {gcs} (trainer.ray_address={address!r}) within "
            f"{PROBE_TIMEOUT_S:.0f} s: start one with `ray start --head`, or leave "
            "trainer.ray_address empty to start a local Ray"
        )
    log.info(
        "joining the Ray cluster at %s (%s)",
        gcs,
        f"authentication token from {token.source}" if token else "no authentication token",
    )
    ray.init(address=address, log_to_driver=True)
