"""Drives the daemon the way E2B's SDK reaches E2B itself (run by test_e2b_domain.py):
only ``E2B_DOMAIN`` and ``E2B_API_KEY`` set, so the SDK calls ``https://api.<domain>`` and
``https://49983-<id>.<domain>``, by name, over TLS. Names resolve through the
``/etc/hosts`` of this process's own mount namespace (its resolver, which reads that file
once, has a ``resolv.conf`` naming only loopback). Two steps, each a process:
``create`` prints a new sandbox's id (its names are then added to the hosts file);
``use ID`` drives it and kills it."""

from __future__ import annotations

import os
import sys
import time

import httpx
from e2b import Sandbox

DOMAIN = os.environ["E2B_DOMAIN"]
assert "E2B_API_URL" not in os.environ and "E2B_SANDBOX_URL" not in os.environ

if sys.argv[1] == "create":
    sb = Sandbox.create("base", timeout=300)
    assert sb.sandbox_domain == DOMAIN, sb.sandbox_domain
    print(sb.sandbox_id)
    sys.exit(0)

sb = Sandbox.connect(sys.argv[2])
try:
    r = sb.commands.run("echo over tls")
    assert (r.exit_code, r.stdout) == (0, "over tls\n"), r
    sb.files.write("/tmp/d.txt", "by name")
    assert sb.files.read("/tmp/d.txt") == "by name"
    sb.commands.run("python3 -m http.server 8000 --bind 127.0.0.1", background=True)
    host = sb.get_host(8000)
    deadline = time.monotonic() + 60
    while True:  # the SDK's own advice: https://<get_host(port)>
        answer = httpx.get(f"https://{host}/", timeout=30)
        if answer.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert answer.status_code == 200 and "Directory listing" in answer.text, answer.text
finally:
    assert sb.kill() is True
print("ok")
