"""The web console (`GET /`), its static files, and the two small JSON endpoints it reads:
`GET /v1/status` (the cluster, polled once a second) and `GET /v1/examples` (the bundle's example
inputs). The page is plain HTML, CSS and JavaScript shipped in the package (app/console/): no build
step, nothing fetched from anywhere but this gateway, which its Content-Security-Policy enforces.

The page and its files need no token (they hold no data); the JSON endpoints, like inference, need
the bearer token when one is configured, and the page asks for it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from app.deps import AuthorisedDep
from app.errors import NotFoundError
from app.status import status_body

router = APIRouter()
FOLDER = Path(__file__).resolve().parents[1] / "console"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
FILES = {p.name: (p.read_bytes(), TYPES[p.suffix]) for p in sorted(FOLDER.iterdir()) if p.suffix in TYPES}
# Only this origin: scripts, styles, fetches and images (canvas thumbnails are data: URLs, dropped
# files blob: URLs); no inline script, no framing by other sites.
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def _file(name: str) -> Response:
    if name not in FILES:
        raise NotFoundError(f"no console file {name!r}")
    body, media_type = FILES[name]
    return Response(body, media_type=media_type, headers=HEADERS)


@router.get("/", include_in_schema=False)
async def console() -> Response:
    return _file("index.html")


@router.get("/console/{name}", include_in_schema=False)
async def console_file(name: str) -> Response:
    return _file(name)


@router.get("/v1/status")
async def status(gw: AuthorisedDep) -> JSONResponse:
    """Every replica: ready, why not, recent latency (p50/p99 over the last minute), errors, decoded
    answers and patience; the gateway's readiness, requests in flight and open streams."""
    return JSONResponse(status_body(gw))


@router.get("/v1/examples")
async def examples(gw: AuthorisedDep) -> Response:
    """The bundle's example inputs, each a ready-to-send V2 `inputs` list, with their labels."""
    return Response(gw.examples, media_type="application/json")
