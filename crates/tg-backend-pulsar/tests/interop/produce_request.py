"""Interop (1): trustgraph-base's Pulsar producer sends a TextCompletionRequest.

usage: produce_request.py PULSAR_URL QUEUE PROMPT ID
QUEUE is the framework's queue name, e.g. flow:tg:text-completion-request:ws1:default.
"""

import asyncio
import os
import sys

from trustgraph.base.async_pulsar_backend import AsyncPulsarBackend
from trustgraph.schema import TextCompletionRequest


async def main(url, queue, prompt, request_id):
    backend = AsyncPulsarBackend(host=url)
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
    # the Pulsar C++ client sometimes aborts in its destructors at interpreter exit
    # ("terminate called without an active exception"); the work is done and printed by now
    sys.stdout.flush()
    os._exit(0)
