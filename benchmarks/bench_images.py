"""Issue 3 figures: kernel build time, image build time and size, boot-to-init of
`ember image check` next to a raw QEMU command booting the same kernel and image.

    .venv/bin/python benchmarks/bench_images.py [--reps 7] [--skip-kernel] [--skip-debian]

Builds go to a throwaway cache (so they are real builds, not cache hits); the boot
comparison uses the installed cache. Repetitions of ember and raw QEMU are interleaved.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import fmt_ms, median, raw_boot_to_line
from ember.agent import INIT_PATH
from ember.guest import kernel as kmod
from ember.guest.check import check_image
from ember.guest.image import build_image
from ember.paths import Paths
from ember.store import Store


def kernel_build(jobs: int, shared: Paths) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-kernel-", dir="/var/tmp") as d:
        paths = Paths(home=Path(d) / "home", cache=Path(d) / "cache").ensure()
        version = kmod.source_version()
        src = kmod.source_tree(shared, version)
        t0 = time.monotonic()
        if src.is_dir():  # borrow the unpacked tree: measure configure + compile
            mine = kmod.source_tree(paths, version)
            mine.parent.mkdir(parents=True)
            mine.symlink_to(src, target_is_directory=True)
            what = "configure + compile (source already unpacked)"
        else:
            what = "unpack + configure + compile"
        k = kmod.build_kernel(paths, jobs=jobs)
        took = time.monotonic() - t0
        print(f"kernel build, make -j{jobs}, {what}: {took:6.1f} s  "
              f"(bzImage {k.bzimage.stat().st_size / 1e6:.1f} MB, vmlinux "
              f"{k.vmlinux.stat().st_size / 1e6:.1f} MB, release {k.release})")


def image_builds(skip_debian: bool) -> None:
    from tests.oci_fixtures import make_busybox_oci_layout

    with tempfile.TemporaryDirectory(prefix="bench-image-", dir="/var/tmp") as d:
        paths = Paths(home=Path(d) / "home", cache=Path(d) / "cache").ensure()
        store = Store(paths.db)
        layout = make_busybox_oci_layout(Path(d) / "busybox-layout")
        runs: list[tuple[str, str, dict[str, object]]] = [
            ("busybox (OCI layout)", "busybox", {"source": f"oci-layout:{layout}"})]
        if not skip_debian:
            runs.insert(0, ("debian-python (debootstrap, cold)", "debian-python", {}))
            runs.insert(1, ("debian-python (cached debootstrap, new agent)", "debian-python",
                            {"force": True, "rebuild": True}))
        for label, name, kw in runs:
            t0 = time.monotonic()
            rec = build_image(paths, store, name, **kw)  # type: ignore[arg-type]
            took = time.monotonic() - t0
            img = Path(rec.image_path)
            used = int(subprocess.run(["du", "-k", str(img)], capture_output=True,
                                      text=True).stdout.split()[0])
            print(f"image {label:48s}: {took:6.1f} s  ext4 {rec.size_bytes >> 20} MiB "
                  f"apparent, {used >> 10} MiB on disk")


def boot_compare(reps: int) -> None:
    paths = Paths.from_env()
    store = Store(paths.db)
    kernel = kmod.require_kernel(paths)
    names = [t.name for t in store.list_templates()]
    for name in ("debian-python", "busybox"):
        if name not in names:
            continue
        tpl = store.get_template(name)
        ember_s, raw_s = [], []
        for _ in range(reps):
            res = check_image(paths, store, name)
            assert res.ok
            ember_s.append(res.boot_to_init_s)
            raw_s.append(raw_boot_to_line(kernel.bzimage, Path(tpl.image_path),
                                          f"init={INIT_PATH} ember.mode=check",
                                          b"EMBER-CHECK"))
        m_e, m_r = median(ember_s), median(raw_s)
        print(f"boot to init, {name:13s}: ember image check {fmt_ms(m_e)}  raw qemu "
              f"{fmt_ms(m_r)}  ratio {m_e / m_r:.3f}  (medians of {reps}, interleaved)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--skip-debian", action="store_true")
    args = ap.parse_args()
    print(f"host: {os.cpu_count()} CPUs, {shutil.which('qemu-system-x86_64')}")
    boot_compare(args.reps)
    image_builds(args.skip_debian)
    if not args.skip_kernel:
        kernel_build(args.jobs, Paths.from_env())


if __name__ == "__main__":
    main()
