//! The subscription lease of exclusive and failover consumers: a key `…/lease/<subscription>`
//! holding `<type>:<token>` with an expiry of `lease`. The holder reads and renews it every third
//! of the lease; a failover standby tries to take it every fifth (at most every second); it is
//! released (compare-and-delete) on close, and expires after a crash.

use std::sync::Arc;
use std::time::Duration;

use tg_backend_api::{ConsumerType, Error, ErrorKind, Result, Topic};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::scripts::{LEASE_RELEASE, LEASE_RENEW};
use crate::topic::Names;

/// Joins the subscription as a consumer of type `ty`: a shared consumer only while nobody holds
/// the lease; an exclusive one by taking it; a failover one by taking it or, when another failover
/// consumer holds it, standing by. Returns the lease token (exclusive and failover) and sets
/// `active` when this consumer may read.
pub(crate) async fn join(
    core: &Core,
    topic: &Topic,
    names: &Names,
    ty: ConsumerType,
    active: &watch::Sender<bool>,
) -> Result<Option<String>> {
    if ty == ConsumerType::Shared {
        if let Some(holder) = holder(core, &names.lease).await? {
            return Err(busy(topic, &names.group, &holder, ty));
        }
        active.send_replace(true);
        return Ok(None);
    }
    let token = format!("{ty}:{}", uuid::Uuid::new_v4().simple());
    if try_acquire(core, &names.lease, &token).await? {
        active.send_replace(true);
    } else {
        let holder = holder(core, &names.lease).await?.unwrap_or_default();
        if ty == ConsumerType::Exclusive || !holder.starts_with("failover:") {
            return Err(busy(topic, &names.group, &holder, ty));
        }
        tracing::debug!(%topic, subscription = %names.group, "failover consumer stands by");
    }
    Ok(Some(token))
}

fn busy(topic: &Topic, group: &str, holder: &str, wanted: ConsumerType) -> Error {
    let held_by = holder.split(':').next().unwrap_or("another");
    Error::new(
        ErrorKind::ConsumerBusy,
        format!(
            "subscription {group:?} already has an active {held_by} consumer (its lease is held); \
             a {wanted} consumer cannot join"
        ),
    )
    .with_context("topic", topic)
}

async fn holder(core: &Core, key: &str) -> Result<Option<String>> {
    let mut conn = core.conn();
    core.bounded(
        redis::cmd("GET")
            .arg(key)
            .query_async::<Option<String>>(&mut conn),
    )
    .await?
    .map_err(|e| core.err(e, "reading the subscription lease failed"))
}

async fn try_acquire(core: &Core, key: &str, token: &str) -> Result<bool> {
    let mut conn = core.conn();
    let ms = core.config.lease.as_millis() as u64;
    let res = core
        .bounded(
            redis::cmd("SET")
                .arg(key)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(ms)
                .query_async::<Option<String>>(&mut conn),
        )
        .await?
        .map_err(|e| core.err(e, "taking the subscription lease failed"))?;
    Ok(res.is_some())
}

/// Releases the lease if this consumer still holds it (bounded by the connect timeout: a close
/// must not hang while Redis is away; the lease then expires).
pub(crate) async fn release(core: &Core, key: &str, token: &str) {
    let mut conn = core.conn();
    let mut release = LEASE_RELEASE.prepare_invoke();
    release.key(key).arg(token);
    let fut = release.invoke_async::<i64>(&mut conn);
    let _ = tokio::time::timeout(core.config.connect_timeout, fut).await;
}

/// Keeps the lease of an exclusive/failover consumer, or waits to take it over (standby), until
/// `stop`.
pub(crate) async fn run_lease(
    core: Arc<Core>,
    key: String,
    token: String,
    active: Arc<watch::Sender<bool>>,
    stop: CancellationToken,
) {
    let lease = core.config.lease;
    let ms = lease.as_millis() as u64;
    let renew_every = lease / 3;
    let poll = (lease / 5).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut last_ok = Instant::now();
    loop {
        let is_active = *active.borrow();
        tokio::select! {
            _ = tokio::time::sleep(if is_active { renew_every } else { poll }) => {},
            () = stop.cancelled() => return,
        }
        if stop.is_cancelled() {
            return;
        }
        let mut conn = core.conn();
        if is_active {
            let mut renew = LEASE_RENEW.prepare_invoke();
            renew.key(&key).arg(&token).arg(ms);
            match tokio::time::timeout(renew_every, renew.invoke_async::<i64>(&mut conn)).await {
                Ok(Ok(1)) => last_ok = Instant::now(),
                Ok(Ok(_)) => {
                    // expired (or lost with the server's data): take it again if nobody else did
                    if try_acquire(&core, &key, &token).await.unwrap_or(false) {
                        last_ok = Instant::now();
                    } else {
                        tracing::warn!(lease = %key, "lost the subscription lease to another consumer; standing by");
                        active.send_replace(false);
                    }
                }
                _ => {
                    if last_ok.elapsed() > lease {
                        tracing::warn!(lease = %key, "cannot renew the subscription lease; standing by");
                        active.send_replace(false);
                    }
                }
            }
        } else if try_acquire(&core, &key, &token).await.unwrap_or(false) {
            tracing::debug!(lease = %key, "took over the subscription lease");
            last_ok = Instant::now();
            active.send_replace(true);
        }
    }
}
