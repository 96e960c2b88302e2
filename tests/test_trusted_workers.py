"""Trusted workers: approval, server-decided labels and capacity, limited tokens,
re-enrollment by consent, and an agent that keeps its token out of `ps` and
verifies TLS."""

from __future__ import annotations

import argparse
import datetime as dt
import http.server
import json
import ssl
import threading
from io import StringIO
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.core.management import call_command
from django.db import connection

from tasks_app import tokens
from tasks_app.models import Attempt, Task
from tests.test_consumer import (  # noqa: F401 (connect is a fixture)
    TIMEOUT,
    assign_for,
    barrier,
    connect,
    hello_frame,
    refreshed,
    trigger,
    welcome_for,
)
from workers_app import agent, liveness, registration
from workers_app.exceptions import EnrollmentRefused
from workers_app.models import EnrollmentToken, Worker

REGISTER = "/api/workers/register"


def enroll(raw: str, name: str = "node-7", *, capacity: int = 2, labels=("linux",)):
    return registration.register(
        raw, name=name, hostname=f"{name}.example", capacity=capacity, labels=list(labels)
    )


def body(raw: str, name: str = "node-7", **overrides) -> dict:
    return {"token": raw, "name": name, "capacity": 2, "labels": ["linux"], **overrides}


@pytest.fixture
def linux_task(db) -> Task:
    return Task.objects.create(name="answer", command='python3 -c "print(6*7)"', labels=["linux"])


# --- pending until approved ---------------------------------------------------------


@pytest.mark.django_db
def test_it_enrolls_a_worker_as_pending_with_what_it_asked_for_as_its_request(client):
    raw, token = EnrollmentToken.mint()

    response = client.post(REGISTER, body(raw, capacity=3), content_type="application/json")

    assert response.status_code == 201
    assert response.json()["worker"]["state"] == "pending"
    assert response.json()["worker"]["approved_at"] is None
    worker = Worker.objects.get(name="node-7")
    assert (worker.state, worker.approved_at, worker.approved_by) == ("pending", None, None)
    assert (worker.requested_labels, worker.requested_capacity) == (["linux"], 3)
    token.refresh_from_db()
    assert token.uses == 1


@pytest.mark.django_db(transaction=True)
async def test_it_gives_a_pending_worker_no_work_until_an_admin_approves_it(
    connect,  # noqa: F811
    linux_task,
    django_user_model,
    settings,
):
    # The intervals test_consumer's welcome_for spells out.
    settings.SCHEDULER_HEARTBEAT_S = 5.0
    settings.SCHEDULER_LOST_AFTER_S = 15.0
    settings.SCHEDULER_SELF_FENCE = True
    await get_channel_layer().flush()
    raw, _ = await database_sync_to_async(EnrollmentToken.mint)()
    worker, credential = await database_sync_to_async(enroll)(raw)
    comm = await connect(credential)
    await comm.send_json_to(hello_frame())
    assert await comm.receive_json_from(timeout=TIMEOUT) == welcome_for(worker)
    await barrier(comm)

    attempt = await trigger(linux_task)

    assert await comm.receive_nothing()
    assert (await refreshed(attempt)).status == Attempt.Status.QUEUED
    worker = await refreshed(worker)
    assert worker.state == Worker.State.PENDING
    assert worker.channel_name  # connected all the same

    admin = await database_sync_to_async(django_user_model.objects.create_user)("carol")
    approved = await database_sync_to_async(registration.approve)(
        worker, user=admin, labels=["linux"], capacity=1
    )

    assert approved is True
    assert await comm.receive_json_from(timeout=TIMEOUT) == assign_for(attempt)
    worker = await refreshed(worker)
    assert (worker.state, worker.approved_by_id, worker.capacity) == ("online", admin.pk, 1)
    assert await comm.receive_nothing()


@pytest.mark.django_db
def test_it_keeps_a_pending_worker_pending_through_hello_disconnect_and_enable():
    raw, _ = EnrollmentToken.mint()
    worker, _ = enroll(raw)

    liveness.hello(worker.pk, "chan-1", hello_frame())
    assert Worker.objects.get(pk=worker.pk).state == "pending"
    liveness.disconnected_many([(worker.pk, "chan-1")])
    assert Worker.objects.get(pk=worker.pk).state == "pending"
    liveness.apply_state(worker, Worker.State.DISABLED)
    liveness.apply_state(worker, Worker.State.ONLINE)  # enable is not approve

    worker.refresh_from_db()
    assert (worker.state, worker.approved_at) == ("pending", None)


@pytest.mark.django_db
def test_it_approves_over_the_api_with_the_admins_labels_and_capacity_once(api, bob):
    raw, _ = EnrollmentToken.mint()
    worker, _ = enroll(raw, capacity=8, labels=["linux", "gpu"])
    url = f"/api/workers/{worker.pk}/approve"

    first = api.post(url, {"labels": ["linux"], "capacity": 2}, content_type="application/json")
    again = api.post(url, {"capacity": 8}, content_type="application/json")

    assert first.status_code == 200
    assert first.json()["state"] == "offline"  # approved; its agent is not connected
    assert (first.json()["labels"], first.json()["capacity"]) == (["linux"], 2)
    assert first.json()["requested_labels"] == ["linux", "gpu"]
    assert again.status_code == 409
    assert again.json() == {"error": "worker node-7 is not pending approval"}
    worker.refresh_from_db()
    assert (worker.labels, worker.capacity, worker.approved_by_id) == (["linux"], 2, bob.pk)


@pytest.mark.django_db
def test_it_approves_with_what_the_agent_asked_for_when_the_body_is_empty(api, bob):
    raw, _ = EnrollmentToken.mint()
    worker, _ = enroll(raw, capacity=3, labels=["arm"])

    response = api.post(f"/api/workers/{worker.pk}/approve", content_type="application/json")

    assert response.status_code == 200
    worker.refresh_from_db()
    assert (worker.labels, worker.capacity, worker.state) == (["arm"], 3, "offline")


@pytest.mark.django_db
def test_the_workers_page_shows_a_pending_worker_and_approves_it(bob_client, bob):
    raw, _ = EnrollmentToken.mint(note="for the rack")
    worker, _ = enroll(raw, capacity=6, labels=["gpu"])

    page = bob_client.get("/workers/").content.decode()
    assert 'data-worker="node-7"' in page
    assert 'name="labels" value="gpu"' in page
    assert '<span class="requested-capacity">6</span>' in page
    assert "for the rack" in page  # the token list

    response = bob_client.post(f"/workers/{worker.pk}/approve/", {"labels": "", "capacity": "2"})

    assert response.status_code == 302
    worker.refresh_from_db()
    assert (worker.state, worker.labels, worker.capacity) == ("offline", [], 2)
    assert 'data-worker="node-7"' not in bob_client.get("/workers/").content.decode()


# --- labels and capacity decided on the server ---------------------------------------


@pytest.mark.django_db
def test_a_widened_hello_changes_neither_labels_nor_capacity_nor_what_dispatch_gives(linux_task):
    from workers_app import dispatch

    raw, _ = EnrollmentToken.mint()
    worker, _ = enroll(raw, capacity=2, labels=["linux"])
    registration.approve(worker, user=None, labels=["linux"], capacity=1)
    gpu_task = Task.objects.create(name="render", command="true", labels=["linux", "gpu"])

    liveness.hello(worker.pk, "chan-1", hello_frame(labels=["linux", "gpu"], capacity=64))

    worker.refresh_from_db()
    assert (worker.labels, worker.capacity) == (["linux"], 1)
    assert (worker.requested_labels, worker.requested_capacity) == (["linux", "gpu"], 64)
    from tasks_app import lifecycle

    gpu_run = lifecycle.trigger_run(gpu_task)
    runs = [lifecycle.trigger_run(linux_task) for _ in range(3)]
    assigned = dispatch.dispatch()
    assert len(assigned) == 1  # its decided capacity, not the 64 it asked for
    assert gpu_run.attempts.get().status == Attempt.Status.QUEUED
    assert {a for _, a in assigned} <= {r.attempts.get().pk for r in runs}


@pytest.mark.django_db
def test_it_gives_a_worker_no_more_slots_than_its_agent_asks_for(linux_task):
    from tasks_app import lifecycle
    from workers_app import dispatch

    raw, _ = EnrollmentToken.mint()
    worker, _ = enroll(raw)
    registration.approve(worker, user=None, labels=["linux"], capacity=4)
    liveness.hello(worker.pk, "chan-1", hello_frame(capacity=2))

    for _ in range(4):
        lifecycle.trigger_run(linux_task)

    assert len(dispatch.dispatch()) == 2


# --- enrollment tokens -----------------------------------------------------------------


@pytest.mark.django_db
def test_a_single_use_token_enrolls_once(client):
    raw, token = EnrollmentToken.mint(max_uses=1)

    first = client.post(REGISTER, body(raw, "node-a"), content_type="application/json")
    second = client.post(REGISTER, body(raw, "node-b"), content_type="application/json")

    assert first.status_code == 201
    assert second.status_code == 403
    assert second.json() == {"error": "enrollment token is unknown, expired, used up or revoked"}
    assert list(Worker.objects.values_list("name", flat=True)) == ["node-a"]
    token.refresh_from_db()
    assert (token.uses, token.status) == (1, "used up")


@pytest.mark.django_db
def test_a_token_limited_to_three_enrolls_three_agents():
    raw, token = EnrollmentToken.mint(max_uses=3)

    for n in range(3):
        enroll(raw, f"node-{n}")
    with pytest.raises(EnrollmentRefused):
        enroll(raw, "node-3")

    assert Worker.objects.count() == 3
    token.refresh_from_db()
    assert token.uses == 3


@pytest.mark.django_db(transaction=True)
def test_two_agents_racing_for_a_single_use_token_enroll_once():
    raw, token = EnrollmentToken.mint(max_uses=1)
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def attempt(name: str) -> None:
        try:
            start.wait(timeout=10)
            enroll(raw, name)
            outcomes.append("enrolled")
        except EnrollmentRefused:
            outcomes.append("refused")
        except Exception as exc:  # SQLite: the loser may find the database locked
            outcomes.append(f"failed: {type(exc).__name__}")
        finally:
            connection.close()

    threads = [threading.Thread(target=attempt, args=(f"racer-{n}",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert outcomes.count("enrolled") == 1, outcomes
    assert Worker.objects.count() == 1
    token.refresh_from_db()
    assert token.uses == 1


@pytest.mark.django_db
def test_an_auto_approving_token_enrolls_a_worker_that_takes_work_at_once(linux_task):
    from tasks_app import lifecycle
    from workers_app import dispatch

    raw, _ = EnrollmentToken.mint(auto_approve=True)
    worker, _ = enroll(raw, capacity=2, labels=["linux"])
    assert (worker.state, worker.labels, worker.capacity) == ("offline", ["linux"], 2)
    assert worker.approved_at is not None

    liveness.hello(worker.pk, "chan-1", hello_frame())
    run = lifecycle.trigger_run(linux_task)

    assert dispatch.dispatch() == [(worker.pk, run.attempts.get().pk)]


@pytest.mark.django_db
def test_the_command_mints_single_use_and_auto_approving_tokens():
    out = StringIO()
    call_command("enrollment-token", "--single-use", "--auto-approve", stdout=out)

    token = EnrollmentToken.objects.get(token_hash=tokens.digest(out.getvalue().strip()))
    assert (token.max_uses, token.auto_approve) == (1, True)
    call_command("enrollment-token", "--max-uses", "5", stdout=StringIO())
    assert EnrollmentToken.objects.filter(max_uses=5, auto_approve=False).count() == 1


@pytest.mark.django_db
def test_the_workers_page_mints_and_revokes_tokens(bob_client, bob):

    page = bob_client.post(
        "/workers/tokens/", {"max_uses": "2", "note": "rack 4", "auto_approve": "on"}
    )

    token = EnrollmentToken.objects.get(note="rack 4")
    assert (token.max_uses, token.auto_approve, token.created_by) == (2, True, bob)
    assert 'id="new-token">enr_' in page.content.decode()
    bob_client.post(f"/workers/tokens/{token.pk}/revoke/")
    token.refresh_from_db()
    assert token.status == "revoked"
    with pytest.raises(EnrollmentRefused):
        enroll(page.content.decode().split('id="new-token">')[1].split("<")[0])


# --- re-enrollment ---------------------------------------------------------------------


@pytest.mark.django_db
def test_it_refuses_to_re_enroll_an_existing_name_without_an_admins_consent(client):
    raw, token = EnrollmentToken.mint()
    worker, _ = enroll(raw)
    registration.approve(worker, user=None, labels=["linux"], capacity=2)
    before = Worker.objects.values().get(pk=worker.pk)

    response = client.post(REGISTER, body(raw, labels=["gpu"]), content_type="application/json")

    assert response.status_code == 403
    assert "an admin must allow its re-enrollment" in response.json()["error"]
    assert Worker.objects.values().get(pk=worker.pk) == before
    token.refresh_from_db()
    assert token.uses == 1


@pytest.mark.django_db
def test_consent_to_re_enroll_is_refused_while_connected_and_voided_by_its_agents_hello():
    raw, _ = EnrollmentToken.mint()
    worker, _ = enroll(raw)
    registration.approve(worker, user=None, labels=["linux"], capacity=2)
    liveness.hello(worker.pk, "chan-1", hello_frame())

    assert registration.allow_reenroll(worker) is False  # its agent has its credential
    liveness.disconnected_many([(worker.pk, "chan-1")])
    assert registration.allow_reenroll(worker) is True
    # The node had not lost its credential after all: it comes back with it.
    liveness.hello(worker.pk, "chan-2", hello_frame())
    liveness.disconnected_many([(worker.pk, "chan-2")])

    assert Worker.objects.get(pk=worker.pk).reenroll_allowed is False
    with pytest.raises(EnrollmentRefused, match="an admin must allow its re-enrollment"):
        enroll(raw)


@pytest.mark.django_db
def test_an_approval_with_too_many_labels_is_a_400_and_changes_nothing(api):
    raw, _ = EnrollmentToken.mint()
    worker, _ = enroll(raw)
    labels = [f"l{i}" for i in range(200)]

    response = api.post(
        f"/api/workers/{worker.pk}/approve", {"labels": labels}, content_type="application/json"
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid approval"
    assert Worker.objects.get(pk=worker.pk).approved_at is None


@pytest.mark.django_db
def test_a_consented_re_enrollment_keeps_the_decision_and_uses_the_consent_up():
    raw, _ = EnrollmentToken.mint()
    worker, old_credential = enroll(raw)
    registration.approve(worker, user=None, labels=["linux"], capacity=2)
    registration.allow_reenroll(worker)

    again, credential = enroll(raw, capacity=9, labels=["linux", "gpu"])

    assert again.pk == worker.pk and credential != old_credential
    again.refresh_from_db()
    assert (again.state, again.labels, again.capacity) == ("offline", ["linux"], 2)
    assert again.reenroll_allowed is False
    assert registration.authenticate(old_credential) is None
    with pytest.raises(EnrollmentRefused):
        enroll(raw)


@pytest.mark.django_db
def test_a_disabled_worker_stays_disabled_when_it_re_enrolls():
    raw, _ = EnrollmentToken.mint(auto_approve=True)
    worker, _ = enroll(raw)
    liveness.apply_state(worker, Worker.State.DISABLED)
    registration.allow_reenroll(worker)

    enroll(raw)

    worker.refresh_from_db()
    assert worker.state == Worker.State.DISABLED


# --- the agent: its token out of argv, TLS verified ----------------------------------------


def _token_args(tmp_path: Path, argv: list[str]) -> argparse.Namespace:
    return agent.build_parser().parse_args(
        ["--server", "http://m.example:8000", "--state-dir", str(tmp_path), *argv]
    )


def test_the_agent_reads_its_token_from_a_file_or_the_environment(tmp_path, monkeypatch):
    parser = agent.build_parser()
    token_file = tmp_path / "token"
    token_file.write_text("enr_from-file\n")
    monkeypatch.setenv("SCHEDULER_ENROLLMENT_TOKEN", "enr_from-env")

    from_file = agent.enrollment_token(
        _token_args(tmp_path, ["--token-file", str(token_file)]), parser
    )
    from_env = agent.enrollment_token(_token_args(tmp_path, []), parser)

    assert (from_file, from_env) == ("enr_from-file", "enr_from-env")
    monkeypatch.delenv("SCHEDULER_ENROLLMENT_TOKEN")
    with pytest.raises(SystemExit):
        agent.enrollment_token(_token_args(tmp_path, []), parser)


def test_the_agent_verifies_tls_with_the_given_ca_for_requests_and_websockets(tmp_path):
    ca = _write_ca(tmp_path)

    assert agent.tls_verify(None) is True
    assert agent.tls_verify(str(ca.cert)) == str(ca.cert)
    assert agent.ssl_context("ws://m.example/ws/agent/", str(ca.cert)) is None
    context = agent.ssl_context("wss://m.example/ws/agent/", str(ca.cert))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "test CA"),),)]


def test_the_agent_enrolls_over_https_with_its_ca_file_and_refuses_an_unknown_ca(tmp_path):
    ca = _write_ca(tmp_path)
    server = _https_server(ca)
    url = f"https://localhost:{server.server_address[1]}"
    try:
        stored = agent.register(
            [url],
            "enr_x",
            name="n",
            capacity=1,
            labels=(),
            state_dir=tmp_path / "ok",
            ca_file=str(ca.cert),
        )
        assert stored["credential"] == "wkr_over-tls"

        class Refused(Exception):
            pass

        def give_up(_delay: float) -> None:
            raise Refused

        with pytest.raises(Refused):  # not verified against the system's CAs: retried
            agent.register(
                [url],
                "enr_x",
                name="n",
                capacity=1,
                labels=(),
                state_dir=tmp_path / "no",
                sleep=give_up,
            )
        assert not (tmp_path / "no" / "credential.json").exists()
    finally:
        server.shutdown()


class _CA:
    def __init__(self, cert: Path, server_cert: Path, server_key: Path) -> None:
        self.cert, self.server_cert, self.server_key = cert, server_cert, server_key


def _write_ca(tmp_path: Path) -> _CA:
    """A private CA and a certificate for localhost signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def build(subject, issuer, key, signer, *, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("test CA", "test CA", ca_key, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build("localhost", "test CA", key, ca_key, ca=False)
    paths = _CA(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key")
    paths.cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def _https_server(ca: _CA) -> http.server.HTTPServer:
    """Answers any POST as the master answers an enrollment."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            answer = json.dumps(
                {"worker": {"id": 1, "name": "n", "state": "pending"}, "credential": "wkr_over-tls"}
            ).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ca.server_cert, ca.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.django_db
def test_broadcast_never_targets_a_worker_without_an_approval_whatever_its_state():
    from workers_app.directory import WorkerDirectory

    raw, _ = EnrollmentToken.mint(auto_approve=True)
    approved, _ = enroll(raw, name="approved")
    raw, _ = EnrollmentToken.mint()
    unapproved, _ = enroll(raw, name="unapproved")
    # Online in the row (as an edit outside the dashboard could leave it), never approved.
    Worker.objects.filter(pk__in=[approved.pk, unapproved.pk]).update(state="online")

    assert [w.name for w in WorkerDirectory().taking_work()] == ["approved"]
