//! The declarations of exchanges and queues, with exactly the arguments the Python framework's
//! `AsyncRabbitMQBackend` (trustgraph-base 2.11.1) uses, so that either side may declare first
//! without a `PRECONDITION_FAILED`:
//!
//! - exchange: fanout, durable, not auto-delete, not internal, no arguments;
//! - `flow` (durable) queues: durable, not exclusive, not auto-delete, no arguments;
//! - `request` queues: not durable, not exclusive, not auto-delete, no arguments;
//! - `response` / `notify`: a server-named queue per consumer, exclusive and auto-delete;
//! - the queue is bound to the exchange with its own name as routing key (aio-pika's default;
//!   a fanout exchange ignores it).
//!
//! tg-pubsub adds arguments only where asked to: `x-single-active-consumer` for `Failover`
//! consumers, and `x-queue-type`, `x-dead-letter-exchange`, `x-delivery-limit` from the options.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use std::time::Duration;

use lapin::{Channel, ExchangeKind};
use tg_backend_api::{ConsumerType, Result};

use crate::config::{QueueType, RabbitOptions};
use crate::connection::bounded;
use crate::topic::QueueKind;

/// Declares the topic's fanout exchange (durable, as the framework declares it).
pub(crate) async fn exchange(channel: &Channel, exchange: &str, limit: Duration) -> Result<()> {
    let declare = channel.exchange_declare(
        exchange.into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    );
    bounded(limit, &format!("declaring exchange {exchange}"), declare).await
}

/// The arguments tg-pubsub adds to a queue of `kind` for a consumer of `consumer_type`.
pub(crate) fn arguments(
    kind: QueueKind,
    consumer_type: ConsumerType,
    options: &RabbitOptions,
) -> FieldTable {
    let mut args = FieldTable::default();
    if consumer_type == ConsumerType::Failover {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    if kind.durable() {
        if options.queue_type != QueueType::Classic {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(options.queue_type.as_str().into()),
            );
        }
        if let Some(dlx) = &options.dead_letter_exchange {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(dlx.as_str().into()),
            );
        }
        if let Some(limit) = options.delivery_limit {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(limit)),
            );
        }
    }
    args
}

/// Declares the queue (`name`, or a server-named one when `None`) and binds it to `exchange`;
/// returns the queue's name.
pub(crate) async fn queue(
    channel: &Channel,
    exchange: &str,
    name: Option<&str>,
    kind: QueueKind,
    arguments: FieldTable,
    limit: Duration,
) -> Result<ShortString> {
    let options = match kind {
        QueueKind::Durable => QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        QueueKind::Transient => QueueDeclareOptions::default(),
        QueueKind::AutoDelete => QueueDeclareOptions {
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        QueueKind::PerConsumer => QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
    };
    let declared = bounded(
        limit,
        &format!("declaring queue {}", name.unwrap_or("(server-named)")),
        channel.queue_declare(name.unwrap_or("").into(), options, arguments),
    )
    .await?;
    let queue = declared.name().clone();
    let bind = channel.queue_bind(
        queue.clone(),
        exchange.into(),
        queue.clone(),
        QueueBindOptions::default(),
        FieldTable::default(),
    );
    bounded(
        limit,
        &format!("binding queue {queue} to exchange {exchange}"),
        bind,
    )
    .await?;
    Ok(queue)
}
