"""The bench report: the comparison table and the Markdown / HTML documents. Pure: plot
files are passed in by name; nothing here reads or writes files."""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ember.bench.model import TIER_ORDER, BenchResult, TierResult
from ember.bench.stats import median, percentile

NA = "n/a"


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return NA
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return NA
    mib = b / 2**20
    return f"{mib:.0f} MiB" if mib >= 10 else f"{mib:.1f} MiB"


def ordered(tiers: Sequence[TierResult]) -> list[TierResult]:
    rank = {name: i for i, name in enumerate(TIER_ORDER)}
    return sorted(tiers, key=lambda t: rank.get(t.name, len(rank)))


def _cells(t: TierResult) -> list[str]:
    """The column of one tier, in :data:`ROW_LABELS` order."""
    if t.unavailable is not None:
        return [f"unavailable: {t.unavailable}"] + ["unavailable"] * (len(ROW_LABELS) - 1)
    n = len(t.first_exec_s)
    p50 = fmt_seconds(percentile(t.first_exec_s, 0.5))
    p99 = fmt_seconds(percentile(t.first_exec_s, 0.99))
    pss = median([float(x) for x in t.idle_pss_bytes])
    if t.density is None:
        density = NA
    else:
        density = f"{t.density} ({t.density_stop})" if t.density_stop else str(t.density)
    thr = t.throughput_per_s
    throughput = (f"{thr:.2f}/s (N={t.parallel_n}"
                  + (f", {t.parallel_failures} failed" if t.parallel_failures else "") + ")"
                  if thr is not None else _problem(t, "parallel"))
    sysc = (f"{len(t.syscalls)} ({t.syscall_pids} host proc.)" if t.syscalls
            else _problem(t, "syscalls"))
    return [
        "measured",
        f"{p50} (n={n})" if n else _problem(t, "first_exec"),
        p99 if n else NA,
        fmt_bytes(pss) if pss is not None else _problem(t, "memory"),
        density if t.density is not None else _problem(t, "density"),
        throughput,
        sysc,
    ]


#: Longest problem note shown in a table cell (the full text is in the tier list).
MAX_CELL_NOTE = 80


def _problem(t: TierResult, key: str) -> str:
    note = t.notes.get(key)
    if not note:
        return NA
    return "not measured: " + (note if len(note) <= MAX_CELL_NOTE
                               else note[:MAX_CELL_NOTE - 3] + "...")


ROW_LABELS: tuple[str, ...] = (
    "status",
    "start to first exec, p50",
    "start to first exec, p99",
    "host memory per idle instance (PSS)",
    "density (idle instances within the bounds)",
    "parallel creation throughput",
    "distinct host syscalls (fixed workload)",
)


def comparison_table(result: BenchResult) -> Table:
    """Rows are measures, columns the tiers (Container, gVisor, microVM, traditional VM)."""
    tiers = ordered(result.tiers)
    columns = [_cells(t) for t in tiers]
    rows = [[label] + [col[i] for col in columns] for i, label in enumerate(ROW_LABELS)]
    return Table(header=[""] + [t.title for t in tiers], rows=rows)


def host_lines(result: BenchResult) -> list[str]:
    h = result.host
    return [
        f"CPU: {h.cpu_model}, {h.cores} cores",
        f"kernel: {h.kernel}",
        f"memory: {fmt_bytes(h.memory_total_bytes)}",
        f"accelerator: {h.accel} ({h.accel_reason})",
        *([f"QEMU: {h.qemu_version}"] if h.qemu_version else []),
        f"run: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(result.started_at))}, "
        f"{result.finished_at - result.started_at:.0f} s",
    ]


def accel_note(accel: str) -> str:
    if accel == "kvm":
        return ("The VM tiers ran under KVM (hardware virtualization): guest code runs at "
                "near-native speed, so these numbers are representative of production hosts.")
    return ("The VM tiers (microVM, traditional VM) ran under QEMU's TCG, a software CPU "
            "emulator, because this host has no usable hardware virtualization (for example "
            "a kvm-pvm host, whose KVM cannot run standard guest kernels). Under TCG guest "
            "code runs roughly 10-20 times slower than under KVM, so guest-side work (kernel "
            "boot, init, Python start, fork/exec) dominates the VM columns: their start "
            "times, exec latencies and throughput are far worse than on a KVM host, and "
            "their memory includes TCG's translation-block cache (up to 64 MiB per VM). "
            "The Container and gVisor columns run natively on the host CPU and are not "
            "affected. Compare the two VM columns with each other; do not read the "
            "container-to-VM ratios here as what a host with KVM would show.")


def method_lines(result: BenchResult) -> list[str]:
    p = result.params
    return [
        f"Start to first exec: create an instance of template `{p.get('template')}` and run "
        f"`true` in it, {p.get('reps')} repetitions per tier, tiers interleaved (the order "
        "rotates each repetition); the instance is destroyed after each sample.",
        "Host memory per idle instance: proportional set size (PSS, from "
        "/proc/PID/smaps_rollup) summed over the instance's host processes (the VMM or "
        f"runtime and its descendants), measured {p.get('settle_s')} s after its first exec, "
        "median over the density instances.",
        f"Density: instances started one by one and kept idle until the total PSS exceeds "
        f"{fmt_bytes(p.get('memory_budget_bytes'))}, an exec of `true` in the newest takes "
        f"over {p.get('latency_bound_ms')} ms, a start fails, or --max-density "
        f"({p.get('max_density')}) is reached; the stop reason is in brackets. The "
        "density counts the instances that fit: not the one that crossed a bound.",
        f"Parallel creation throughput: N={p.get('parallel')} instances created (to first "
        "exec) at once from N threads; successful instances divided by the wall time.",
        "Host syscalls: `strace -f -c` attached to the instance's host processes while it "
        f"runs a fixed workload ({p.get('workload')!r}, {p.get('workload_runs')} times); "
        "the number of distinct syscall names seen. For a container the workload's own "
        "processes are host processes, so their syscalls count; for the VM tiers only "
        "the VMM's are host syscalls; for gVisor the Sentry's and gofer's. This is the "
        "surface the workload exercised, not all that is reachable (bounded by each "
        "tier's seccomp filter), and it varies a little between runs with timing.",
        "Traditional VM: QEMU `q35` with SeaBIOS, Debian's stock cloud kernel "
        "(linux-image-cloud-amd64) and a small initramfs loading its virtio modules, booting "
        "the same template copy-on-write (a qcow2 overlay) and answered by the same ember "
        "agent over virtio-serial-pci.",
    ]


Block = tuple[str, object]


def document(result: BenchResult, plots: Sequence[tuple[str, str]],
             samples_file: str) -> list[Block]:
    """The report as blocks (heading, paragraph, list, table, image), for both renderers."""
    blocks: list[Block] = [
        ("h1", "ember bench: isolation tiers side by side"),
        ("table", comparison_table(result)),
        ("h2", "Host"),
        ("ul", host_lines(result)),
        ("h2", f"What the accelerator ({result.host.accel}) means for these numbers"),
        ("p", accel_note(result.host.accel)),
        ("h2", "Tiers"),
        ("ul", [_tier_line(t) for t in ordered(result.tiers)]),
    ]
    if plots:
        blocks.append(("h2", "Plots"))
        blocks += [("img", (path, alt)) for path, alt in plots]
    blocks += [("h2", "Method"), ("ul", method_lines(result)),
               ("p", f"Raw samples: {samples_file}")]
    return blocks


def _tier_line(t: TierResult) -> str:
    if t.unavailable is not None:
        return f"{t.title}: unavailable: {t.unavailable}"
    line = f"{t.title}: {t.description}" if t.description else t.title
    notes = [f"{k}: {v}" for k, v in sorted(t.notes.items())]
    if t.errors:
        notes.append(f"{len(t.errors)} error(s), first: {t.errors[0]}")
    return line + (" (" + "; ".join(notes) + ")" if notes else "")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(result: BenchResult, plots: Sequence[tuple[str, str]] = (),
                    samples_file: str = "samples.json") -> str:
    out: list[str] = []
    for kind, body in document(result, plots, samples_file):
        if kind == "h1":
            out.append(f"# {body}\n")
        elif kind == "h2":
            out.append(f"## {body}\n")
        elif kind == "p":
            out.append(f"{body}\n")
        elif kind == "ul":
            assert isinstance(body, list)
            out.append("".join(f"- {line}\n" for line in body))
        elif kind == "table":
            assert isinstance(body, Table)
            out.append(markdown_table(body))
        elif kind == "img":
            assert isinstance(body, tuple)
            path, alt = body
            out.append(f"![{alt}]({path})\n")
    return "\n".join(out)


def markdown_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in t.header) + " |",
             "|" + "|".join("---" for _ in t.header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.3em .6em;"
        "text-align:left;vertical-align:top}th{background:#eee}img{max-width:100%}")


def render_html(result: BenchResult, plots: Sequence[tuple[str, str]] = (),
                samples_file: str = "samples.json") -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
           "<title>ember bench</title>", f"<style>{_CSS}</style></head><body>"]
    for kind, body in document(result, plots, samples_file):
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{e(str(body))}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(str(body))}</p>")
        elif kind == "ul":
            assert isinstance(body, list)
            out.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in body) + "</ul>")
        elif kind == "table":
            assert isinstance(body, Table)
            head = "".join(f"<th>{e(h)}</th>" for h in body.header)
            rows = "".join("<tr>" + f"<th>{e(r[0])}</th>" + "".join(
                f"<td>{e(c)}</td>" for c in r[1:]) + "</tr>" for r in body.rows)
            out.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "img":
            assert isinstance(body, tuple)
            path, alt = body
            out.append(f"<p><img src=\"{e(path)}\" alt=\"{e(alt)}\"></p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def summary_json(result: BenchResult) -> dict[str, object]:
    """The short summary ``--json`` prints: the table's numbers, machine-readable."""
    tiers: dict[str, object] = {}
    for t in ordered(result.tiers):
        if t.unavailable is not None:
            tiers[t.name] = {"status": "unavailable", "reason": t.unavailable}
            continue
        tiers[t.name] = {
            "status": "measured",
            "first_exec_p50_s": percentile(t.first_exec_s, 0.5),
            "first_exec_p99_s": percentile(t.first_exec_s, 0.99),
            "first_exec_n": len(t.first_exec_s),
            "idle_pss_bytes": median([float(x) for x in t.idle_pss_bytes]),
            "density": t.density,
            "density_stop": t.density_stop,
            "parallel_n": t.parallel_n,
            "throughput_per_s": t.throughput_per_s,
            "distinct_syscalls": len(t.syscalls) if t.syscalls else None,
            "notes": dict(t.notes),
        }
    return {"host": result.host.to_json(), "params": result.params, "tiers": tiers}
