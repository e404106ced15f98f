"""A real ShardServer behind CURVE: only allowed clients are ever handled (127.0.0.1, real sockets)."""
import dataclasses

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from common import protocol as proto
from common.config import ClientSettings, CoordinatorSettings, ServerSettings
from common.control import CoordinatorLink
from common.errors import DeadlineExceeded
from common.plan import PartitionPlan
from common.protocol import MsgType
from common.security import Authenticator, CurveKeys, generate, secure_client
from common.transport import make_dealer, make_router
from ps.coordinator import Coordinator
from ps.server import ShardServer
from worker.client import PSClient

pytestmark = pytest.mark.timeout(60)

FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
          | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@pytest.fixture
def keydir(tmp_path):
    return generate(str(tmp_path / "keys"), clients=1)["folder"]


def test_curve_shard_server_handles_only_allowed_clients(keydir, tmp_path):
    keys = CurveKeys.load(keydir)
    stranger = CurveKeys.load(generate(str(tmp_path / "other"))["folder"])
    settings = ServerSettings(num_servers=1, num_workers=1, staleness=1, curve_keys=keydir)
    ctx = zmq.Context()
    auth = Authenticator(ctx, keys).start()
    sock = make_router(ctx, settings.bind, settings.transport, keys)
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | FAILED)  # before the server thread owns it
    server = ShardServer(settings, ctx, sock=sock, authenticator=auth).run_in_background()
    bad = []
    try:
        # (b) plain text, (c) a key pair not in the allow-list, (d) the wrong server key
        bad.append(make_dealer(ctx, server.endpoint))
        bad.append(make_dealer(ctx, server.endpoint,
                               keys=dataclasses.replace(stranger, server_public=keys.server_public)))
        bad.append(make_dealer(ctx, server.endpoint,
                               keys=dataclasses.replace(keys, server_public=stranger.server_public)))
        events = []
        for s in bad:
            s.send_multipart(proto.encode(MsgType.STATS, {"rid": 1}))
        for _ in bad:
            assert mon.poll(5000), "a refused handshake was not reported"
            events.append(recv_monitor_message(mon)["event"])
        assert sorted(events) == sorted([zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                                         zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL])
        for s in bad:
            assert not s.poll(200)  # no reply ever
        stats = server.snapshot_stats()
        assert stats["requests"] == 0 and stats["curve"] is True
        assert stats["auth"]["denied"] == 1 and stats["auth"]["allowed"] == 0

        # an allowed worker is served
        plan = PartitionPlan.build([("w", (128,), "float32")], 1, frame_elems=64)
        with PSClient([server.endpoint], 0, settings=ClientSettings(frame_elems=64, curve_keys=keydir)) as c:
            assert c.hello(plan, timeout=10)[0]["rank"] == 0
        stats = server.snapshot_stats()
        assert stats["requests"] >= 1 and stats["auth"]["allowed"] == 1
    finally:
        for s in bad:
            s.close(linger=0)
        sock.disable_monitor()
        mon.close(linger=0)
        assert server.shutdown(5)
        assert auth.stop(5)
        ctx.term()


def test_plain_client_cannot_reach_curve_server(keydir):
    server = ShardServer(ServerSettings(num_servers=1, num_workers=1, curve_keys=keydir)).run_in_background()
    try:
        plan = PartitionPlan.build([("w", (64,), "float32")], 1, frame_elems=64)
        with PSClient([server.endpoint], 0, settings=ClientSettings(frame_elems=64, request_timeout=0.5)) as c:
            with pytest.raises(DeadlineExceeded):
                c.hello(plan, timeout=0.5)
        assert server.snapshot_stats()["requests"] == 0
    finally:
        assert server.shutdown(5)


def test_curve_coordinator_registers_a_curve_client_and_ignores_a_plain_one(keydir):
    coord = Coordinator(CoordinatorSettings(curve_keys=keydir)).run_in_background()
    try:
        link = CoordinatorLink(coord.endpoint, "worker", keys=CurveKeys.load(keydir), timeout=5)
        try:
            rank, _ = link.register(-1)
            assert rank == 0
        finally:
            link.close()
        plain = CoordinatorLink(coord.endpoint, "worker", timeout=0.5)
        try:
            with pytest.raises(DeadlineExceeded):
                plain.status()
        finally:
            plain.close()
        assert coord.status()["auth"]["allowed"] == 1
    finally:
        assert coord.shutdown(5)


def test_secure_client_on_a_plain_dealer_helper(keydir):
    # secure_client is what make_dealer(keys=...) applies; it refuses a connected socket
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    try:
        s.connect("tcp://127.0.0.1:1")
        with pytest.raises(ValueError):
            secure_client(s, CurveKeys.load(keydir))
    finally:
        s.close(linger=0)
        ctx.term()
