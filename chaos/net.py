"""Network namespaces for a chaos run: one per node, one for the client, one for the bridge.

Layout (subnet 10.213.0.0/24, nothing routed anywhere else)::

    fmc-br    bridge `br0`; one veth end per node and one for the client; nft faults live here
    fmc-cl    the client agent (10.213.0.2): every RPC of the workload and of the checkers
    fmc-<id>  one node (10.213.0.10 + i), its veth end named eth0

The host has a default route, so the harness never sends to the subnet from the root
namespace: everything that talks to a node runs inside `fmc-cl` (see `chaos.agent`).
Namespaces and veths are named with the `fmc-` / `fmv` prefixes so that
`python -m chaos cleanup` can find every leftover of a crashed run.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from chaos.faults import BRIDGE_TABLE, render_ruleset

log = logging.getLogger("chaos.net")

PREFIX = "fmc-"
VETH_PREFIX = "fmv"
BRIDGE_NS = PREFIX + "br"
CLIENT_NS = PREFIX + "cl"
CLIENT_ID = "client"
SUBNET = "10.213.0"
CLIENT_IP = f"{SUBNET}.2"
FIRST_NODE_HOST = 10
MAX_NODES = 200


class NetError(Exception):
    """A namespace, link or nft command failed; the message has the command and its stderr."""


def run(
    argv: Sequence[str], *, input_text: str | None = None, check: bool = True, timeout_s: float = 20.0
) -> subprocess.CompletedProcess:
    """Run a system command (ip, nft, tc, mount); NetError with its stderr if it fails."""
    try:
        done = subprocess.run(list(argv), input=input_text, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise NetError(f"{argv[0]} is not installed (run `make chaos-deps` as root)") from None
    except subprocess.TimeoutExpired:
        raise NetError(f"{' '.join(argv)} did not finish within {timeout_s:.0f}s") from None
    if check and done.returncode != 0:
        raise NetError(
            f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
        )
    return done


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    """argv run inside network namespace `ns` (ip netns exec execs it: the pid is the command's)."""
    return ["ip", "netns", "exec", ns, *argv]


def node_ns(node_id: str) -> str:
    return PREFIX + node_id


def existing_namespaces() -> list[str]:
    done = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


@dataclass
class Network:
    """The namespaces, bridge and veths of one run, and the faults applied to them."""

    nodes: list[str]
    addresses: dict[str, str] = field(default_factory=dict)  # node id -> IPv4 address
    created: list[str] = field(default_factory=list)  # namespaces, in creation order
    _shaped: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if len(self.nodes) > MAX_NODES:
            raise NetError(f"at most {MAX_NODES} nodes fit the chaos subnet, got {len(self.nodes)}")
        self.addresses = {n: f"{SUBNET}.{FIRST_NODE_HOST + i}" for i, n in enumerate(self.nodes)}
        self.addresses[CLIENT_ID] = CLIENT_IP

    def veth(self, member: str) -> str:
        index = 0 if member == CLIENT_ID else self.nodes.index(member) + 1
        return f"{VETH_PREFIX}{index}"

    def ns(self, member: str) -> str:
        return CLIENT_NS if member == CLIENT_ID else node_ns(member)

    def create(self, on_created=None) -> None:
        """Make the bridge namespace, then one namespace per node and for the client.
        `on_created(ns)` is called as each one exists (the run's cleanup record)."""
        taken = set(existing_namespaces()) & {BRIDGE_NS, CLIENT_NS, *map(node_ns, self.nodes)}
        if taken:
            raise NetError(
                f"namespaces {', '.join(sorted(taken))} already exist: another chaos run is active, "
                "or a crashed one left them (python -m chaos cleanup)"
            )
        self._add_ns(BRIDGE_NS, on_created)
        run(["ip", "-n", BRIDGE_NS, "link", "set", "lo", "up"])
        run(["ip", "-n", BRIDGE_NS, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", BRIDGE_NS, "link", "set", "br0", "up"])
        for member in [CLIENT_ID, *self.nodes]:
            ns = self.ns(member)
            self._add_ns(ns, on_created)
            veth = self.veth(member)
            run(
                [
                    "ip",
                    "link",
                    "add",
                    veth,
                    "netns",
                    BRIDGE_NS,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                ]
            )
            run(["ip", "-n", BRIDGE_NS, "link", "set", veth, "master", "br0"])
            run(["ip", "-n", BRIDGE_NS, "link", "set", veth, "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(["ip", "-n", ns, "addr", "add", f"{self.addresses[member]}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        self.set_faults((), {})

    def _add_ns(self, ns: str, on_created) -> None:
        run(["ip", "netns", "add", ns])
        self.created.append(ns)
        if on_created is not None:
            on_created(ns)

    def destroy(self) -> list[str]:
        """Delete every namespace this run made (veths go with them); returns what failed."""
        problems = []
        for ns in reversed(self.created):
            done = run(["ip", "netns", "del", ns], check=False)
            if done.returncode != 0 and ns in existing_namespaces():
                problems.append(f"{ns}: {done.stderr.strip()}")
        self.created.clear()
        return problems

    # -- faults ------------------------------------------------------------------------------

    def set_faults(self, drops: Iterable[tuple[str, str]], losses: Mapping[tuple[str, str], int]) -> str:
        """Replace the bridge's drop and loss rules by these, in one nft transaction."""
        script = render_ruleset(self.addresses, drops, losses)
        run(in_ns(BRIDGE_NS, ["nft", "-f", "-"]), input_text=script)
        return script

    def ruleset(self) -> str:
        return run(in_ns(BRIDGE_NS, ["nft", "list", "table", "bridge", BRIDGE_TABLE])).stdout

    def limit_bandwidth(self, node: str, rate_kbit: int) -> None:
        """tbf on both ends of the node's link: what it sends and what it receives."""
        for ns, dev in ((BRIDGE_NS, self.veth(node)), (self.ns(node), "eth0")):
            run(
                in_ns(
                    ns,
                    [
                        "tc",
                        "qdisc",
                        "replace",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        f"{rate_kbit}kbit",
                        "burst",
                        "32kbit",
                        "latency",
                        "400ms",
                    ],
                )
            )
        self._shaped.add(node)

    def clear_bandwidth(self, node: str) -> None:
        for ns, dev in ((BRIDGE_NS, self.veth(node)), (self.ns(node), "eth0")):
            run(in_ns(ns, ["tc", "qdisc", "del", "dev", dev, "root"]), check=False)
        self._shaped.discard(node)

    def redirect_to_proxy(self, node: str, ports: Mapping[int, int], outbound_port: int, mark: int) -> None:
        """In the node's namespace, send the node's connections with other nodes through its delay
        proxy: inbound connections to `port` go to `ports[port]`, connections the node opens to
        another node's ports go to `outbound_port`. The client's own connections, and the proxy's
        (marked `mark`), pass untouched."""
        me = self.addresses[node]
        inbound = "\n".join(
            f"    ip saddr != {CLIENT_IP} tcp dport {port} redirect to :{proxy}"
            for port, proxy in sorted(ports.items())
        )
        node_ports = ", ".join(str(p) for p in sorted(ports))
        script = (
            "table ip fmc_delay {\n"
            "  chain prerouting {\n    type nat hook prerouting priority -100; policy accept;\n"
            f"{inbound}\n  }}\n"
            "  chain output {\n    type nat hook output priority -100; policy accept;\n"
            f"    meta mark {mark} accept\n"
            f"    ip daddr {{ {me}, {CLIENT_IP} }} accept\n"
            f"    ip daddr {SUBNET}.0/24 tcp dport {{ {node_ports} }} redirect to :{outbound_port}\n"
            "  }\n}\n"
        )
        run(in_ns(self.ns(node), ["nft", "-f", "-"]), input_text=script)


def sweep_namespaces() -> list[str]:
    """Delete every namespace with the chaos prefix (leftovers of a crashed run); returns their names."""
    gone = []
    for ns in existing_namespaces():
        if ns.startswith(PREFIX):
            run(["ip", "netns", "del", ns], check=False)
            gone.append(ns)
    return gone


def netns_available() -> str | None:
    """None if this process can make network namespaces with nft and tc in them, else why not."""
    import os
    import shutil

    if os.geteuid() != 0:
        return "needs root (network namespaces, nft, tc, tmpfs mounts)"
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make chaos-deps)"
    probe = PREFIX + "probe"
    done = run(["ip", "netns", "add", probe], check=False)
    if done.returncode != 0:
        return f"ip netns add failed: {done.stderr.strip()}"
    run(["ip", "netns", "del", probe], check=False)
    return None
