"""Interop (4): the framework declares a queue's exchange and queue (as its consumer does) and
leaves them, so that a Rust consumer of the same subscription can declare second, or does so
after a Rust consumer declared first.

usage: declare.py AMQP_URL QUEUE SUBSCRIPTION
Prints "declared", or the exception (e.g. PRECONDITION_FAILED) and exits 1.
"""

import asyncio
import sys

from common import backend
from trustgraph.schema import TextCompletionRequest


async def main(url, queue, subscription):
    b = backend(url)
    try:
        consumer = await b.create_consumer(
            topic=queue, subscription=subscription, schema=TextCompletionRequest
        )
        await consumer.close()
        print("declared", flush=True)
    finally:
        await b.close()


if __name__ == "__main__":
    try:
        asyncio.run(asyncio.wait_for(main(*sys.argv[1:4]), timeout=60))
    except Exception as e:  # noqa: BLE001 - the test reads what failed
        print(f"{type(e).__name__}: {e}", flush=True)
        sys.exit(1)
