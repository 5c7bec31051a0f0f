"""The Python reference stack: FastAPI + sse-starlette + redis.asyncio.

GET /events?channel=<name> streams what is published on the Redis channel sse:<name>, the same
raw path sse-gateway serves. It is written the way a careful team would start: one shared Redis
pub/sub connection per process (not one per client, which would exhaust Redis's and the process's
connections at 10,000 streams), a bounded queue per client, and sse-starlette's pings. It checks
no tokens and keeps no per-user limits; sse-gateway does both in the same runs.
"""

import asyncio
import os

import redis.asyncio as redis
from fastapi import FastAPI, Request
from sse_starlette.sse import EventSourceResponse

PREFIX = "sse:"
redis_client = redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
app = FastAPI()
subscribers: dict[str, set[asyncio.Queue]] = {}
pubsub = None
listener = None


async def listen():
    async for message in pubsub.listen():
        if message["type"] != "message":
            continue
        channel = message["channel"].decode()[len(PREFIX):]
        data = message["data"].decode()
        for queue in list(subscribers.get(channel, ())):
            try:
                queue.put_nowait(data)
            except asyncio.QueueFull:
                pass  # a slow client loses events; the load tool counts them


@app.on_event("startup")
async def start():
    global pubsub, listener
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(PREFIX + "__keepalive__")
    listener = asyncio.create_task(listen())


@app.get("/events")
async def events(request: Request, channel: str):
    queue: asyncio.Queue = asyncio.Queue(maxsize=1024)
    first = channel not in subscribers
    subscribers.setdefault(channel, set()).add(queue)
    if first:
        await pubsub.subscribe(PREFIX + channel)

    async def stream():
        try:
            while True:
                yield {"data": await queue.get()}
        finally:
            group = subscribers.get(channel)
            if group is not None:
                group.discard(queue)
                if not group:
                    del subscribers[channel]
                    await pubsub.unsubscribe(PREFIX + channel)

    return EventSourceResponse(stream(), ping=15)
