//! The state every clone of a RabbitMQ backend shares: its configuration, lifecycle and its two
//! connections.

use tg_backend_api::kit::Lifecycle;

use crate::config::RabbitConfig;
use crate::connection::Link;

/// One backend: producers publish on one connection, consumers receive and acknowledge on the
/// other, so acknowledgements never queue behind publishes on the same socket.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) config: RabbitConfig,
    pub(crate) life: Lifecycle,
    pub(crate) producers: Link,
    pub(crate) consumers: Link,
}

impl Core {
    pub(crate) fn new(config: RabbitConfig) -> Self {
        let life = Lifecycle::new("RabbitMQ backend");
        Self {
            producers: Link::new("producers", &config, life.token()),
            consumers: Link::new("consumers", &config, life.token()),
            config,
            life,
        }
    }
}
