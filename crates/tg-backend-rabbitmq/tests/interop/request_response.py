"""Interop (2): trustgraph-base's RequestResponseClient asks a text-completion service.

usage: request_response.py AMQP_URL REQUEST_QUEUE RESPONSE_QUEUE PROMPT
Prints "ready" once its response consumer exists, then the response as JSON on one line.
"""

import asyncio
import json
import sys
from dataclasses import asdict

from common import backend
from trustgraph.base.request_response_client import RequestResponseClient
from trustgraph.schema import TextCompletionRequest, TextCompletionResponse


async def main(url, request_queue, response_queue, prompt):
    b = backend(url)
    client = await RequestResponseClient.create(
        backend=b,
        request_topic=request_queue,
        response_topic=response_queue,
        request_schema=TextCompletionRequest,
        response_schema=TextCompletionResponse,
    )
    try:
        print("ready", flush=True)
        response = await client.request(
            TextCompletionRequest(system="", prompt=prompt), timeout=30
        )
        print(json.dumps(asdict(response)), flush=True)
    finally:
        await client.close()
        await b.close()


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), timeout=60))
