#!/usr/bin/env python3
# -*- coding:utf-8 -*-
# The seed's my_protocol.py with erpy: its ErlangTermsMixin, Port and Protocol classes
# are gone, `from erpy.port import Protocol` replaces them; MyProtocol is unchanged.

from erpy.port import Protocol


class MyProtocol(Protocol):

    def handler_twice(self, x):
        return 2 * int(x)

    def handler_sum(self, x, y):
        return int(x) + int(y)

    def handler_hello(self, name):
        return 'Hello, {}'.format(name)

if __name__ == '__main__':
    MyProtocol().run()
