"""What applying a template image's ENV/WORKDIR/USER costs an exec (docs/images.md).

Two sandboxes, in this process (``EMBER_LOCAL=1``): one of ``debian-python`` (no image
metadata: ember's defaults) and one of a template built from a Dockerfile over it that sets
ENV, WORKDIR and USER (every exec gets them). The same trivial command (``true``, argv
form) is run alternately on each, ``--n`` times, and a third series on ``debian-python``
with ``user="nobody"`` given by the caller (what running as another user costs in the
agent, defaults or not); medians and their ratios are printed. The defaults are read once
per connection (one store lookup), then merged into each request.

Run: .venv/bin/python benchmarks/bench_exec_defaults.py [--n 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DOCKERFILE = """\
FROM debian-python
ENV APP_MODE=bench PATH=/usr/local/bin:/usr/bin:/bin
WORKDIR /srv/app
USER nobody
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args()
    os.environ["EMBER_LOCAL"] = "1"
    root = Path(tempfile.mkdtemp(prefix="ebed-", dir="/tmp"))
    cache = Path(os.environ.get("EMBER_CACHE") or "/var/lib/ember/cache")
    os.environ.update(EMBER_HOME=str(root), EMBER_CACHE=str(cache))
    from ember import Sandbox
    from ember.guest.image import build_image
    from ember.paths import Paths
    from ember.store import Store

    paths = Paths(home=root, cache=cache, ram=Path(f"/dev/shm/ember-bench-{root.name}")).ensure()
    store = Store(paths.db)
    build_image(paths, store, "debian-python", force=True)
    store.close()
    ctx = root / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    digest = ""
    plain: list[float] = []
    applied: list[float] = []
    given: list[float] = []  # debian-python with user="nobody" given by the caller
    try:
        digest = Sandbox.build_template("meta", f"dockerfile:{ctx}", paths=paths).digest
        with Sandbox.create("debian-python", paths=paths, timeout=900) as a_sb, \
                Sandbox.create("meta", paths=paths, timeout=900) as b_sb:
            assert b_sb.exec(["pwd"]).stdout == "/srv/app\n"  # the defaults are applied
            for sb in (a_sb, b_sb):  # warm-up
                for _ in range(10):
                    sb.exec(["true"])
            for _ in range(a.n):
                for sb, into, user in ((a_sb, plain, None), (b_sb, applied, None),
                                       (a_sb, given, "nobody")):
                    t0 = time.perf_counter()
                    sb.exec(["true"], user=user)
                    into.append(time.perf_counter() - t0)
    finally:
        if digest:
            shutil.rmtree(paths.images / digest.split(":", 1)[1], ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(paths.ram, ignore_errors=True)
    mp, ma, mg = (statistics.median(x) for x in (plain, applied, given))
    print(f"exec of `true`, {a.n} each, alternating, in-process")
    print(f"{'debian-python (no image metadata)':<48} median {mp * 1e3:7.2f} ms")
    print(f"{'Dockerfile template (ENV, WORKDIR, USER)':<48} median {ma * 1e3:7.2f} ms")
    print(f"{'debian-python, user=nobody given by the caller':<48} median {mg * 1e3:7.2f} ms")
    print(f"{'applied / plain':<48} {ma / mp:7.2f}x")
    print(f"{'applied / caller-given user':<48} {ma / mg:7.2f}x")


if __name__ == "__main__":
    main()
