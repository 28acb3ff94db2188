"""Reading the kernel's view of a node's connections after a heal (`ss -tanoi`), as issue 14 did."""

from __future__ import annotations

from chaos.runner import parse_ss

SS = """State    Recv-Q Send-Q Local Address:Port  Peer Address:Port Process
LISTEN   0      128    10.213.0.11:7400    0.0.0.0:*
\t cubic cwnd:10
SYN-SENT 0      1      10.213.0.11:43210   10.213.0.12:7400  timer:(on,23sec,4)
\t cubic rto:16000 backoff:4 mss:524 cwnd:1 unacked:1 retrans:1/4 lost:1
ESTAB    0      517    10.213.0.11:7000    10.213.0.13:51234 timer:(on,7.2sec,7)
\t cubic wscale:7,7 rto:12800 backoff:7 unacked:3 retrans:1/9
ESTAB    0      0      10.213.0.11:50000   10.213.0.14:7000  timer:(keepalive,10sec,0)
\t cubic wscale:7,7 rto:204
ESTAB    0      0      10.213.0.11:7400    10.213.0.14:40000
\t cubic unacked:1
"""


def test_syn_sent_raft_connects_and_grpc_connections_holding_data_are_found():
    found = parse_ss(SS, raft_port=7400, grpc_port=7000)
    assert found["syn_sent"] == ["10.213.0.12:7400 next retry 23.0s after 4 retransmits"]
    assert found["grpc_unacked"] == ["10.213.0.13:51234 next retry 7.2s after 7 retransmits"]


def test_nothing_in_flight_is_nothing_found():
    quiet = "\n".join(
        line for line in SS.splitlines() if not line.startswith(("SYN-SENT", "ESTAB    0      517"))
    )
    assert parse_ss(quiet, raft_port=7400, grpc_port=7000) == {"syn_sent": [], "grpc_unacked": []}
