#!/usr/bin/python3
"""A fake port worker speaking protocol version 99 (for erpy_port_SUITE:protocol_version).

Started as `old_protocol_worker.py -m erpy.worker` in place of Python. It notes each
start in `starts` of the PYTHONPATH entry named *erpy_fake_log (when there is one), reads
the init frame, answers {ready, #{version => 99}} and waits for Erlang to close the port.
"""
import os

for entry in os.environ.get("PYTHONPATH", "").split(":"):
    if entry.endswith("erpy_fake_log"):
        with open(os.path.join(entry, "starts"), "a") as f:
            f.write("start\n")

# {ready, #{version => 99}} in the external term format.
ready = (bytes([131, 104, 2, 119, 5]) + b"ready" + bytes([116, 0, 0, 0, 1, 119, 7])
         + b"version" + bytes([97, 99]))
n = int.from_bytes(os.read(3, 4), "big")
while n:
    n -= len(os.read(3, n))
os.write(4, len(ready).to_bytes(4, "big") + ready)
while os.read(3, 65536):
    pass
