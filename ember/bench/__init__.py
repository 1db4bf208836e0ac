"""``ember bench``: every isolation tier and a traditional full VM measured side by side.

Pure parts (:mod:`stats`, :mod:`model`, :mod:`report`, :mod:`syscalls` parsing) do no I/O;
:mod:`tiers`, :mod:`tradvm`, :mod:`runner`, :mod:`plots` and :mod:`hostinfo` touch the host.
"""

from ember.bench.model import BenchResult, HostInfo, TierResult
from ember.bench.report import comparison_table, render_html, render_markdown

__all__ = [
    "BenchResult",
    "HostInfo",
    "TierResult",
    "comparison_table",
    "render_html",
    "render_markdown",
]
