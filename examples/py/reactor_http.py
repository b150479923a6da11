"""The protocol of examples/reactor_http.erl: a tiny HTTP/1.1 server with keep-alive."""

from erpy import reactor


class Http(reactor.Protocol):
    def connection_made(self, fd, info):
        super().connection_made(fd, info)
        self.pending = bytearray()

    def data_received(self, data):
        self.pending += data
        keep = True
        while (end := self.pending.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.pending[:end]).decode("latin-1")
            del self.pending[:end + 4]
            method, path, version = (head.split("\r\n", 1)[0].split(" ") + ["", "", ""])[:3]
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in head.split("\r\n")[1:])}
            keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            body = f"Hello from Python: {method} {path}\n".encode()
            self.write_buffer += (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                  f"Content-Length: {len(body)}\r\n"
                                  f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n").encode() + body
        self.keep = keep
        return "write_pending" if self.write_buffer else "continue"

    def write_ready(self):
        action = super().write_ready()
        if action == "read_pending" and not self.keep:
            return "close"
        return action
