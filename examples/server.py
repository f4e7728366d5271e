"""The seed's distributor: run with ``uvicorn server:app`` (Redis on localhost:6379).

Set MINIDASGI_REDIS_URL to use another Redis (redis://[[user]:password@]host[:port][/db]).
"""

import os

from minidasgi import create_path_distributor

app = create_path_distributor(
    url=os.environ.get("MINIDASGI_REDIS_URL", "redis://localhost:6379"),
    routes={
        "/api/([a-z-]+)": r"ASGI-\1",
        "/worker/([0-9]+)": r"worker-queue-\1",
        "/": "ALL-WEBSITE-TRAFFIC",
    },
)
