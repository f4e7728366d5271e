"""An ASGI 3 app (Starlette) with streaming, served by a Node: ``python starlette_worker.py``.

Routes /api/items... to it with the seed's distributor (key ASGI-items).
"""

import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from minidasgi import Node


async def item(request):
    return JSONResponse({"item": request.path_params["name"], "query": dict(request.query_params)})


async def ticks(request):
    async def generate():
        for i in range(5):
            yield f"data: tick {i}\n\n"
            await asyncio.sleep(0.1)

    return StreamingResponse(generate(), media_type="text/event-stream")


app = Starlette(
    routes=[Route("/api/items/ticks", ticks), Route("/api/items/{name}", item)],
)

node = Node(
    url=os.environ.get("MINIDASGI_REDIS_URL", "redis://localhost:6379"),
    app=app,
    key="ASGI-items",
)

if __name__ == "__main__":
    node.run()
