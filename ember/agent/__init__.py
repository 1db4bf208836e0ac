"""The in-guest side of ember: PID 1 (:mod:`.init`) and the agent (:mod:`.server`).

Stdlib only, and nothing of ember but :mod:`ember.protocol`: the image builder copies
``ember/{__init__.py,protocol,agent}`` to ``/.ember/lib`` and the guest runs them with the
self-contained interpreter ``/.ember/runtime/bin/python3 -I -S``.
"""

from __future__ import annotations

AGENT_VERSION = "0.2.0"
"""Bumped whenever host and agent must change together; the host refuses an agent of
another version with an error that says to rebuild the template."""

INIT_PATH = "/.ember/init"
"""Where the image builder writes :data:`INIT_SCRIPT`; the kernel runs it as ``init=``."""

LIB_DIR = "/.ember/lib"

INIT_SCRIPT = """#!/.ember/runtime/bin/python3 -IS
import sys
sys.path.insert(0, "/.ember/lib")
from ember.agent.init import main
main()
"""
"""The exact text of ``/.ember/init`` (mode 0755)."""

SHUTDOWN_EXIT_CODE = 100
"""The agent process exits with this code after a ``shutdown`` request; init then syncs
and powers the VM off. Any other exit is a crash: init restarts the agent."""

PORT_NAME = "ember.agent"
"""Name of the virtio-serial port that carries the protocol."""

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

CONTAINER_SOCKET = "/.ember/run/agent.sock"
"""Where the agent of a container sandbox listens (``/.ember/run`` is a bind mount of the
sandbox's host directory ``vm/``, so the host connects to the same socket)."""

CONTAINER_INIT_CODE = (
    'import sys; sys.path.insert(0, "/.ember/lib"); '
    "from ember.agent.init import container_main; container_main()"
)
"""What the image's interpreter runs (``python3 -IS -c``) as PID 1 of a container sandbox."""
