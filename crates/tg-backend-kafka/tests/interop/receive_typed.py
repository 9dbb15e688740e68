"""Interop: the framework's Kafka consumer receives messages of any schema type.

usage: receive_typed.py BOOTSTRAP_SERVERS QUEUE CLASS SUBSCRIPTION COUNT
Prints each message as JSON on one line: {"value": <what the framework's own
dataclass_to_dict makes of the decoded value>, "properties": {...}}.
"""

import asyncio
import json
import sys

import trustgraph.schema as schema
from trustgraph.base.async_kafka_backend import AsyncKafkaBackend
from trustgraph.base.serialization import dataclass_to_dict


async def main(url, queue, class_name, subscription, count):
    cls = getattr(schema, class_name)
    backend = AsyncKafkaBackend(bootstrap_servers=url)
    consumer = await backend.create_consumer(
        topic=queue, subscription=subscription, schema=cls, initial_position="earliest"
    )
    try:
        for _ in range(int(count)):
            msg = await asyncio.wait_for(consumer.receive(), timeout=60)
            value = msg.value()
            assert isinstance(value, cls), f"decoded {type(value)}, not {cls}"
            print(
                json.dumps({"value": dataclass_to_dict(value), "properties": msg.properties()}),
                flush=True,
            )
            await consumer.acknowledge(msg)
    finally:
        await consumer.close()
        await backend.close()


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:6]), timeout=90))
