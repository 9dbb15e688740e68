"""Interop (3): trustgraph-base's RabbitMQ consumer receives what a Rust producer sent.

usage: consume.py AMQP_URL QUEUE SUBSCRIPTION COUNT
Declares its queue (printing "ready"), then reads COUNT messages and prints each as JSON on one
line: {"value": <the decoded TextCompletionRequest>, "properties": {...}}.
"""

import asyncio
import json
import sys
from dataclasses import asdict

from common import backend
from trustgraph.schema import TextCompletionRequest


async def main(url, queue, subscription, count):
    b = backend(url)
    consumer = await b.create_consumer(
        topic=queue, subscription=subscription, schema=TextCompletionRequest
    )
    print("ready", flush=True)
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
        await b.close()


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), timeout=60))
