"""Throughput of trustgraph-base's Pulsar backend, for benches/compare.rs.

usage: python_throughput.py PULSAR_URL QUEUE COUNT PAYLOAD_BYTES
Sends COUNT TextCompletionRequests of about PAYLOAD_BYTES of JSON through the framework's
producer (each `send` waits for the broker, as the framework does) while its consumer receives
and acknowledges them; prints "<received> <seconds>".
"""

import asyncio
import os
import sys
import time

from trustgraph.base.async_pulsar_backend import AsyncPulsarBackend
from trustgraph.schema import TextCompletionRequest


async def main(url, queue, count, size):
    backend = AsyncPulsarBackend(host=url)
    consumer = await backend.create_consumer(
        topic=queue, subscription="bench", schema=TextCompletionRequest
    )
    producer = await backend.create_producer(topic=queue, schema=TextCompletionRequest)
    # {"operation": "completion", "system": "", "prompt": "...", ...} of about `size` bytes
    request = TextCompletionRequest(prompt="x" * max(1, size - 120))

    async def produce():
        for _ in range(count):
            await producer.send(request, {})

    async def consume():
        for _ in range(count):
            msg = await asyncio.wait_for(consumer.receive(), timeout=30)
            msg.value()
            await consumer.acknowledge(msg)

    t0 = time.monotonic()
    await asyncio.gather(produce(), consume())
    took = time.monotonic() - t0
    print(count, took, flush=True)
    await producer.close()
    await consumer.close()
    await backend.close()


if __name__ == "__main__":
    url, queue, count, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    asyncio.run(main(url, queue, count, size))
    # the Pulsar C++ client sometimes aborts in its destructors at interpreter exit
    # ("terminate called without an active exception"); the work is done and printed by now
    sys.stdout.flush()
    os._exit(0)
