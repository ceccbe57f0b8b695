"""The audit sinks: the append-only file, and syslog to real receivers on loopback (RFC 5424 over UDP, RFC 5425
over TLS with a certificate made for the test)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gateway.audit.sinks import MSGID, PRI, FileSink, SyslogSink, octet_counted, syslog_frame
from gateway.audit.trail import AuditTrail
from gateway.config import AuditSettings, AuditSyslogSettings, ClientTLSSettings

from audit_peers import TlsReceiver, UdpReceiver, split_syslog, validated
from peers import free_port, pki, wait_until


def test_file_sink_appends_one_line_per_message_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.log"
    sink = FileSink(path)
    sink.send(b"<AuditMessage>one</AuditMessage>")
    sink.send(b"<AuditMessage>two\nlines</AuditMessage>")
    sink.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = FileSink(path)
    again.send(b"<AuditMessage>three</AuditMessage>")
    again.close()
    lines = path.read_bytes().splitlines()
    assert lines == [b"<AuditMessage>one</AuditMessage>", b"<AuditMessage>two lines</AuditMessage>", lines[2]]
    assert lines[2] == b"<AuditMessage>three</AuditMessage>"
    again.send(b"after close")
    assert again.failed == 1


def test_trail_from_settings_writes_valid_messages_to_the_data_folder(tmp_path: Path) -> None:
    trail = AuditTrail.from_settings(AuditSettings(source_id="SITE1"), tmp_path, ae_title="GATEWAY")
    trail.application_started()
    trail.application_stopped()
    trail.close()
    lines = (tmp_path / "audit" / "audit.log").read_bytes().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert validated(line).find("AuditSourceIdentification").get("AuditSourceID") == "SITE1"
    assert not AuditTrail.from_settings(AuditSettings(enabled=False), tmp_path).enabled


def test_syslog_frame_is_rfc5424_and_octet_counted() -> None:
    frame = syslog_frame(b"<AuditMessage/>", "GW SITE")
    header, body = split_syslog(frame)
    assert int(header["pri"]) == PRI == 85 and header["msgid"] == MSGID and header["sd"] == "-"
    assert header["app"] == "GWSITE", "no space in a header field"
    assert body == b"<AuditMessage/>"
    assert octet_counted(frame) == str(len(frame)).encode() + b" " + frame


def test_udp_one_datagram_per_message(tmp_path: Path) -> None:
    with UdpReceiver() as receiver:
        settings = AuditSyslogSettings(host="127.0.0.1", port=receiver.port, transport="udp")
        trail = AuditTrail("GW", [FileSink(tmp_path / "a.log"), SyslogSink(settings, "GW")])
        trail.application_started()
        trail.query("reader", "127.0.0.1", "/dicomweb/studies")
        messages = receiver.wait_for(2)
        trail.close()
    assert len(messages) == 2
    assert [validated(x).find("EventIdentification/EventID").get("csd-code") for x in messages] == ["110100", "110112"]


def test_udp_message_over_the_limit_is_counted_not_sent(tmp_path: Path) -> None:
    with UdpReceiver() as receiver:
        settings = AuditSyslogSettings(host="127.0.0.1", port=receiver.port, transport="udp")
        sink = SyslogSink(settings, "GW", max_datagram=300)
        sink.send(b"<AuditMessage>" + b"x" * 400 + b"</AuditMessage>")
        sink.send(b"<AuditMessage/>")
        receiver.wait_for(1)
        sink.close()
        assert sink.dropped == 1 and sink.sent == 1
        assert receiver.messages() == [b"<AuditMessage/>"]


def test_tls_octet_counted_with_client_certificate_and_reconnect(tmp_path: Path) -> None:
    material = pki(tmp_path / "pki", server="audit-repository", client="gateway")
    tls = ClientTLSSettings(
        ca_bundle=material["ca"], certificate=material["client_cert"], private_key=material["client_key"]
    )
    with TlsReceiver(material, require_client=True) as receiver:
        settings = AuditSyslogSettings(host="127.0.0.1", port=receiver.port, transport="tls", tls=tls)
        sink = SyslogSink(settings, "GW")
        trail = AuditTrail("GW", [sink])
        trail.application_started()
        trail.authentication_failed(None, "192.0.2.1")
        assert len(receiver.wait_for(2)) == 2
        receiver.drop_connections()
        trail.study_deleted("1.2.3", "PID", {"1.2.840.10008.5.1.4.1.1.2": 1})
        # The first write after the peer closed may still "succeed" into the dead socket; keep emitting until one
        # arrives over a new connection.
        wait_until(
            lambda: (trail.application_stopped(), receiver.connections >= 2 and len(receiver.frames) >= 3)[1],
            timeout_s=30,
            what="a message over a new connection",
        )
        trail.close()
        assert receiver.connections >= 2, "reconnected"
        subjects = [dict(x[0] for x in c["subject"]) for c in receiver.peer_certificates]
        assert {"commonName": "gateway"} in subjects, "our client certificate was presented"
    for message in receiver.messages():
        validated(message)


def test_tls_refuses_an_untrusted_repository_and_never_blocks_the_caller(tmp_path: Path) -> None:
    material = pki(tmp_path / "pki")
    other = pki(tmp_path / "other")  # another CA: the repository's certificate is not trusted
    with TlsReceiver(material) as receiver:
        settings = AuditSyslogSettings(
            host="127.0.0.1", port=receiver.port, transport="tls", tls=ClientTLSSettings(ca_bundle=other["ca"])
        )
        sink = SyslogSink(settings, "GW", queue_size=2)
        file_sink = FileSink(tmp_path / "audit.log")
        trail = AuditTrail("GW", [file_sink, sink])
        for _ in range(10):
            trail.application_started()
        # The queue holds 2 (and the thread 1): the rest were dropped at once, not waited for.
        assert sink.dropped >= 7, "the caller did not wait for the repository"
        sink.close(join_s=0.5)
        assert receiver.frames == []
        assert sink.sent == 0 and sink.dropped == 10
    assert len((tmp_path / "audit.log").read_bytes().splitlines()) == 10, "the file has every message"


@pytest.mark.parametrize("transport", ["udp", "tls"])
def test_nothing_listening_is_counted_at_close(tmp_path: Path, transport: str) -> None:
    settings = AuditSyslogSettings(host="127.0.0.1", port=free_port(), transport=transport)  # type: ignore[arg-type]
    sink = SyslogSink(settings, "GW")
    sink.send(b"<AuditMessage/>")
    sink.close(join_s=0.5)
    if transport == "tls":
        assert sink.sent == 0 and sink.dropped == 1
    else:
        assert sink.sent + sink.dropped == 1  # UDP cannot know whether anyone listened
