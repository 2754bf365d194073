//! The etcd v3 registry (tested against etcd 3.4). One lease per relay, kept alive every TTL/3;
//! every key the relay writes is attached to it. The lease id is kept through blips: a broken
//! keep-alive stream (reset connection, GOAWAY, member restart) is reopened for the same lease
//! once etcd confirms it still has it. Only a lease etcd says is gone (expired) is replaced; that
//! bumps [`Registry::lease_epoch`] so the relay's publisher re-registers and re-puts every route.
//! The lease is revoked only on a clean shutdown.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::{mpsc, watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::EtcdSecurity;

use super::{Error, Event, Registry, RelayInfo, Route, RouteKey, RouteValue, Snapshot, WatchItem};

mod lease;
use lease::{keep_alive, remaining_ttl, Confirmed};

/// Deadline for one etcd request; an unreachable etcd must not stall the publisher forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a watch asks etcd to confirm its progress: the bound on how late a gateway learns
/// that its view stopped advancing.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Keys per range page when listing, and operations per transaction (etcd's default limit is 128).
const PAGE: i64 = 2_000;
const TXN_OPS: usize = 128;

struct Lease {
    id: i64,
    keeper: tokio::task::JoinHandle<()>,
}

/// A [`Registry`] in etcd.
pub struct EtcdRegistry {
    /// Ends a sign-in still retrying (see `sign_in`) with the registry.
    _signing_in: tokio_util::sync::DropGuard,
    client: Client,
    keys: Keys,
    lease_ttl: Duration,
    lease: Mutex<Option<Lease>>,
    epoch: watch::Sender<u64>,
    /// When etcd last confirmed this process's lease (granted or refreshed it); the connect time
    /// before any lease.
    confirmed: Confirmed,
}

fn unavailable(err: impl std::fmt::Display) -> Error {
    Error::Unavailable(err.to_string())
}

/// An etcd error with its causes: a TLS failure hides under "transport error" otherwise.
fn with_causes(err: &etcd_client::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    // Name the setting behind the TLS failures an operator meets first.
    if text.contains("BadCertificate") || text.contains("CertificateRequired") {
        text.push_str(
            " (etcd refused this client's certificate or its absence: check registry.cert and registry.key)",
        );
    } else if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        text.push_str(
            " (etcd's certificate is not signed by registry.ca, or does not name the endpoint)",
        );
    }
    text
}

/// Keeps etcd's error kind: a lease etcd does not know is gone for good, anything else (a broken
/// connection, a timeout, a leader election) may pass.
fn classify(err: etcd_client::Error, lease: Option<i64>) -> Error {
    match (&err, lease) {
        // etcd answers NotFound only for leases ("etcdserver: requested lease not found"): a key
        // that does not exist is an empty answer, not an error.
        (etcd_client::Error::GRpcStatus(status), Some(lease))
            if status.code() == tonic::Code::NotFound =>
        {
            Error::LeaseNotFound { lease }
        }
        _ => Error::Unavailable(with_causes(&err)),
    }
}

async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Error> {
    timed_for(None, fut).await
}

/// [`timed`] for a request about `lease`, so a lease etcd does not know comes back as
/// [`Error::LeaseNotFound`].
async fn timed_for<T>(
    lease: Option<i64>,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(result) => result.map_err(|e| classify(e, lease)),
        Err(_) => Err(Error::Unavailable(format!(
            "etcd did not answer within {REQUEST_TIMEOUT:?}"
        ))),
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Adds TLS (CA, client certificate) and an etcd user to `options`.
fn secure(mut options: ConnectOptions, security: &EtcdSecurity) -> Result<ConnectOptions, Error> {
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| Error::Unavailable(format!("cannot read {}: {e}", path.display())))
    };
    if let Some(tls) = &security.tls {
        let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
        if let Some((cert, key)) = &tls.client {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(config);
    }
    if security.auth.is_some() {
        // etcd's simple tokens expire (5 min by default): sign in again when one has. The user is
        // not given here, where the client would sign in before it could be built: see `sign_in`.
        options = options.with_auto_token_refresh(true);
    }
    Ok(options)
}

/// Whether a failed call means etcd could not be reached (or answered nothing in time), rather
/// than that it refused.
fn unreachable(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// Signs `client` in as `user`. A refusal (a wrong password, an unknown user) fails start-up at
/// once, as a config error should; an etcd that cannot be reached does not: the process starts
/// (not ready, as with an etcd that is down and no users) and signs in once etcd answers, retrying
/// until then. The token is shared by every clone of the client.
async fn sign_in(
    client: &mut Client,
    user: (String, String),
    stop: &CancellationToken,
) -> Result<(), Error> {
    let refused = |err: &etcd_client::Error| {
        Error::Unavailable(format!(
            "signing in to etcd as {:?}: {}",
            user.0,
            with_causes(err)
        ))
    };
    let attempt = {
        let user = user.clone();
        move |client: &mut Client| {
            let mut client = client.clone();
            let user = user.clone();
            async move {
                match tokio::time::timeout(REQUEST_TIMEOUT, client.update_user(Some(user))).await {
                    Ok(result) => result.map_err(Some),
                    Err(_) => Err(None),
                }
            }
        }
    };
    match attempt(client).await {
        Ok(()) => return Ok(()),
        Err(Some(err)) if !unreachable(&err) => return Err(refused(&err)),
        Err(err) => {
            let why = err.map_or("no answer in time".to_string(), |e| with_causes(&e));
            tracing::warn!(user = %user.0, %why, "etcd unreachable; signing in once it answers");
        }
    }
    let mut client = client.clone();
    let stop = stop.clone();
    let name = user.0.clone();
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
            match attempt(&mut client).await {
                Ok(()) => {
                    tracing::info!(user = %name, "signed in to etcd");
                    return;
                }
                Err(Some(err)) if !unreachable(&err) => {
                    tracing::error!(user = %name, err = %with_causes(&err), "etcd refused the sign-in; retrying");
                }
                Err(_) => {}
            }
        }
    });
    Ok(())
}

/// Key layout and parsing, shared by the registry and its watch tasks.
#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn relay_key(&self, id: &str) -> String {
        format!("{}/relays/{id}", self.prefix)
    }

    fn route_key(&self, key: &RouteKey) -> String {
        format!("{}/routes/{}", self.prefix, key.path())
    }

    fn parse(&self, kv: &KeyValue) -> Result<Event, Error> {
        let key = String::from_utf8_lossy(kv.key());
        let malformed = |m: String| Error::Malformed {
            key: key.to_string(),
            message: m,
        };
        let rest = key
            .strip_prefix(&self.prefix)
            .and_then(|k| k.strip_prefix('/'))
            .ok_or_else(|| malformed("outside the prefix".into()))?;
        if let Some(relay) = rest.strip_prefix("relays/") {
            let info: RelayInfo =
                serde_json::from_slice(kv.value()).map_err(|e| malformed(e.to_string()))?;
            if info.id != relay {
                return Err(malformed("relay id differs from its key".into()));
            }
            Ok(Event::PutRelay(info))
        } else if let Some(route) = rest.strip_prefix("routes/") {
            let key = RouteKey::parse(route)?;
            let value: RouteValue =
                serde_json::from_slice(kv.value()).map_err(|e| malformed(e.to_string()))?;
            Ok(Event::PutRoute(Route { key, value }))
        } else {
            Err(malformed("unknown key kind".into()))
        }
    }

    fn parse_delete(&self, kv: &KeyValue) -> Result<Event, Error> {
        let key = String::from_utf8_lossy(kv.key());
        let malformed = |m: &str| Error::Malformed {
            key: key.to_string(),
            message: m.to_string(),
        };
        let rest = key
            .strip_prefix(&self.prefix)
            .and_then(|k| k.strip_prefix('/'))
            .ok_or_else(|| malformed("outside the prefix"))?;
        if let Some(relay) = rest.strip_prefix("relays/") {
            Ok(Event::DeleteRelay(relay.to_string()))
        } else if let Some(route) = rest.strip_prefix("routes/") {
            Ok(Event::DeleteRoute(RouteKey::parse(route)?))
        } else {
            Err(malformed("unknown key kind"))
        }
    }
}

impl EtcdRegistry {
    /// Connects lazily: an etcd that is down now only delays registration, it does not fail start-up.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        lease_ttl: Duration,
    ) -> Result<Self, Error> {
        Self::connect_with(endpoints, prefix, lease_ttl, &EtcdSecurity::default()).await
    }

    /// [`EtcdRegistry::connect`] with TLS and an etcd user.
    pub async fn connect_with(
        endpoints: &[String],
        prefix: &str,
        lease_ttl: Duration,
        security: &EtcdSecurity,
    ) -> Result<Self, Error> {
        // `require_leader`: a member cut off from the cluster's leader fails requests and
        // streams instead of serving a view that has stopped advancing.
        let options = ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let options = secure(options, security)?;
        let mut client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| Error::Unavailable(with_causes(&e)))?;
        let signing_in = CancellationToken::new();
        if let Some(auth) = &security.auth {
            let user = (auth.username.clone(), auth.password.expose().to_string());
            sign_in(&mut client, user, &signing_in).await?;
        }
        Ok(EtcdRegistry {
            _signing_in: signing_in.drop_guard(),
            client,
            keys: Keys {
                prefix: prefix.trim_end_matches('/').to_string(),
            },
            lease_ttl,
            lease: Mutex::new(None),
            epoch: watch::channel(0).0,
            confirmed: Confirmed::now(),
        })
    }

    /// The current lease id, granting one (and starting its keep-alive) when there is none. A
    /// lease is replaced only once etcd has said it is gone: never revoked here, since one that
    /// only lost its keep-alive stream may still hold every route of this relay.
    async fn lease_id(&self) -> Result<i64, Error> {
        let mut lease = self.lease.lock().await;
        if let Some(l) = lease.as_ref() {
            if !l.keeper.is_finished() {
                return Ok(l.id);
            }
        }
        // The keeper only ends once etcd said the lease is gone: nothing is left to revoke.
        lease.take();
        let ttl = self.lease_ttl.as_secs().max(1) as i64;
        let mut client = self.client.clone();
        let granted = timed(client.lease_grant(ttl, None)).await?;
        let id = granted.id();
        self.confirmed.touch();
        let keeper = tokio::spawn(keep_alive(
            self.client.clone(),
            id,
            self.lease_ttl,
            self.epoch.clone(),
            self.confirmed.clone(),
        ));
        tracing::info!(lease = id, ttl, "etcd lease granted");
        *lease = Some(Lease { id, keeper });
        Ok(id)
    }

    /// Forgets `id` after etcd said it does not know it (a write under it failed), so the next
    /// [`EtcdRegistry::lease_id`] grants a new one and the owner re-puts everything.
    async fn lease_gone(&self, id: i64) {
        let mut lease = self.lease.lock().await;
        if lease.as_ref().is_some_and(|l| l.id == id) {
            if let Some(l) = lease.take() {
                l.keeper.abort();
                tracing::warn!(
                    lease = id,
                    "etcd lease not found; a new one will be granted"
                );
                self.epoch.send_modify(|e| *e += 1);
            }
        }
    }

    async fn put_all(&self, kvs: Vec<(String, Vec<u8>)>, lease: i64) -> Result<(), Error> {
        for chunk in kvs.chunks(TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| {
                    TxnOp::put(
                        k.clone(),
                        v.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                })
                .collect();
            self.txn_under(lease, Txn::new().and_then(ops)).await?;
        }
        Ok(())
    }

    /// Runs a transaction that writes under `lease`; a lease etcd does not know is forgotten so
    /// the next write grants a new one.
    async fn txn_under(&self, lease: i64, txn: Txn) -> Result<etcd_client::TxnResponse, Error> {
        let mut client = self.client.clone();
        match timed_for(Some(lease), client.txn(txn)).await {
            Err(err @ Error::LeaseNotFound { .. }) => {
                self.lease_gone(lease).await;
                Err(err)
            }
            other => other,
        }
    }

    /// Pages through every key from `from` (inclusive) to `end` (exclusive) at one revision,
    /// calling `each` on every key; returns that revision.
    async fn scan(
        &self,
        from: String,
        end: Vec<u8>,
        mut each: impl FnMut(&KeyValue),
    ) -> Result<i64, Error> {
        let mut from: Vec<u8> = from.into_bytes();
        let mut revision = 0;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                // Later pages read the same revision as the first: one consistent list.
                options = options.with_revision(revision);
            }
            let mut client = self.client.clone();
            let resp = timed(client.get(from.clone(), Some(options))).await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            resp.kvs().iter().for_each(&mut each);
            match (resp.more(), resp.kvs().last()) {
                (true, Some(last)) => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(revision),
            }
        }
    }
}

#[async_trait::async_trait]
impl Registry for EtcdRegistry {
    async fn register_relay(&self, relay: &RelayInfo) -> Result<(), Error> {
        let lease = self.lease_id().await?;
        let key = self.keys.relay_key(&relay.id);
        let value = serde_json::to_vec(relay).map_err(unavailable)?;
        let put = || {
            TxnOp::put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        // Bounded: each round either writes, or finds a live holder, or saw the key change hands.
        for _ in 0..4 {
            // Create the record if absent, or overwrite it if it already hangs off our lease.
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([put()])
                .or_else([TxnOp::txn(
                    Txn::new()
                        .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
                        .and_then([put()])
                        .or_else([TxnOp::get(key.clone(), None)]),
                )]);
            let resp = self.txn_under(lease, txn).await?;
            if resp.succeeded() {
                return Ok(());
            }
            let inner = match resp.op_responses().into_iter().next() {
                Some(TxnOpResponse::Txn(inner)) => inner,
                _ => {
                    return Err(Error::Unavailable(
                        "unexpected etcd transaction answer".into(),
                    ))
                }
            };
            if inner.succeeded() {
                return Ok(());
            }
            let holder = inner.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.lease()),
                _ => None,
            });
            let Some(holder) = holder else {
                // Deleted between the two comparisons: try again.
                continue;
            };
            let mut client = self.client.clone();
            match remaining_ttl(&mut client, holder).await? {
                Some(ttl_secs) => {
                    return Err(Error::IdTaken {
                        id: relay.id.clone(),
                        lease: holder,
                        // 0 is a lease in its last second, or one that expired under a second ago
                        // (etcd truncates): give it that second.
                        ttl_secs: ttl_secs.max(1),
                    });
                }
                // Its lease just expired: etcd is deleting the record; try again.
                None if holder != 0 => continue,
                // A record without a lease was written by hand: not ours to overwrite.
                None => {
                    return Err(Error::IdTaken {
                        id: relay.id.clone(),
                        lease: 0,
                        ttl_secs: 0,
                    })
                }
            }
        }
        Err(Error::Unavailable(format!(
            "the record of relay {} kept changing hands",
            relay.id
        )))
    }

    async fn deregister_relay(&self, relay_id: &str) -> Result<(), Error> {
        let lease = self.lease.lock().await.take();
        let mut client = self.client.clone();
        match lease {
            Some(l) => {
                l.keeper.abort();
                timed(client.lease_revoke(l.id)).await.map(|_| ())
            }
            // Without a lease nothing in etcd is ours: the record may be another relay's.
            None => {
                tracing::debug!(relay_id, "no etcd lease held; nothing to deregister");
                Ok(())
            }
        }
    }

    async fn put_routes(&self, relay_id: &str, routes: &[Route]) -> Result<(), Error> {
        let lease = {
            let guard = self.lease.lock().await;
            match guard.as_ref() {
                Some(l) if !l.keeper.is_finished() => l.id,
                _ => return Err(Error::NotRegistered(relay_id.to_string())),
            }
        };
        let kvs = routes
            .iter()
            .map(|r| {
                Ok((
                    self.keys.route_key(&r.key),
                    serde_json::to_vec(&r.value).map_err(unavailable)?,
                ))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        self.put_all(kvs, lease).await
    }

    async fn delete_routes(&self, keys: &[RouteKey]) -> Result<(), Error> {
        for chunk in keys.chunks(TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|k| TxnOp::delete(self.keys.route_key(k), None))
                .collect();
            let mut client = self.client.clone();
            timed(client.txn(Txn::new().and_then(ops))).await?;
        }
        Ok(())
    }

    async fn owned_routes(&self, relay_id: &str) -> Result<Vec<RouteKey>, Error> {
        let lease = match self.lease.lock().await.as_ref() {
            Some(l) if !l.keeper.is_finished() => l.id,
            _ => return Ok(Vec::new()),
        };
        let start = format!("{}/routes/", self.keys.prefix);
        let end = prefix_end(&start);
        let mut owned = Vec::new();
        self.scan(start, end, |kv| {
            if kv.lease() != lease {
                return;
            }
            match self.keys.parse(kv) {
                Ok(Event::PutRoute(r)) if r.key.relay_id == relay_id => owned.push(r.key),
                _ => {}
            }
        })
        .await?;
        Ok(owned)
    }

    async fn snapshot(&self) -> Result<Snapshot, Error> {
        let start = format!("{}/", self.keys.prefix);
        let end = prefix_end(&start);
        let mut snapshot = Snapshot::default();
        snapshot.revision = self
            .scan(start, end, |kv| match self.keys.parse(kv) {
                Ok(Event::PutRoute(r)) => snapshot.routes.push(r),
                Ok(Event::PutRelay(r)) => snapshot.relays.push(r),
                Ok(_) => {}
                Err(err) => tracing::warn!(%err, "ignoring malformed registry entry"),
            })
            .await?;
        Ok(snapshot)
    }

    async fn watch(&self, after_revision: i64) -> Result<mpsc::Receiver<WatchItem>, Error> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_progress_notify()
            .with_start_revision(after_revision + 1);
        let mut client = self.client.clone();
        let mut stream =
            timed(client.watch(format!("{}/", self.keys.prefix), Some(options))).await?;
        let (tx, rx) = mpsc::channel(1024);
        let keys = self.keys.clone();
        tokio::spawn(async move {
            let mut progress = tokio::time::interval(PROGRESS_EVERY);
            progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // `message` only polls the gRPC stream: dropping it for a tick loses nothing.
                let resp = tokio::select! {
                    m = stream.message() => m,
                    _ = progress.tick() => {
                        // etcd answers with an empty response at its current revision. An
                        // unanswered request is what leaves the view's age growing.
                        if let Err(err) = stream.request_progress().await {
                            tracing::warn!(%err, "etcd watch broke");
                            return;
                        }
                        continue;
                    }
                };
                let resp = match resp {
                    Ok(Some(resp)) => resp,
                    Ok(None) => return,
                    Err(err) => {
                        tracing::warn!(%err, "etcd watch broke");
                        return;
                    }
                };
                if resp.canceled() {
                    tracing::info!(
                        compact_revision = resp.compact_revision(),
                        reason = resp.cancel_reason(),
                        "etcd watch canceled"
                    );
                    let _ = tx.send(WatchItem::Reset).await;
                    return;
                }
                let revision = resp.header().map_or(0, |h| h.revision());
                let events: Vec<Event> = resp
                    .events()
                    .iter()
                    .filter_map(|e| {
                        let kv = e.kv()?;
                        let parsed = match e.event_type() {
                            EventType::Put => keys.parse(kv),
                            EventType::Delete => keys.parse_delete(kv),
                        };
                        parsed
                            .map_err(
                                |err| tracing::warn!(%err, "ignoring malformed registry change"),
                            )
                            .ok()
                    })
                    .collect();
                let item = if events.is_empty() {
                    WatchItem::Progress { revision }
                } else {
                    WatchItem::Events { revision, events }
                };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    fn cut_off(&self) -> bool {
        self.confirmed.elapsed() > self.lease_ttl
    }

    fn lease_epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }
}
