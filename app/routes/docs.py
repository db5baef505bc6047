"""`GET /docs` and `GET /redoc`: the gateway's API reference as one page it serves itself, built from
its OpenAPI document. FastAPI's own pages load Swagger UI and ReDoc from a CDN, so without internet
(or under a Content-Security-Policy like the console's) they are blank; this page has no script and
nothing from anywhere else: every route with its summary, and a link to `/openapi.json` for the
tools that render or generate clients from it.
"""

from __future__ import annotations

import base64
import hashlib
from html import escape
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

router = APIRouter()
OPENAPI_URL = "/openapi.json"
STYLE = (
    "body{font:15px/1.45 system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem}"
    "table{border-collapse:collapse;width:100%}th,td{text-align:left;vertical-align:top;"
    "padding:.35rem .6rem;border-bottom:1px solid #ddd}code{font-size:.95em}"
    ".m{font-weight:600;font-family:monospace}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
# Nothing runs; nothing loads but the console's icon; the one inline stylesheet is allowed by its hash.
POLICY = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
HEADERS = {"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff"}
_PAGE: dict[str, bytes] = {}  # the document never changes while the process runs


@router.get("/docs", include_in_schema=False)
@router.get("/redoc", include_in_schema=False)
async def docs(request: Request) -> Response:
    if not _PAGE:
        _PAGE["page"] = render_page(request.app.openapi()).encode()
    return Response(_PAGE["page"], media_type="text/html; charset=utf-8", headers=HEADERS)


def render_page(document: dict[str, Any]) -> str:
    """The OpenAPI document as HTML: a table of every operation (method, path, summary, the first
    paragraph of its description) and the link to the full document."""
    info = document.get("info", {})
    title = escape(f"{info.get('title', 'API')} {info.get('version', '')}".strip())
    rows = [
        _row(method, path, operation)
        for path, operations in document.get("paths", {}).items()
        for method, operation in operations.items()
    ]
    return (
        f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}: API</title>\n'
        '<link rel="icon" href="/console/favicon.svg" type="image/svg+xml">\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n"
        f'<p>The full OpenAPI document: <a href="{OPENAPI_URL}">{OPENAPI_URL}</a> (open it in any OpenAPI '
        "viewer or client generator). The protocol and examples: the README's "
        "&ldquo;Using the service&rdquo;.</p>\n"
        "<table>\n<thead><tr><th>method</th><th>path</th><th>what it does</th></tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody>\n</table>\n</body>\n</html>\n"
    )


def _row(method: str, path: str, operation: dict[str, Any]) -> str:
    description = (operation.get("description") or "").split("\n\n", 1)[0].strip()
    summary = escape(operation.get("summary", ""))
    detail = f": {escape(description)}" if description else ""
    return (
        f'<tr><td class="m">{escape(method.upper())}</td><td><code>{escape(path)}</code></td>'
        f"<td>{summary}{detail}</td></tr>"
    )
