"""A user-space TCP delay proxy: this kernel has no netem, so latency comes from here.

Runs inside a node's namespace (`python -m chaos.proxy`). nft in that namespace
(`Network.redirect_to_proxy`) sends it both kinds of the node's connections with other
nodes: the ones other nodes open to the node's ports (each inbound port has a proxy port;
the proxy dials the node) and the ones the node opens to other nodes (one outbound port;
the proxy reads the original destination with SO_ORIGINAL_DST and dials it). The proxy's
own sockets carry a firewall mark that the nft rules let through, so they are not
redirected again. Every chunk read from either side is forwarded after `delay_ms`, read
from a control file that the Latency nemesis rewrites (0 = no delay), so the proxy runs for
the whole life of the cluster and a fault changes only its delay. Order within a
connection is kept: each direction is one FIFO queue.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import struct
import time
from pathlib import Path

READ_BYTES = 64 * 1024
CONTROL_POLL_S = 0.2
PROXY_MARK = 0x2A  # on the proxy's own sockets; nft lets marked traffic through unredirected
_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


class DelayControl:
    """The current one-way delay, re-read from a file (missing or unreadable: no delay)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.delay_s = 0.0

    def refresh(self) -> None:
        try:
            self.delay_s = max(0.0, float(self.path.read_text().strip() or 0) / 1000.0)
        except (OSError, ValueError):
            self.delay_s = 0.0

    async def watch(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(CONTROL_POLL_S)  # polling a file the harness rewrites


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, control: DelayControl) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            wait_s = due - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)  # the injected latency itself
            if not data:
                writer.write_eof() if writer.can_write_eof() else writer.close()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(READ_BYTES)
            await queue.put((time.monotonic() + control.delay_s, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        writer.close()


async def _dial_marked(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROXY_MARK)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except OSError:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


def original_destination(writer: asyncio.StreamWriter) -> tuple[str, int]:
    """Where a redirected connection was going (conntrack's view, through SO_ORIGINAL_DST)."""
    sock = writer.get_extra_info("socket")
    raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


async def _serve(listen_port: int, control: DelayControl, target: tuple[str, int] | None) -> asyncio.Server:
    """Accept on `listen_port`; forward to `target`, or to the original destination if None."""

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            host, port = target or original_destination(client_writer)
            far_reader, far_writer = await _dial_marked(host, port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pump(client_reader, far_writer, control),
            _pump(far_reader, client_writer, control),
            return_exceptions=True,
        )

    return await asyncio.start_server(handle, "0.0.0.0", listen_port)


async def main_async(
    target: str, ports: list[tuple[int, int]], outbound_port: int | None, control_path: Path
) -> None:
    control = DelayControl(control_path)
    control.refresh()
    watcher = asyncio.create_task(control.watch())
    servers = [await _serve(proxy_port, control, (target, port)) for port, proxy_port in ports]
    if outbound_port:
        servers.append(await _serve(outbound_port, control, None))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    watcher.cancel()
    for server in servers:
        server.close()


def parse_ports(text: str) -> list[tuple[int, int]]:
    """ "7000:17000,7400:17400" -> [(7000, 17000), (7400, 17400)] (node port : proxy port).
    ValueError naming the item for anything else."""
    out = []
    for item in text.split(","):
        port, sep, proxy = item.partition(":")
        try:
            pair = (int(port), int(proxy))
        except ValueError:
            pair = None
        if not sep or pair is None or not all(1 <= p <= 65535 for p in pair):
            raise ValueError(f"expected NODE_PORT:PROXY_PORT with ports 1..65535, got {item!r}")
        out.append(pair)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="the node's address in this namespace")
    parser.add_argument("--ports", required=True, type=parse_ports, help="NODE_PORT:PROXY_PORT,... (inbound)")
    parser.add_argument("--outbound-port", type=int, default=None, help="proxy port for the node's own dials")
    parser.add_argument("--control", required=True, type=Path, help="file holding the delay in ms")
    args = parser.parse_args()
    asyncio.run(main_async(args.target, args.ports, args.outbound_port, args.control))


if __name__ == "__main__":
    main()
