"""GET /: one page for the person who reads the radiograph, served by the app itself.

No build step and no CDN: plain HTML, CSS and JavaScript from ``app/page``, so it works on a
closed hospital network. It calls the same ``/v1`` API as every other client. The Greulich & Pyle
SD table it charts is the one the service assesses with, put into the page when it is served.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from app.assessment import SD_SOURCE, sd_table

router = APIRouter(tags=["page"])
PAGE = Path(__file__).parent.parent / "page" / "index.html"


@lru_cache
def render() -> str:
    table = {sex: [[float(a), float(s)] for a, s in zip(*sd_table()[sex], strict=True)] for sex in ("male", "female")}
    reference = json.dumps({"sd": table, "source": SD_SOURCE}).replace("</", "<\\/")
    return PAGE.read_text().replace("/*REFERENCE*/null", reference)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """The bone-age page: drop a radiograph, read the answer, print the report."""
    return HTMLResponse(render(), headers={"Cache-Control": "no-cache"})
