"""Shared by the interop scripts: the framework's RabbitMQ backend from an amqp:// URL."""

import urllib.parse

from trustgraph.base.async_rabbitmq_backend import AsyncRabbitMQBackend


def backend(url):
    """AsyncRabbitMQBackend for amqp://user:password@host:port/vhost (the framework's settings)."""
    u = urllib.parse.urlparse(url)
    vhost = urllib.parse.unquote(u.path[1:]) if len(u.path) > 1 else "/"
    return AsyncRabbitMQBackend(
        host=u.hostname,
        port=u.port or 5672,
        username=urllib.parse.unquote(u.username or "guest"),
        password=urllib.parse.unquote(u.password or "guest"),
        vhost=vhost,
    )
