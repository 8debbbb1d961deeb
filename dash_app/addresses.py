"""Wrong addresses: an unknown page, or a page asked for something the run does not hold (a
feature set, a family, a painting, an artist). The page says what is wrong and where to go
instead; the server sends that page with a 404 status, so a link checker sees the error too.

Each page module may define `problem(data, **values) -> str | None` over its path values and
query; the layout shows the same sentence that makes the status a 404.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from flask import Flask, Response, request

from dash_app.data import RunData

#: The rules under which Dash serves its one HTML page for any address.
INDEX_RULES = frozenset({"/", "/<path:path>"})


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"<(\w+)>", template)
    regex = "".join(re.escape(p) if n % 2 == 0 else f"(?P<{p}>[^/]+)"
                    for n, p in enumerate(parts))
    return re.compile(f"^{regex}/?$")


class Addresses:
    """The app's pages by path (or path template), and what is wrong with an address."""

    def __init__(self, pages: Sequence[tuple[ModuleType, str]]) -> None:
        self.pages = [(module, _pattern(path)) for module, path in pages]

    def page_of(self, path: str) -> tuple[ModuleType, dict[str, str]] | None:
        """The page module an address opens and its path values, or None."""
        for module, pattern in self.pages:
            found = pattern.match(path)
            if found:
                return module, found.groupdict()
        return None

    def problem(self, data: RunData, path: str, query: dict[str, Any]) -> str | None:
        """Why the address names nothing in the run, in a sentence; None when it is fine."""
        found = self.page_of(path)
        if found is None:
            return "There is no page at this address."
        module, values = found
        check = getattr(module, "problem", None)
        if check is None:
            return None
        # As Dash Pages hands them to the layout: the query over the path's values (and no
        # value may pose as the run itself).
        asked = {k: v for k, v in {**values, **query}.items() if k != "data"}
        return check(data, **asked)

    def install(self, server: Flask, data: RunData) -> None:
        """Answer Dash's HTML page with a 404 status where the address is wrong."""

        @server.after_request
        def status(response: Response) -> Response:
            rule = request.url_rule
            if (request.method == "GET" and response.status_code == 200 and rule is not None
                    and rule.rule in INDEX_RULES
                    and self.problem(data, request.path, request.args.to_dict()) is not None):
                response.status_code = 404
            return response


def unknown_features(data: RunData, features: str | None) -> str | None:
    """The sentence for a feature set the run has not clustered, None when it is fine (or none
    is clustered yet: the page then says which stage to run)."""
    if features is None or not data.features or features in data.clusterings:
        return None
    return f"There is no feature set '{features}' in this run (it has {', '.join(data.features)})."
