//! A consumer as a [`futures::Stream`] of messages or of batches, the way async-nats
//! subscribers are streams.

use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};

use crate::{Consumer, ErrorKind, Message, Result};

/// How long one `receive` inside a stream waits before it asks again; only affects how soon a
/// dropped stream stops asking.
const POLL: Duration = Duration::from_secs(1);

/// Streams of what a [`Consumer`] receives. Timeouts are not items: the stream waits for the next
/// message; it ends when the consumer (or its backend) is closed; other errors are items, and the
/// stream goes on after them. Acknowledge through the consumer as usual.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tg_backend_api::Result<()> {
/// use futures::StreamExt;
/// use tg_backend_api::{Backend, ConsumerOptions, ConsumerStreams, OutboundMessage};
///
/// let backend = tg_backend_memory::MemoryBackend::new();
/// let topic = tg_topic::topic("streamed")?;
/// let consumer = backend.create_consumer(&topic, ConsumerOptions::new("s")).await?;
/// let producer = backend.create_producer(&topic, Default::default()).await?;
/// for text in ["a", "b", "c"] {
///     producer.send(OutboundMessage::new(text)).await?.await?;
/// }
/// let batch = consumer.batches(10).next().await.unwrap()?;
/// assert_eq!(batch.len(), 3);
/// consumer.acknowledge_batch(&batch).await?;
/// producer.send(OutboundMessage::new("d")).await?.await?;
/// let next = consumer.messages().next().await.unwrap()?;
/// assert_eq!(next.payload().as_ref(), b"d");
/// # Ok(()) }
/// ```
pub trait ConsumerStreams: Consumer {
    /// The messages, one by one.
    fn messages(&self) -> BoxStream<'_, Result<Message>> {
        stream::unfold(false, move |ended| async move {
            if ended {
                return None;
            }
            loop {
                match self.receive(POLL).await {
                    Ok(message) => return Some((Ok(message), false)),
                    Err(e) if e.kind() == ErrorKind::Timeout => continue,
                    Err(e) if e.kind() == ErrorKind::Closed => return None,
                    Err(e) => return Some((Err(e), false)),
                }
            }
        })
        .boxed()
    }

    /// The messages in batches of at most `max` (see [`Consumer::receive_batch`]); never an
    /// empty batch.
    fn batches(&self, max: usize) -> BoxStream<'_, Result<Vec<Message>>> {
        stream::unfold(false, move |ended| async move {
            if ended {
                return None;
            }
            loop {
                match self.receive_batch(max, POLL).await {
                    Ok(batch) if batch.is_empty() => continue,
                    Ok(batch) => return Some((Ok(batch), false)),
                    Err(e) if e.kind() == ErrorKind::Closed => return None,
                    // a bad `max` fails every time: say it once and end
                    Err(e) if e.kind() == ErrorKind::InvalidInput => return Some((Err(e), true)),
                    Err(e) => return Some((Err(e), false)),
                }
            }
        })
        .boxed()
    }
}

impl<C: Consumer + ?Sized> ConsumerStreams for C {}
