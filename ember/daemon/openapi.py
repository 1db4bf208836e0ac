"""The API's OpenAPI document, as committed in ``docs/openapi.json`` (a test compares)."""

from __future__ import annotations

import json

from ember.paths import Paths


def document() -> str:
    from ember.daemon.app import create_app

    app = create_app(Paths.from_env())
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"
