//! `GET /api/v1/approvals?watch=true`: newline-delimited JSON events, in the shape of a
//! Kubernetes watch (`{"type":"ADDED"|"MODIFIED","object":{...}}`), so kube-rs and
//! client-go style readers work unchanged.
//!
//! The stream starts with every matching approval as `ADDED`, then follows the store's
//! change feed. The feed is subscribed to *before* the first list, so nothing that
//! changes in between is lost; what is seen twice is dropped by comparing with what was
//! last sent. A feed that overflowed (a slow client) is not trusted to be complete: the
//! watcher lists again and sends whatever differs. With `?state=`, an approval that
//! leaves that state is sent once more (`MODIFIED`, with its new state) and then no
//! longer followed, so a reviewer waiting on pending approvals sees them decided.
//!
//! Every event is authorized (`watch`, cached), so a grant revoked mid-stream stops
//! the events of that namespace within the cache's lifetime.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, warn, Instrument};

use super::approvals::{namespace_of, ListQuery};
use super::auth::Caller;
use super::authz::{scope, Attributes, APPROVALS};
use super::{ApiError, ApiState, Body, BodyError};
use crate::approvals::model::{ApprovalRequest, State};

/// Events buffered for a client before the watcher waits for it.
const BUFFER: usize = 64;

/// Opens a watch: checks that the caller may watch somewhere (403 otherwise), then
/// streams from a task of its own that ends when the client goes away, the store's
/// feed ends, or the watch's time is up.
pub async fn start(
    state: &Arc<ApiState>,
    caller: &Caller,
    query: ListQuery,
) -> Result<Response<Body>, ApiError> {
    let changes = state.store.subscribe();
    let mut initial = state.store.list(query.state).await?;
    initial.retain(|a| query.in_namespace(a));
    let scope = scope(
        state,
        caller,
        APPROVALS,
        "watch",
        initial
            .iter()
            .map(|a| namespace_of(a).to_owned())
            .chain(query.namespace.clone()),
    )
    .await?;
    initial.retain(|a| scope.includes(namespace_of(a)));
    // The store lists newest first; a watch tells the story in order.
    initial.reverse();
    let lifetime = query
        .timeout
        .map_or(state.limits.max_watch, |t| t.min(state.limits.max_watch));
    let (tx, rx) = mpsc::channel(BUFFER);
    let mut watcher = Watcher::new(state.clone(), caller.clone(), query.state);
    watcher.namespace = query.namespace.clone();
    state.watches.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(
        async move {
            let _count = WatchCount(watcher.state.clone());
            watcher.run(initial, changes, tx, lifetime).await;
        }
        .instrument(tracing::Span::current()),
    );
    let mut response = Response::new(Events(rx).boxed());
    *response.status_mut() = StatusCode::OK;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Decrements the open-watch count however the watch ends.
struct WatchCount(Arc<ApiState>);

impl Drop for WatchCount {
    fn drop(&mut self) {
        self.0.watches.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The response body: the lines the watcher sends. It ends when the watcher drops its
/// sender; hyper drops it when the client goes away, which the watcher notices.
struct Events(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Events {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

/// Why the stream ends early.
enum End {
    ClientGone,
    /// Authorization could not be checked; ending is safer than guessing, and the
    /// client reconnects.
    Unavailable,
}

/// One watch's state: who watches, the filter, and what the client was told.
pub(super) struct Watcher {
    state: Arc<ApiState>,
    caller: Caller,
    filter: Option<State>,
    /// `?namespace=`: approvals of other namespaces are not sent.
    pub(super) namespace: Option<String>,
    /// Approval id → digest of the object last sent for it.
    sent: HashMap<String, [u8; 32]>,
}

impl Watcher {
    pub(super) fn new(state: Arc<ApiState>, caller: Caller, filter: Option<State>) -> Watcher {
        Watcher {
            state,
            caller,
            filter,
            namespace: None,
            sent: HashMap::new(),
        }
    }

    /// Sends `initial` (already authorized), then follows `changes` until the client
    /// goes away, the feed closes or `lifetime` is over.
    pub(super) async fn run(
        &mut self,
        initial: Vec<ApprovalRequest>,
        mut changes: broadcast::Receiver<ApprovalRequest>,
        tx: mpsc::Sender<Bytes>,
        lifetime: std::time::Duration,
    ) {
        for approval in initial {
            // Already authorized by the scope that selected them.
            if self.send(&tx, &approval, true).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + lifetime;
        loop {
            let outcome = tokio::select! {
                _ = tx.closed() => Err(End::ClientGone),
                _ = tokio::time::sleep_until(deadline) => {
                    debug!("watch time is up");
                    return;
                }
                change = changes.recv() => match change {
                    Ok(approval) => self.on_change(&tx, approval).await,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        warn!(missed, "watch fell behind the store's changes; listing again");
                        self.resync(&tx).await
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            match outcome {
                Ok(()) => {}
                Err(End::ClientGone) => {
                    debug!("watch client went away");
                    return;
                }
                Err(End::Unavailable) => return,
            }
        }
    }

    /// Lists everything again and sends what differs from what the client has.
    async fn resync(&mut self, tx: &mpsc::Sender<Bytes>) -> Result<(), End> {
        let mut all = match self.state.store.list(None).await {
            Ok(all) => all,
            Err(err) => {
                warn!(%err, "listing approvals to resync a watch failed; ending it");
                return Err(End::Unavailable);
            }
        };
        all.reverse();
        for approval in all {
            self.on_change(tx, approval).await?;
        }
        Ok(())
    }

    async fn on_change(
        &mut self,
        tx: &mpsc::Sender<Bytes>,
        approval: ApprovalRequest,
    ) -> Result<(), End> {
        if self
            .namespace
            .as_deref()
            .is_some_and(|ns| namespace_of(&approval) != ns)
        {
            return Ok(());
        }
        let digest = digest(&approval);
        let known = self.sent.get(&approval.id).copied();
        if known == Some(digest) {
            return Ok(());
        }
        let matches = self.filter.is_none_or(|s| approval.status.state == s);
        if !matches && known.is_none() {
            return Ok(());
        }
        if !self.may_see(namespace_of(&approval)).await? {
            return Ok(());
        }
        self.send(tx, &approval, matches).await
    }

    /// Sends one event; `follow` keeps the approval in the set the client is told
    /// about (false once it left the `?state=` filter).
    async fn send(
        &mut self,
        tx: &mpsc::Sender<Bytes>,
        approval: &ApprovalRequest,
        follow: bool,
    ) -> Result<(), End> {
        let kind = if self.sent.contains_key(&approval.id) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        if follow {
            self.sent.insert(approval.id.clone(), digest(approval));
        } else {
            self.sent.remove(&approval.id);
        }
        let mut line = serde_json::to_vec(&serde_json::json!({ "type": kind, "object": approval }))
            .unwrap_or_default();
        line.push(b'\n');
        tx.send(Bytes::from(line))
            .await
            .map_err(|_| End::ClientGone)
    }

    /// `watch` cluster-wide, else in the approval's namespace.
    async fn may_see(&self, namespace: &str) -> Result<bool, End> {
        for namespace in ["", namespace] {
            let attributes = Attributes {
                resource: APPROVALS,
                verb: "watch",
                namespace: namespace.to_owned(),
                name: String::new(),
            };
            match self.state.authz.check(&self.caller, &attributes).await {
                Ok(access) if access.allowed => return Ok(true),
                Ok(_) => {}
                Err(err) => {
                    warn!(%err, "authorizing a watch event failed; ending the watch");
                    return Err(End::Unavailable);
                }
            }
        }
        Ok(false)
    }
}

fn digest(approval: &ApprovalRequest) -> [u8; 32] {
    Sha256::digest(serde_json::to_vec(approval).unwrap_or_default()).into()
}
