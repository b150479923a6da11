#!/usr/bin/env python3
"""What `scripts/setup.sh` installs on a fresh Debian machine, computed on any machine with
the same apt lists: apt-get simulates installing the base system (every package of
priority `required` and every essential one, what a minimal Debian has) onto an empty
package database, then the same plus erpy's packages (--no-install-recommends, as
setup.sh installs them). The difference is what erpy adds: its package count and the sum
of their Installed-Size.

usage: scripts/footprint.py        (prints one line: "N packages, M MB")
"""

import glob
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def package_index():
    """Installed-Size (KiB) of every package, and the base system's packages."""
    sizes, base = {}, set()
    for path in glob.glob("/var/lib/apt/lists/*_Packages*"):
        cat = ["/usr/lib/apt/apt-helper", "cat-file", path]
        text = subprocess.run(cat, capture_output=True, text=True, check=True).stdout
        for record in text.split("\n\n"):
            fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", record, re.M))
            name = fields.get("Package")
            if not name:
                continue
            sizes.setdefault(name, int(fields.get("Installed-Size", "0")))
            if fields.get("Priority") == "required" or fields.get("Essential") == "yes":
                base.add(name)
    return sizes, base


def simulate(packages, status):
    cmd = ["apt-get", "-s", "-o", "Dir::State::status=" + status, "install",
           "--no-install-recommends", *sorted(packages)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    installs = set(re.findall(r"^Inst (\S+)", out.stdout, re.M))
    if out.returncode != 0 or not installs:
        sys.exit("footprint: apt-get could not simulate the install:\n" + out.stdout[-2000:] + out.stderr[-2000:])
    return installs


def main():
    erpy = subprocess.run([os.path.join(HERE, "setup.sh"), "--list"], capture_output=True,
                          text=True, check=True).stdout.split()
    sizes, base = package_index()
    if not base:
        sys.exit("footprint: no apt package lists (run apt-get update)")
    with tempfile.NamedTemporaryFile() as empty:
        base_system = simulate(base, empty.name)
        added = simulate(base | set(erpy), empty.name) - base_system
    mb = sum(sizes.get(p, 0) for p in added) / 1024
    print(f"{len(added)} packages, {mb:.0f} MB")


if __name__ == "__main__":
    main()
