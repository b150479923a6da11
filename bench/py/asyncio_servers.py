"""R1/R2 references (bench/erpy_bench_reactor.erl): plain asyncio servers, no erpy.
``python3 asyncio_servers.py echo|http`` prints its port and serves until stdin closes."""

import asyncio
import os
import sys
import threading

RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
            b"Connection: keep-alive\r\n\r\nHello, World!")


def _serve(kind):
    async def echo(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def http(reader, writer):
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(echo if kind == "echo" else http, "127.0.0.1", 0, backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        # Erlang closes our stdin to stop us.
        threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set_result, None)),
                         daemon=True).start()
        async with server:
            await stop

    asyncio.run(main())
    os._exit(0)


if __name__ == "__main__":
    _serve(sys.argv[1])
