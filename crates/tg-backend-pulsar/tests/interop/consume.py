"""Interop (3): trustgraph-base's Pulsar consumer receives what a Rust producer sent.

usage: consume.py PULSAR_URL QUEUE SUBSCRIPTION COUNT
Reads COUNT messages from the start of the topic and prints each as JSON on one line:
{"value": <the decoded TextCompletionRequest>, "properties": {...}}.
"""

import asyncio
import os
import json
import sys
from dataclasses import asdict

from trustgraph.base.async_pulsar_backend import AsyncPulsarBackend
from trustgraph.schema import TextCompletionRequest


async def main(url, queue, subscription, count):
    backend = AsyncPulsarBackend(host=url)
    consumer = await backend.create_consumer(
        topic=queue,
        subscription=subscription,
        schema=TextCompletionRequest,
        initial_position="earliest",
    )
    try:
        for _ in range(int(count)):
            msg = await asyncio.wait_for(consumer.receive(), timeout=30)
            print(
                json.dumps({"value": asdict(msg.value()), "properties": msg.properties()}),
                flush=True,
            )
            await consumer.acknowledge(msg)
    finally:
        await consumer.close()
        await backend.close()


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), timeout=60))
    # the Pulsar C++ client sometimes aborts in its destructors at interpreter exit
    # ("terminate called without an active exception"); the work is done and printed by now
    sys.stdout.flush()
    os._exit(0)
