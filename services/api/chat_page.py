"""The chat page at `/`: one static file (static/chat.html, HTML + CSS + JS, no build step) that streams
chat with the served model through /v1/chat/completions from the browser.

The page is public, like /health: it holds no secret. A server started with --api-key checks the key on the
page's API calls, which send what the user types into the page's key field; the key is never written into
the page. The Content-Security-Policy lets the page load nothing from elsewhere and talk only to this server.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).with_name("static") / "chat.html"
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")

chat_page_routes = APIRouter()


@cache
def _page() -> bytes:
    return PAGE.read_bytes()


@chat_page_routes.get("/", include_in_schema=False)
async def chat_page() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                          "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})
