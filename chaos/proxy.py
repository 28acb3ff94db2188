"""A user-space TCP delay proxy: this kernel has no netem, so latency comes from here.

Runs inside a node's namespace (`python -m chaos.proxy`), listening on one proxy port per
node port; nft in that namespace redirects connections from the other nodes to it
(`Network.redirect_to_proxy`). Every chunk read from either side is forwarded after
`delay_ms`, read from a control file that the Latency nemesis rewrites (0 = no delay), so
the proxy runs for the whole life of the cluster and a fault changes only its delay.
Order within a connection is kept: each direction is one FIFO queue.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from pathlib import Path

READ_BYTES = 64 * 1024
CONTROL_POLL_S = 0.2


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


async def _serve(target_host: str, target_port: int, listen_port: int, control: DelayControl) -> asyncio.Server:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            node_reader, node_writer = await asyncio.open_connection(target_host, target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pump(client_reader, node_writer, control), _pump(node_reader, client_writer, control),
                             return_exceptions=True)

    return await asyncio.start_server(handle, "0.0.0.0", listen_port)


async def main_async(target: str, ports: list[tuple[int, int]], control_path: Path) -> None:
    control = DelayControl(control_path)
    control.refresh()
    watcher = asyncio.create_task(control.watch())
    servers = [await _serve(target, port, proxy_port, control) for port, proxy_port in ports]
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
    """"7000:17000,7400:17400" -> [(7000, 17000), (7400, 17400)] (node port : proxy port)."""
    out = []
    for item in text.split(","):
        port, _, proxy = item.partition(":")
        out.append((int(port), int(proxy)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="the node's address in this namespace")
    parser.add_argument("--ports", required=True, type=parse_ports, help="NODE_PORT:PROXY_PORT,...")
    parser.add_argument("--control", required=True, type=Path, help="file holding the delay in ms")
    args = parser.parse_args()
    asyncio.run(main_async(args.target, args.ports, args.control))


if __name__ == "__main__":
    main()
