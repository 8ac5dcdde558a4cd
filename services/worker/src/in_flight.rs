//! The turns in flight on this worker, by response id: what `POST /v1/responses/{id}/cancel`
//! finds. A turn registers when its response id is assigned and its [`Registration`] guard
//! removes it when the turn ends, on every path. Cancelling fires the turn's token (the turn
//! drops its shard stream and ends with `status: "cancelled"`) and waits for the Response
//! object the turn ends with.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

struct Entry {
    tenant: Arc<str>,
    cancel: CancellationToken,
    done: watch::Receiver<Option<Arc<Value>>>,
}

/// The registry of turns in flight.
#[derive(Default)]
pub struct InFlight {
    turns: Mutex<HashMap<String, Entry>>,
}

impl InFlight {
    /// Registers the turn that owns `id` (a fresh id: never already registered).
    pub fn register(self: &Arc<Self>, tenant: &str, id: &str) -> Registration {
        let cancel = CancellationToken::new();
        let (done_tx, done) = watch::channel(None);
        let entry = Entry { tenant: Arc::from(tenant), cancel: cancel.clone(), done };
        self.turns.lock().insert(id.to_owned(), entry);
        Registration { registry: self.clone(), id: id.to_owned(), cancel, done: done_tx }
    }

    /// Fires the cancellation of `tenant`'s turn `id`, if it is in flight here, and returns
    /// the turn's end: the Response object it finishes with (`None` if it ended without one,
    /// e.g. its client went away first).
    pub async fn cancel(&self, tenant: &str, id: &str) -> Option<Option<Arc<Value>>> {
        let mut done = {
            let turns = self.turns.lock();
            let entry = turns.get(id).filter(|entry| &*entry.tenant == tenant)?;
            entry.cancel.cancel();
            entry.done.clone()
        };
        Some(done.wait_for(Option::is_some).await.ok().and_then(|end| end.clone()))
    }

    /// How many turns are in flight.
    pub fn len(&self) -> usize {
        self.turns.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A turn's place in the registry; dropping it (the turn ended) removes the turn.
pub struct Registration {
    registry: Arc<InFlight>,
    id: String,
    cancel: CancellationToken,
    done: watch::Sender<Option<Arc<Value>>>,
}

impl Registration {
    /// Fires when the response is cancelled.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Publishes the Response object the turn ends with, for a cancel waiting on it.
    pub fn finish(&self, response: Arc<Value>) {
        self.done.send_replace(Some(response));
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.turns.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::InFlight;

    #[tokio::test]
    async fn a_cancel_fires_the_token_and_gets_the_final_object() {
        let registry = Arc::new(InFlight::default());
        let registration = registry.register("acme", "resp_1");
        let token = registration.cancelled().clone();
        let turn = tokio::spawn(async move {
            token.cancelled().await;
            registration.finish(Arc::new(json!({"id": "resp_1", "status": "cancelled"})));
        });
        let end = registry.cancel("acme", "resp_1").await.expect("in flight").expect("an end");
        assert_eq!(end["status"], "cancelled");
        turn.await.unwrap();
        assert!(registry.is_empty(), "the guard removed the turn");
    }

    #[tokio::test]
    async fn another_tenant_and_an_unknown_id_find_nothing() {
        let registry = Arc::new(InFlight::default());
        let registration = registry.register("acme", "resp_1");
        assert!(registry.cancel("other", "resp_1").await.is_none());
        assert!(registry.cancel("acme", "resp_2").await.is_none());
        assert!(!registration.cancelled().is_cancelled(), "nothing was fired");
    }

    #[tokio::test]
    async fn a_turn_that_ends_without_an_object_answers_none() {
        let registry = Arc::new(InFlight::default());
        let registration = registry.register("acme", "resp_1");
        let waiter = {
            let registry = registry.clone();
            tokio::spawn(async move { registry.cancel("acme", "resp_1").await })
        };
        // The cancel registered its wait once the token fired; then the turn goes away.
        registration.cancelled().cancelled().await;
        drop(registration);
        assert_eq!(waiter.await.unwrap(), Some(None));
        assert!(registry.is_empty());
    }
}
