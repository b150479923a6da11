# A port program for erpy_dropin_SUITE: the seed's handlers and what the tests need
# beyond them. argv[1]: the {packet, N} of the pool.
import os
import sys
import time

from erpy import Atom
from erpy.port import Protocol


class TestProtocol(Protocol):

    def handler_twice(self, x):
        return 2 * int(x)

    def handler_sum(self, x, y):
        return int(x) + int(y)

    def handler_hello(self, name):
        return 'Hello, {}'.format(name)

    def handler_fail(self):
        return 1 / 0

    def handler_sleep(self, seconds):
        time.sleep(seconds)
        return Atom("slept")

    def handler_crash(self, status):
        os._exit(status)

    def handler_new_atom(self):
        return Atom("erpy_dropin_no_such_atom_4f1d")

    def handler_echo(self, term):
        return term

    def handler_big(self, n):
        return "x" * n

    def handler_pid(self):
        return os.getpid()

    def handler_remember(self, v):
        self.memory = v
        return Atom("ok")

    def handler_recall(self):
        return getattr(self, "memory", None)


if __name__ == '__main__':
    TestProtocol(packet=int(sys.argv[1]) if len(sys.argv) > 1 else 2).run()
