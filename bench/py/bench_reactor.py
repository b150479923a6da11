"""R1/R2 (bench/erpy_bench_reactor.erl): the erpy.reactor protocols (the plain asyncio
servers they are compared with are in asyncio_servers.py)."""

from erpy import reactor

RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
            b"Connection: keep-alive\r\n\r\nHello, World!")


class Echo(reactor.Protocol):
    def data_received(self, data):
        self.write_buffer += data
        return "write_pending"


class Http(reactor.Protocol):
    """HTTP/1.1 keep-alive: one fixed answer per request (pipelined ones too)."""

    def connection_made(self, fd, info):
        super().connection_made(fd, info)
        self.pending = bytearray()

    def data_received(self, data):
        pending = self.pending
        pending += data
        n = 0
        while True:
            end = pending.find(b"\r\n\r\n")
            if end < 0:
                break
            del pending[:end + 4]
            n += 1
        if not n:
            return "continue"
        self.write_buffer += RESPONSE * n
        return "write_pending"
