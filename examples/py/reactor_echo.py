"""The protocol of examples/reactor_echo.erl: every byte back."""

from erpy import reactor


class Echo(reactor.Protocol):
    def data_received(self, data):
        self.write_buffer += data  # data is only valid during this call: copied here
        return "write_pending"
