"""Interop (2): trustgraph-base's RequestResponseClient asks a text-completion service.

usage: request_response.py PULSAR_URL REQUEST_QUEUE RESPONSE_QUEUE PROMPT
Prints the response as JSON on one line.
"""

import asyncio
import os
import json
import sys
from dataclasses import asdict

from trustgraph.base.async_pulsar_backend import AsyncPulsarBackend
from trustgraph.base.request_response_client import RequestResponseClient
from trustgraph.schema import TextCompletionRequest, TextCompletionResponse


async def main(url, request_queue, response_queue, prompt):
    backend = AsyncPulsarBackend(host=url)
    client = await RequestResponseClient.create(
        backend=backend,
        request_topic=request_queue,
        response_topic=response_queue,
        request_schema=TextCompletionRequest,
        response_schema=TextCompletionResponse,
    )
    try:
        response = await client.request(
            TextCompletionRequest(system="", prompt=prompt), timeout=30
        )
        print(json.dumps(asdict(response)), flush=True)
    finally:
        await client.close()
        await backend.close()


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), timeout=60))
    # the Pulsar C++ client sometimes aborts in its destructors at interpreter exit
    # ("terminate called without an active exception"); the work is done and printed by now
    sys.stdout.flush()
    os._exit(0)
