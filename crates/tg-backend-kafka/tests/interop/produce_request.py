"""Interop (1): trustgraph-base's Kafka producer sends a TextCompletionRequest.

usage: produce_request.py BOOTSTRAP_SERVERS QUEUE PROMPT ID
QUEUE is the framework's queue name, e.g. flow:tg:text-completion-request:ws1:default.
"""

import asyncio
import sys

from trustgraph.base.async_kafka_backend import AsyncKafkaBackend
from trustgraph.schema import TextCompletionRequest


async def main(bootstrap, queue, prompt, request_id):
    backend = AsyncKafkaBackend(bootstrap_servers=bootstrap)
    producer = await backend.create_producer(topic=queue, schema=TextCompletionRequest)
    await producer.send(
        TextCompletionRequest(system="be brief", prompt=prompt, streaming=True),
        {"id": request_id},
    )
    await producer.close()
    await backend.close()
    print("sent", flush=True)


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), timeout=60))
