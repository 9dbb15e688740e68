//! The producers and consumers a backend shuts down when it is closed.

use std::fmt;
use std::sync::{Arc, Mutex, Weak};

/// Weak references to the live handles (producers, consumers, …) of a backend, so that
/// [`Backend::close`](crate::Backend::close) can shut down the ones still in use without keeping
/// dropped ones alive. Dead entries are pruned on every [`register`](Self::register).
///
/// ```
/// use std::sync::Arc;
/// use tg_backend_api::HandleRegistry;
///
/// let registry = HandleRegistry::new();
/// let kept = Arc::new("consumer 1");
/// registry.register(&kept);
/// registry.register(&Arc::new("consumer 2")); // dropped at once
/// assert_eq!(registry.drain_live(), vec![kept]);
/// assert!(registry.drain_live().is_empty());
/// ```
pub struct HandleRegistry<T: ?Sized> {
    items: Mutex<Vec<Weak<T>>>,
}

impl<T: ?Sized> HandleRegistry<T> {
    /// An empty registry.
    pub const fn new() -> Self {
        Self {
            items: Mutex::new(Vec::new()),
        }
    }

    /// Keeps a weak reference to `item`, and forgets the entries whose handle was dropped.
    pub fn register(&self, item: &Arc<T>) {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        items.retain(|w| w.strong_count() > 0);
        items.push(Arc::downgrade(item));
    }

    /// Takes every handle still alive, in the order registered, and empties the registry.
    pub fn drain_live(&self) -> Vec<Arc<T>> {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        items.drain(..).filter_map(|w| w.upgrade()).collect()
    }
}

impl<T: ?Sized> Default for HandleRegistry<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: ?Sized> fmt::Debug for HandleRegistry<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let live = items.iter().filter(|w| w.strong_count() > 0).count();
        f.debug_struct("HandleRegistry")
            .field("live", &live)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_handles_are_pruned_and_live_ones_drained_in_order() {
        let registry = HandleRegistry::new();
        let a = Arc::new(1);
        let c = Arc::new(3);
        registry.register(&a);
        {
            let b = Arc::new(2);
            registry.register(&b);
        }
        registry.register(&c);
        assert_eq!(
            registry.items.lock().unwrap().len(),
            2,
            "the dead entry was pruned"
        );
        assert_eq!(format!("{registry:?}"), "HandleRegistry { live: 2 }");
        assert_eq!(registry.drain_live(), vec![a, c]);
        assert!(registry.drain_live().is_empty());
    }
}
