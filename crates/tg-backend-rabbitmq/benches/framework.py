"""The Python framework's own producer and consumer on RabbitMQ, for benches/compare.rs.

usage: framework.py AMQP_URL QUEUE N
QUEUE is a framework queue id (flow:tg:NAME). Declares the consumer first, then a producer task
sends N TextCompletionRequests (about 200 bytes of JSON) while the consumer receives and
acknowledges them. Prints one line: "<N> <seconds>" (first send to last acknowledgement).
"""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "interop"))

from common import backend  # noqa: E402
from trustgraph.schema import TextCompletionRequest  # noqa: E402


async def main(url, queue, n):
    n = int(n)
    b = backend(url)
    consumer = await b.create_consumer(
        topic=queue, subscription="bench", schema=TextCompletionRequest
    )
    producer = await b.create_producer(topic=queue, schema=TextCompletionRequest)
    prompt = "x" * 150

    async def produce():
        for i in range(n):
            await producer.send(TextCompletionRequest(system="", prompt=prompt), {"id": str(i)})

    start = time.monotonic()
    sender = asyncio.create_task(produce())
    for _ in range(n):
        msg = await asyncio.wait_for(consumer.receive(), timeout=60)
        msg.value()
        await consumer.acknowledge(msg)
    elapsed = time.monotonic() - start
    await sender
    await producer.close()
    await consumer.close()
    await b.close()
    print(f"{n} {elapsed:.3f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
