"""Interop (2): trustgraph-base's RequestResponseClient asks a text-completion service over Kafka.

usage: request_response.py BOOTSTRAP_SERVERS REQUEST_QUEUE RESPONSE_QUEUE PROMPT
Prints the response as JSON on one line.
"""

import asyncio
import json
import sys
from dataclasses import asdict

from trustgraph.base.async_kafka_backend import AsyncKafkaBackend
from trustgraph.base.request_response_client import RequestResponseClient
from trustgraph.schema import TextCompletionRequest, TextCompletionResponse


async def main(bootstrap, request_queue, response_queue, prompt):
    backend = AsyncKafkaBackend(bootstrap_servers=bootstrap)
    client = await RequestResponseClient.create(
        backend=backend,
        request_topic=request_queue,
        response_topic=response_queue,
        request_schema=TextCompletionRequest,
        response_schema=TextCompletionResponse,
    )
    try:
        response = await client.request(
            TextCompletionRequest(system="", prompt=prompt), timeout=60
        )
        print(json.dumps(asdict(response)), flush=True)
    finally:
        await client.close()
        await backend.close()


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), timeout=90))
