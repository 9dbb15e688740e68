"""Throughput of trustgraph-base's Kafka backend (aiokafka), for benches/compare.rs.

usage: python_throughput.py BOOTSTRAP_SERVERS QUEUE COUNT PAYLOAD_BYTES
The topic exists (benches/compare.rs creates it: the framework's `ensure_topic` takes the answer
to a description of a missing topic for the topic). Sends COUNT TextCompletionRequests of about
PAYLOAD_BYTES of JSON through the framework's producer (each `send` waits for the broker, as the
framework does) while its consumer receives and acknowledges (commits) them; prints
"<received> <seconds>".
"""

import asyncio
import sys
import time

from trustgraph.base.async_kafka_backend import AsyncKafkaBackend
from trustgraph.schema import TextCompletionRequest


async def main(bootstrap, queue, count, size):
    backend = AsyncKafkaBackend(bootstrap_servers=bootstrap)
    # earliest: aiokafka joins the group on its first fetch, which may come after the first sends
    consumer = await backend.create_consumer(
        topic=queue,
        subscription="bench",
        schema=TextCompletionRequest,
        initial_position="earliest",
    )
    producer = await backend.create_producer(topic=queue, schema=TextCompletionRequest)
    # {"operation": "completion", "system": "", "prompt": "...", ...} of about `size` bytes
    request = TextCompletionRequest(prompt="x" * max(1, size - 120))

    async def produce():
        for _ in range(count):
            await producer.send(request, {})

    async def consume():
        for _ in range(count):
            msg = await asyncio.wait_for(consumer.receive(), timeout=60)
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
    bootstrap, queue, count, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    asyncio.run(main(bootstrap, queue, count, size))
