//! A `socketioxide_redis` driver that survives Redis restarts: pub/sub over RESP3 push messages
//! on a redis-rs `ConnectionManager` with automatic resubscription.
//!
//! The bundled `RedisDriver` uses a plain multiplexed connection: once Redis restarts, every
//! publish fails with a broken pipe and its subscriptions are gone for good. Here the manager
//! reconnects by itself (on the disconnect push, or on the next command) and replays the
//! SUBSCRIBEs it has seen confirmed. A keepalive PING makes it reconnect even when nobody
//! publishes, so an instance that only listens gets its subscriptions back too.
//!
//! Owns the channel -> stream routing; the adapter protocol itself is socketioxide-redis'.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, PushInfo, PushKind, RedisError, Value};
use socketioxide_redis::drivers::{ChanItem, Driver, MessageStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::store::{manager_config, resp3_client};

type Handlers = Arc<RwLock<HashMap<String, mpsc::Sender<ChanItem>>>>;

/// The pub/sub driver. Clones share the connection and the subscriptions.
#[derive(Clone)]
pub struct ManagedDriver {
    conn: ConnectionManager,
    handlers: Handlers,
}

impl ManagedDriver {
    /// Connects to Redis (RESP3 is forced whatever the URL says).
    pub async fn connect(url: &str) -> Result<Self, RedisError> {
        let handlers = Handlers::default();
        let routes = handlers.clone();
        let config = manager_config()
            .set_push_sender(move |push: PushInfo| {
                route(push, &routes);
                Ok::<(), Infallible>(())
            })
            .set_automatic_resubscription();
        let conn = resp3_client(url)?
            .get_connection_manager_with_config(config)
            .await?;
        Ok(ManagedDriver { conn, handlers })
    }

    /// Pings Redis every `interval` so that a lost connection is re-established (and its
    /// channels resubscribed) even while nothing is published. Logs when Redis goes and comes
    /// back. Runs until the returned guard is dropped.
    pub fn spawn_keepalive(&self, interval: Duration) -> KeepAlive {
        let mut conn = self.conn.clone();
        KeepAlive(tokio::spawn(async move {
            let mut up = true;
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let ping: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
                match (ping, up) {
                    (Ok(_), false) => {
                        tracing::info!(
                            "redis pub/sub connection is back (the manager resubscribes the channels)"
                        );
                        up = true;
                    }
                    (Err(e), true) => {
                        tracing::warn!(error = %e, "redis pub/sub connection lost, reconnecting");
                        up = false;
                    }
                    _ => {}
                }
            }
        }))
    }
}

/// The keepalive task of [`ManagedDriver::spawn_keepalive`]; dropping it stops the task.
pub struct KeepAlive(JoinHandle<()>);

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Hands a pub/sub message to the stream of its channel. Runs on the connection's read path:
/// it must not block, so a full stream drops the message (with a warning).
fn route(push: PushInfo, handlers: &Handlers) {
    let (channel, payload) = match push.kind {
        PushKind::Message | PushKind::SMessage => match <[Value; 2]>::try_from(push.data) {
            Ok([channel, payload]) => (channel, payload),
            Err(_) => return,
        },
        PushKind::Disconnection => {
            tracing::debug!("redis pub/sub connection dropped; the manager reconnects");
            return;
        }
        _ => return,
    };
    let (Ok(channel), Ok(payload)) = (
        redis::from_redis_value::<String>(channel),
        redis::from_redis_value::<Vec<u8>>(payload),
    ) else {
        tracing::warn!("malformed pub/sub message from redis, dropped");
        return;
    };
    let handlers = handlers
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match handlers.get(&channel) {
        Some(tx) => {
            if let Err(e) = tx.try_send((channel, payload)) {
                tracing::warn!(error = %e, "socket.io adapter stream full, message dropped");
            }
        }
        None => tracing::debug!(channel, "message on a channel with no handler"),
    }
}

impl Driver for ManagedDriver {
    type Error = RedisError;

    async fn publish(&self, chan: String, val: Vec<u8>) -> Result<(), Self::Error> {
        let _receivers: i64 = self.conn.clone().publish(chan, val).await?;
        Ok(())
    }

    async fn subscribe(
        &self,
        chan: String,
        size: usize,
    ) -> Result<MessageStream<ChanItem>, Self::Error> {
        let (tx, rx) = mpsc::channel(size);
        // Route before subscribing, so the first message cannot arrive before its handler.
        self.handlers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(chan.clone(), tx);
        if let Err(e) = self.conn.clone().subscribe(&chan).await {
            self.handlers
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&chan);
            return Err(e);
        }
        Ok(MessageStream::new(rx))
    }

    async fn unsubscribe(&self, chan: String) -> Result<(), Self::Error> {
        self.handlers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&chan);
        self.conn.clone().unsubscribe(&chan).await
    }

    async fn num_serv(&self, chan: &str) -> Result<u16, Self::Error> {
        let (_, count): (String, u16) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(chan)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_routed_by_channel() {
        let handlers = Handlers::default();
        let (tx, mut rx) = mpsc::channel(1);
        handlers.write().unwrap().insert("chan".to_owned(), tx);
        let push = |channel: &str| PushInfo {
            kind: PushKind::Message,
            data: vec![
                Value::BulkString(channel.as_bytes().to_vec()),
                Value::BulkString(b"payload".to_vec()),
            ],
        };
        route(push("other"), &handlers);
        route(push("chan"), &handlers);
        route(
            PushInfo {
                kind: PushKind::Message,
                data: vec![],
            },
            &handlers,
        );
        assert_eq!(
            rx.try_recv().unwrap(),
            ("chan".to_owned(), b"payload".to_vec())
        );
        assert!(rx.try_recv().is_err());
    }
}
