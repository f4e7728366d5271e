"""The seed's class-style worker on the list ASGI-testing: run with ``python worker.py``.

It answers the paths that route to ASGI-testing, such as /api/testing.
"""

import os

from minidasgi import Node


class ASGIApp:
    def __init__(self, scope):
        self.scope = scope

    async def __call__(self, receive, send):
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"Hello World!"})


node = Node(
    url=os.environ.get("MINIDASGI_REDIS_URL", "redis://localhost:6379"),
    cls=ASGIApp,
    key="ASGI-testing",
)

if __name__ == "__main__":
    print("Starting worker", flush=True)
    node.run()
