"""Where ember logs: ``$EMBER_HOME/logs/ember.log`` (and stderr with ``--verbose``)."""

from __future__ import annotations

import logging
import sys

from ember.paths import Paths


def setup_logging(verbose: bool) -> Paths:
    paths = Paths.from_env()
    try:
        paths.logs.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(paths.logs / "ember.log")
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s "
                                           "%(message)s"))
    root = logging.getLogger("ember")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG)
    if verbose:
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(logging.DEBUG)
        root.addHandler(stream)
    return paths
