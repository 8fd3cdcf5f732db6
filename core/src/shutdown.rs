//! One shutdown signal for the whole process.
//!
//! `main` owns the [`Shutdown`] and triggers it on SIGINT/SIGTERM; every task holds a
//! clone and stops taking new input once [`Shutdown::wait`] returns, then drains what it
//! already holds. Built on a `watch` channel so late subscribers still see the signal.

use tokio::sync::watch;

/// A cloneable, level-triggered shutdown signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: std::sync::Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal that has not fired.
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Self {
            tx: std::sync::Arc::new(tx),
            rx,
        }
    }

    /// Fires the signal; every clone sees it.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether the signal has fired.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once the signal has fired (at once if it already has).
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means every sender is gone, which can only happen at teardown.
        let _ = rx.wait_for(|fired| *fired).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn clones_see_the_trigger() {
        let shutdown = Shutdown::new();
        let other = shutdown.clone();
        assert!(!other.is_triggered());
        let waiter = tokio::spawn(async move { other.wait().await });
        shutdown.trigger();
        waiter.await.expect("waiter task");
        assert!(shutdown.clone().is_triggered());
    }
}
