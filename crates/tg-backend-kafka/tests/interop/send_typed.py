"""Interop: the framework's Kafka producer sends one message of any schema type.

usage: send_typed.py BOOTSTRAP_SERVERS QUEUE CLASS JSON ID
CLASS is a class name of trustgraph.schema (TextCompletionRequest, Triples, ...); JSON is the
message as the framework would read it off the wire (its own dict_to_dataclass builds it).
"""

import asyncio
import json
import sys

import trustgraph.schema as schema
from trustgraph.base.async_kafka_backend import AsyncKafkaBackend
from trustgraph.base.serialization import dict_to_dataclass


async def main(url, queue, class_name, payload, message_id):
    cls = getattr(schema, class_name)
    value = dict_to_dataclass(json.loads(payload), cls)
    backend = AsyncKafkaBackend(bootstrap_servers=url)
    producer = await backend.create_producer(topic=queue, schema=cls)
    await producer.send(value, {"id": message_id})
    await producer.close()
    await backend.close()
    print("sent", flush=True)


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:6]), timeout=90))
