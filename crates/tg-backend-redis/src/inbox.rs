//! [`Inbox`]: a consumer's buffer of received messages. The stream consumer's reader fills it a
//! batch at a time, the q0 dispatcher one message at a time; any number of tasks calling
//! `receive` take from it.

use std::collections::VecDeque;
use std::time::Duration;

use parking_lot::Mutex;
use tg_backend_api::{receive_timeout, Error, Message, Result};
use tokio::sync::Notify;
use tokio::time::Instant;

/// What [`Inbox::pop`] found.
enum Popped {
    Message(Message),
    Empty,
    Closed,
}

struct InboxState {
    buf: VecDeque<Message>,
    /// Receivers waiting for a message (only then does a push notify).
    waiting: usize,
    /// The reader waits for the buffer to shrink to this many messages.
    room_wanted: Option<usize>,
    closed: bool,
}

/// A consumer's buffer of received messages: the reader (or the pub/sub dispatcher) pushes, any
/// number of tasks calling `receive` pop. A pop is one uncontended lock; nobody is notified
/// unless someone waits.
pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    available: Notify,
    room: Notify,
    /// Called when a receiver made the room the reader waits for, before the reader can see it.
    room_hook: Option<Box<dyn Fn() + Send + Sync>>,
}

impl Inbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(InboxState {
                buf: VecDeque::with_capacity(capacity),
                waiting: 0,
                room_wanted: None,
                closed: false,
            }),
            available: Notify::new(),
            room: Notify::new(),
            room_hook: None,
        }
    }

    /// Sets what to call when a receiver made the room the reader waits for. It runs under the
    /// inbox's lock, so it runs before the reader can see the room and read (the stream
    /// consumer tells its acknowledgement queue that a read is coming: acknowledgements made
    /// meanwhile go along with it instead of waking the acknowledger for a round trip of its
    /// own).
    pub(crate) fn set_room_hook(&mut self, hook: impl Fn() + Send + Sync + 'static) {
        self.room_hook = Some(Box::new(hook));
    }

    /// The next message, waiting up to `timeout` (a consumer's `receive`); `Closed` once the
    /// inbox is closed and empty.
    ///
    /// The wait is boxed: the kit moves the future of every `receive` into its own, and most
    /// calls find a message buffered, so the future stays a few words instead of carrying a
    /// timer and a notification it rarely uses.
    pub(crate) async fn receive(&self, timeout: Duration) -> Result<Message> {
        // fast path: a buffered message needs no timer
        if let Some(m) = self.try_pop() {
            return Ok(m);
        }
        match self.pop() {
            Popped::Message(m) => return Ok(m),
            Popped::Closed => return Err(Error::closed("consumer")),
            Popped::Empty if timeout.is_zero() => return Err(receive_timeout(timeout)),
            Popped::Empty => {}
        }
        if let Some(m) = Box::pin(self.pop_wait(timeout)).await {
            return Ok(m);
        }
        match self.pop() {
            Popped::Message(m) => Ok(m),
            Popped::Closed => Err(Error::closed("consumer")),
            Popped::Empty => Err(receive_timeout(timeout)),
        }
    }

    /// Up to `max` (at least 1) messages: the first within `timeout`, then what is buffered
    /// (a consumer's `receive_batch`): one lock for the whole batch, however many it takes. An
    /// empty batch when none came; `Closed` once the inbox is closed and empty.
    pub(crate) async fn receive_batch(
        &self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Message>> {
        let mut batch = Vec::new();
        if self.take_into(&mut batch, max) {
            return Ok(batch);
        }
        if self.state.lock().closed {
            return Err(Error::closed("consumer"));
        }
        if timeout.is_zero() {
            return Ok(batch);
        }
        match Box::pin(self.pop_wait(timeout)).await {
            Some(first) => {
                batch.push(first);
                if max > 1 {
                    self.take_into(&mut batch, max);
                }
                Ok(batch)
            }
            // the wait ended without a message: a late one is still taken, else timed out or
            // closed
            None if self.take_into(&mut batch, max) => Ok(batch),
            None if self.state.lock().closed => Err(Error::closed("consumer")),
            None => Ok(batch),
        }
    }

    /// Moves buffered messages into `batch` until it holds `max`; whether it holds any.
    fn take_into(&self, batch: &mut Vec<Message>, max: usize) -> bool {
        let mut s = self.state.lock();
        let n = (max - batch.len()).min(s.buf.len());
        if n > 0 {
            batch.reserve(n);
            batch.extend(s.buf.drain(..n));
        }
        let room = n > 0 && self.room_made(&mut s);
        drop(s);
        if room {
            self.room.notify_one();
        }
        !batch.is_empty()
    }

    /// Whether taking messages made the room the reader waits for (then it is told, under the
    /// lock, before it can see the room: see [`Inbox::set_room_hook`]); the caller wakes it.
    #[inline]
    fn room_made(&self, s: &mut InboxState) -> bool {
        match s.room_wanted {
            Some(limit) if s.buf.len() <= limit => {
                s.room_wanted = None;
                if let Some(hook) = &self.room_hook {
                    hook();
                }
                true
            }
            _ => false,
        }
    }

    /// Takes the next message if there is one (the fast path of `receive`).
    #[inline]
    fn try_pop(&self) -> Option<Message> {
        let mut s = self.state.lock();
        let m = s.buf.pop_front()?;
        let room = self.room_made(&mut s);
        drop(s);
        if room {
            self.room.notify_one();
        }
        Some(m)
    }

    /// Takes the next message, if any. Buffered messages are still handed out after `close`.
    fn pop(&self) -> Popped {
        match self.pop_or_wait(false) {
            Ok(p) => p,
            Err(_) => Popped::Empty,
        }
    }

    /// Pops; when empty (and open) and `register`, counts the caller as waiting in the same
    /// critical section, so a push right after is sure to notify it.
    fn pop_or_wait(&self, register: bool) -> Result<Popped, Waiting<'_>> {
        let mut s = self.state.lock();
        match s.buf.pop_front() {
            Some(m) => {
                let room = self.room_made(&mut s);
                drop(s);
                if room {
                    self.room.notify_one();
                }
                Ok(Popped::Message(m))
            }
            None if s.closed => Ok(Popped::Closed),
            None if register => {
                s.waiting += 1;
                Err(Waiting(self))
            }
            None => Ok(Popped::Empty),
        }
    }

    /// Waits up to `timeout` for a message: `None` when none came (or the inbox closed and is
    /// empty; the caller tells these apart with its own state).
    async fn pop_wait(&self, timeout: Duration) -> Option<Message> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let waiting = match self.pop_or_wait(true) {
                Ok(Popped::Message(m)) => return Some(m),
                Ok(_) => return None,
                Err(w) => w,
            };
            let woken = tokio::time::timeout_at(deadline, notified).await.is_ok();
            drop(waiting);
            if !woken {
                return match self.pop() {
                    Popped::Message(m) => Some(m),
                    _ => None,
                };
            }
        }
    }

    /// Appends messages (the reader's batch, left empty) and wakes waiting receivers. When the
    /// buffer is empty (the consumer keeps up), the two buffers are swapped instead of moving
    /// every message.
    pub(crate) fn push_all(&self, messages: &mut VecDeque<Message>) {
        if messages.is_empty() {
            return;
        }
        let mut s = self.state.lock();
        if s.buf.is_empty() {
            std::mem::swap(&mut s.buf, messages);
        } else {
            s.buf.append(messages);
        }
        let wake = s.waiting > 0;
        drop(s);
        if wake {
            self.available.notify_waiters();
        }
    }

    /// Appends one message unless `capacity` messages are buffered (then it is dropped and
    /// `false` returned).
    pub(crate) fn push_bounded(&self, message: Message, capacity: usize) -> bool {
        let mut s = self.state.lock();
        if s.closed || s.buf.len() >= capacity {
            return false;
        }
        s.buf.push_back(message);
        let wake = s.waiting > 0;
        drop(s);
        if wake {
            self.available.notify_waiters();
        }
        true
    }

    /// Whether at most `limit` messages are buffered.
    pub(crate) fn has_room(&self, limit: usize) -> bool {
        self.state.lock().buf.len() <= limit
    }

    /// Waits until at most `limit` messages are buffered (the reader, before it reads a batch).
    pub(crate) async fn wait_room(&self, limit: usize) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.state.lock();
                if s.buf.len() <= limit || s.closed {
                    s.room_wanted = None;
                    return;
                }
                s.room_wanted = Some(limit);
            }
            notified.await;
        }
    }

    /// No more messages come: waiting receivers get `None` once the buffer is empty.
    pub(crate) fn close(&self) {
        self.state.lock().closed = true;
        self.available.notify_waiters();
        self.room.notify_one();
    }
}

/// A receiver counted as waiting (by [`Inbox::pop_or_wait`]) until dropped, also when its
/// `receive` is cancelled.
struct Waiting<'a>(&'a Inbox);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.state.lock().waiting -= 1;
    }
}
