//! [`Completion`]: one result that many tasks wait for — a pipeline's replies, which every receipt
//! of the batch waits on, or an `XACK` batch, which every `acknowledge` in it waits on. One
//! notification per batch instead of one channel per message.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

/// A value set once, which any number of tasks can wait for: one notification per batch
/// instead of one channel per message. Waiting registers the task's waker once (a task waiting
/// for many acknowledgements of one batch is woken once).
pub(crate) struct Completion<T> {
    value: OnceLock<T>,
    wakers: Mutex<Vec<Waker>>,
}

impl<T> Completion<T> {
    pub(crate) fn new() -> Self {
        Self {
            value: OnceLock::new(),
            wakers: Mutex::new(Vec::new()),
        }
    }

    /// Sets the value (the first call wins) and wakes every waiter.
    pub(crate) fn set(&self, value: T) {
        if self.value.set(value).is_ok() {
            let wakers = std::mem::take(&mut *self.wakers.lock());
            for w in wakers {
                w.wake();
            }
        }
    }

    /// The value, if set.
    pub(crate) fn get(&self) -> Option<&T> {
        self.value.get()
    }

    /// Waits until the value is set.
    pub(crate) fn wait(&self) -> Wait<'_, T> {
        Wait(self)
    }

    fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<&T> {
        if let Some(v) = self.value.get() {
            return Poll::Ready(v);
        }
        let mut wakers = self.wakers.lock();
        // `set` stores the value before it takes the wakers, so a second look under the lock
        // cannot miss it
        if let Some(v) = self.value.get() {
            return Poll::Ready(v);
        }
        if !wakers.iter().rev().take(4).any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The future of [`Completion::wait`]. Dropping it early leaves at most a stale waker behind
/// (one spurious wake-up).
pub(crate) struct Wait<'a, T>(&'a Completion<T>);

impl<'a, T> Future for Wait<'a, T> {
    type Output = &'a T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<&'a T> {
        let completion: &'a Completion<T> = self.0;
        completion.poll_wait(cx)
    }
}
