"""Interop (1): trustgraph-base's RabbitMQ producer sends a TextCompletionRequest.

usage: produce_request.py AMQP_URL QUEUE PROMPT ID
QUEUE is the framework's queue name, e.g. flow:tg:text-completion-request:ws1:default.
"""

import asyncio
import sys

from common import backend
from trustgraph.schema import TextCompletionRequest


async def main(url, queue, prompt, request_id):
    b = backend(url)
    producer = await b.create_producer(topic=queue, schema=TextCompletionRequest)
    await producer.send(
        TextCompletionRequest(system="be brief", prompt=prompt, streaming=True),
        {"id": request_id},
    )
    await producer.close()
    await b.close()
    print("sent", flush=True)


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), timeout=60))
