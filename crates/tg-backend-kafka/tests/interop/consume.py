"""Interop (3): trustgraph-base's Kafka consumer receives what a Rust producer sent.

usage: consume.py BOOTSTRAP_SERVERS QUEUE SUBSCRIPTION COUNT
Reads COUNT messages from the start of the topic and prints each as JSON on one line:
{"value": <the decoded TextCompletionRequest>, "properties": {...}}.
"""

import asyncio
import json
import sys
from dataclasses import asdict

from trustgraph.base.async_kafka_backend import AsyncKafkaBackend
from trustgraph.schema import TextCompletionRequest


async def main(bootstrap, queue, subscription, count):
    backend = AsyncKafkaBackend(bootstrap_servers=bootstrap)
    consumer = await backend.create_consumer(
        topic=queue,
        subscription=subscription,
        schema=TextCompletionRequest,
        initial_position="earliest",
    )
    try:
        for _ in range(int(count)):
            msg = await asyncio.wait_for(consumer.receive(), timeout=60)
            print(
                json.dumps({"value": asdict(msg.value()), "properties": msg.properties()}),
                flush=True,
            )
            await consumer.acknowledge(msg)
    finally:
        await consumer.close()
        await backend.close()


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), timeout=90))
