//! The embedded store: one redb file on the node (`<state-dir>/approvals.redb`).
//!
//! One table maps an approval id to its JSON record (the same shape as the REST API's
//! answer). At the scale of a node's pending approvals a scan is cheap, so listing and
//! the fingerprint lookup read the whole table instead of keeping secondary indexes in
//! step.
//!
//! Every redb call runs on tokio's blocking pool: a commit waits for an fsync, which
//! must not stall the proxy's threads. `update` is optimistic like the Kubernetes
//! store: the caller's closure runs on a snapshot outside any transaction (it is not
//! `'static`, so it cannot go to the blocking pool), and the write transaction only
//! commits when the record is still byte-for-byte what the closure saw; otherwise the
//! closure runs again on the newer version.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use super::{newest_first, StoreError, CHANGES_CAPACITY};
use crate::approvals::model::{ApprovalRequest, DecisionError, State};

/// Approval id → JSON of the whole `ApprovalRequest`.
const APPROVALS: TableDefinition<&str, &[u8]> = TableDefinition::new("approvals");

/// How often `update` re-reads after losing a race to another writer in this process
/// before it gives up with [`StoreError::Conflict`]. Each lost race means someone else
/// committed, so this is only reached under a storm of writes to one approval.
const MAX_ATTEMPTS: usize = 32;

/// redb's page cache. The file holds a few thousand small records at most; redb's
/// default (1 GiB) is sized for databases, not for this.
const CACHE_BYTES: usize = 16 << 20;

/// The embedded store; cheap to clone (all clones share the open file).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Held across commit and broadcast, so subscribers see changes in commit order.
    write: Mutex<()>,
    changes: broadcast::Sender<ApprovalRequest>,
}

impl EmbeddedStore {
    /// Opens the store at `path`, creating the file when it does not exist. The parent
    /// directory must exist. A file that is not a redb database, or is damaged, is
    /// refused with [`StoreError::Embedded`] (its integrity is checked on every open,
    /// so a damaged file is reported instead of trusted). Blocks: call it from
    /// `spawn_blocking` in async code.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        let fail = |what: &str, err: &dyn std::fmt::Display| {
            StoreError::Embedded(format!("{}: {what}: {err}", path.display()))
        };
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(path)
            .map_err(|e| fail("cannot open the approvals database", &e))?;
        // Create the table now, so readers never meet a missing table.
        let txn = db
            .begin_write()
            .map_err(|e| fail("cannot write the approvals database", &e))?;
        txn.open_table(APPROVALS)
            .map_err(|e| fail("cannot open the approvals table", &e))?;
        txn.commit()
            .map_err(|e| fail("cannot write the approvals database", &e))?;
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        let store = EmbeddedStore {
            inner: Arc::new(Inner {
                db,
                path: path.to_owned(),
                write: Mutex::new(()),
                changes,
            }),
        };
        info!(path = %path.display(), "embedded approval store open");
        Ok(store)
    }

    /// Stores a new approval; [`StoreError::Exists`] when its id is taken.
    pub async fn create(&self, approval: ApprovalRequest) -> Result<ApprovalRequest, StoreError> {
        let bytes = encode(&approval)?;
        self.blocking(move |inner| {
            let _order = inner.write.lock().unwrap_or_else(|e| e.into_inner());
            let txn = inner.db.begin_write().map_err(|e| inner.err("write", e))?;
            {
                let mut table = txn
                    .open_table(APPROVALS)
                    .map_err(|e| inner.err("open table", e))?;
                let exists = table
                    .get(approval.id.as_str())
                    .map_err(|e| inner.err("read", e))?
                    .is_some();
                if exists {
                    return Err(StoreError::Exists(approval.id));
                }
                table
                    .insert(approval.id.as_str(), bytes.as_slice())
                    .map_err(|e| inner.err("insert", e))?;
            }
            txn.commit().map_err(|e| inner.err("commit", e))?;
            debug!(id = %approval.id, "approval stored");
            // No receivers is not an error: nobody is waiting right now.
            let _ = inner.changes.send(approval.clone());
            Ok(approval)
        })
        .await
    }

    /// Removes an approval (a decided one past retention). Gone already is fine.
    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.blocking(move |inner| {
            let _order = inner.write.lock().unwrap_or_else(|e| e.into_inner());
            let txn = inner.db.begin_write().map_err(|e| inner.err("write", e))?;
            {
                let mut table = txn
                    .open_table(APPROVALS)
                    .map_err(|e| inner.err("open table", e))?;
                table
                    .remove(id.as_str())
                    .map_err(|e| inner.err("remove", e))?;
            }
            txn.commit().map_err(|e| inner.err("commit", e))?;
            debug!(%id, "approval removed");
            Ok(())
        })
        .await
    }

    pub async fn get(&self, id: &str) -> Result<Option<ApprovalRequest>, StoreError> {
        let id = id.to_owned();
        self.blocking(move |inner| {
            inner
                .read_raw(&id)?
                .map(|bytes| inner.decode(&id, &bytes))
                .transpose()
        })
        .await
    }

    /// Every approval, or those in `state`; newest first.
    pub async fn list(&self, state: Option<State>) -> Result<Vec<ApprovalRequest>, StoreError> {
        self.scan(move |a| state.is_none_or(|s| a.status.state == s))
            .await
    }

    /// Approvals whose `spec.request.fingerprint` is `fingerprint`; newest first.
    pub async fn find_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Vec<ApprovalRequest>, StoreError> {
        let fingerprint = fingerprint.to_owned();
        self.scan(move |a| a.spec.request.fingerprint == fingerprint)
            .await
    }

    /// See [`super::Store::update`]. Only `status` is kept from the closure's result.
    pub async fn update<F>(&self, id: &str, mut change: F) -> Result<ApprovalRequest, StoreError>
    where
        F: FnMut(&mut ApprovalRequest) -> Result<(), DecisionError> + Send,
    {
        for attempt in 1..=MAX_ATTEMPTS {
            let key = id.to_owned();
            let seen = self
                .blocking(move |inner| inner.read_raw(&key))
                .await?
                .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
            let current = self.inner.decode(id, &seen)?;
            let mut next = current.clone();
            change(&mut next)?;
            if next.status == current.status {
                // Nothing to write (e.g. an expiry that found it already decided).
                return Ok(current);
            }
            let updated = ApprovalRequest {
                status: next.status,
                ..current
            };
            let bytes = encode(&updated)?;
            let key = id.to_owned();
            let swapped = self
                .blocking(move |inner| {
                    let _order = inner.write.lock().unwrap_or_else(|e| e.into_inner());
                    let txn = inner.db.begin_write().map_err(|e| inner.err("write", e))?;
                    {
                        let mut table = txn
                            .open_table(APPROVALS)
                            .map_err(|e| inner.err("open table", e))?;
                        let now = table
                            .get(key.as_str())
                            .map_err(|e| inner.err("read", e))?
                            .map(|v| v.value().to_vec());
                        if now.as_deref() != Some(seen.as_slice()) {
                            // Someone committed since we read: nothing written; the
                            // transaction aborts when dropped.
                            return Ok(None);
                        }
                        table
                            .insert(key.as_str(), bytes.as_slice())
                            .map_err(|e| inner.err("insert", e))?;
                    }
                    txn.commit().map_err(|e| inner.err("commit", e))?;
                    let _ = inner.changes.send(updated.clone());
                    Ok(Some(updated))
                })
                .await?;
            match swapped {
                Some(updated) => return Ok(updated),
                None => debug!(%id, attempt, "approval changed while deciding; re-reading"),
            }
        }
        Err(StoreError::Conflict(id.to_owned()))
    }

    /// Every approval as it is created or changed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ApprovalRequest> {
        self.inner.changes.subscribe()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn scan(
        &self,
        keep: impl Fn(&ApprovalRequest) -> bool + Send + 'static,
    ) -> Result<Vec<ApprovalRequest>, StoreError> {
        let mut found = self
            .blocking(move |inner| {
                let txn = inner.db.begin_read().map_err(|e| inner.err("read", e))?;
                let table = txn
                    .open_table(APPROVALS)
                    .map_err(|e| inner.err("open table", e))?;
                let mut found = Vec::new();
                for entry in table.iter().map_err(|e| inner.err("read", e))? {
                    let (key, value) = entry.map_err(|e| inner.err("read", e))?;
                    match inner.decode(key.value(), value.value()) {
                        Ok(a) if keep(&a) => found.push(a),
                        Ok(_) => {}
                        // One bad record must not hide every other approval.
                        Err(err) => warn!("skipping an unreadable approval: {err}"),
                    }
                }
                Ok(found)
            })
            .await?;
        newest_first(&mut found);
        Ok(found)
    }

    /// Runs `work` on the blocking pool (redb calls block on file I/O and fsync).
    async fn blocking<T, W>(&self, work: W) -> Result<T, StoreError>
    where
        T: Send + 'static,
        W: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| StoreError::Embedded(format!("store task failed: {e}")))?
    }
}

impl Inner {
    fn err(&self, what: &str, err: impl std::fmt::Display) -> StoreError {
        StoreError::Embedded(format!("{}: {what}: {err}", self.path.display()))
    }

    fn read_raw(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err("read", e))?;
        let table = txn
            .open_table(APPROVALS)
            .map_err(|e| self.err("open table", e))?;
        let value = table.get(id).map_err(|e| self.err("read", e))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn decode(&self, id: &str, bytes: &[u8]) -> Result<ApprovalRequest, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| self.err(&format!("record {id}"), e))
    }
}

fn encode(approval: &ApprovalRequest) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(approval)
        .map_err(|e| StoreError::Embedded(format!("encoding approval {}: {e}", approval.id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approvals::model::{Reviewer, Verdict};
    use crate::approvals::store::testing::{approval, temp_dir};

    fn open(dir: &Path) -> EmbeddedStore {
        EmbeddedStore::open(&dir.join("approvals.redb")).expect("open")
    }

    fn reviewer(user: &str) -> Reviewer {
        Reviewer {
            user: user.into(),
            groups: vec!["ops".into()],
        }
    }

    #[tokio::test]
    async fn create_get_list_find() {
        let dir = temp_dir("crud");
        let store = open(dir.path());
        let older = approval("ar-0000000000000001", "fp-a", "2026-01-01T10:00:00Z");
        let newer = approval("ar-0000000000000002", "fp-b", "2026-01-01T11:00:00Z");
        let same_call = approval("ar-0000000000000003", "fp-a", "2026-01-01T12:00:00Z");
        for a in [&older, &newer, &same_call] {
            store.create(a.clone()).await.expect("create");
        }
        assert!(matches!(
            store.create(older.clone()).await,
            Err(StoreError::Exists(id)) if id == older.id
        ));
        assert_eq!(store.get(&newer.id).await.unwrap(), Some(newer.clone()));
        assert_eq!(store.get("ar-ffffffffffffffff").await.unwrap(), None);

        let ids = |v: Vec<ApprovalRequest>| v.into_iter().map(|a| a.id).collect::<Vec<String>>();
        assert_eq!(
            ids(store.list(None).await.unwrap()),
            [same_call.id.clone(), newer.id.clone(), older.id.clone()]
        );
        assert_eq!(
            ids(store.find_by_fingerprint("fp-a").await.unwrap()),
            [same_call.id.clone(), older.id.clone()]
        );
        assert!(store.find_by_fingerprint("fp-z").await.unwrap().is_empty());

        store
            .update(&newer.id, |a| {
                a.decide(
                    &reviewer("bob"),
                    Verdict::Deny,
                    "no",
                    "2026-01-01T11:05:00Z",
                )
                .map(drop)
            })
            .await
            .expect("deny");
        assert_eq!(
            ids(store.list(Some(State::Pending)).await.unwrap()),
            [same_call.id.clone(), older.id.clone()]
        );
        assert_eq!(
            ids(store.list(Some(State::Denied)).await.unwrap()),
            std::slice::from_ref(&newer.id)
        );
    }

    #[tokio::test]
    async fn update_applies_decisions_and_rejections_leave_it_unchanged() {
        let dir = temp_dir("update");
        let store = open(dir.path());
        let a = approval("ar-00000000000000a1", "fp", "2026-01-01T10:00:00Z");
        store.create(a.clone()).await.unwrap();

        // The requester may not approve their own call: nothing is written.
        let err = store
            .update(&a.id, |a| {
                a.decide(&reviewer("alice"), Verdict::Approve, "", "now")
                    .map(drop)
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Rejected(DecisionError::SelfReview { .. })),
            "{err}"
        );
        assert_eq!(store.get(&a.id).await.unwrap(), Some(a.clone()));

        let approved = store
            .update(&a.id, |a| {
                a.decide(
                    &reviewer("bob"),
                    Verdict::Approve,
                    "ok",
                    "2026-01-01T10:01:00Z",
                )
                .map(drop)
            })
            .await
            .unwrap();
        assert_eq!(approved.status.state, State::Approved);
        assert_eq!(approved.status.decisions.len(), 1);
        assert_eq!(store.get(&a.id).await.unwrap(), Some(approved.clone()));

        // A second decision on a final approval is refused.
        let err = store
            .update(&a.id, |a| {
                a.decide(&reviewer("carol"), Verdict::Deny, "late", "now")
                    .map(drop)
            })
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            StoreError::Rejected(DecisionError::AlreadyFinal { .. })
        ));
        assert!(matches!(
            store.update("ar-nope", |_| Ok(())).await,
            Err(StoreError::NotFound(_))
        ));

        // Only status is kept: the spec is fixed at creation.
        let after = store
            .update(&a.id, |a| {
                a.spec.rule = "changed".into();
                a.status.message.push_str(" (noted)");
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(after.spec.rule, a.spec.rule);
        assert!(after.status.message.ends_with("(noted)"));
    }

    /// Many concurrent claims of one approved call: exactly one wins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_have_one_winner() {
        let dir = temp_dir("claims");
        let store = open(dir.path());
        let mut a = approval("ar-00000000000000c1", "fp", "2026-01-01T10:00:00Z");
        a.decide(&reviewer("bob"), Verdict::Approve, "ok", "now")
            .unwrap();
        store.create(a.clone()).await.unwrap();
        let mut tasks = Vec::new();
        for n in 0..8 {
            let store = store.clone();
            let id = a.id.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .update(&id, |a| claim(a, &format!("node-{n}")))
                    .await
                    .is_ok()
            }));
        }
        let mut winners = 0;
        for t in tasks {
            winners += usize::from(t.await.unwrap());
        }
        assert_eq!(winners, 1);
        assert!(store
            .get(&a.id)
            .await
            .unwrap()
            .unwrap()
            .status
            .execution
            .is_some());
    }

    fn claim(a: &mut ApprovalRequest, node: &str) -> Result<(), DecisionError> {
        if let Some(done) = &a.status.execution {
            return Err(DecisionError::AlreadyExecuted {
                id: a.id.clone(),
                at: done.at.clone(),
            });
        }
        a.status.execution = Some(crate::approvals::model::Execution {
            at: "now".into(),
            node: node.into(),
            code: 0,
        });
        Ok(())
    }

    #[tokio::test]
    async fn reopen_keeps_everything() {
        let dir = temp_dir("reopen");
        let a = approval("ar-00000000000000d1", "fp", "2026-01-01T10:00:00Z");
        let decided = {
            let store = open(dir.path());
            store.create(a.clone()).await.unwrap();
            store
                .update(&a.id, |a| {
                    a.decide(&reviewer("bob"), Verdict::Approve, "ok", "now")
                        .map(drop)
                })
                .await
                .unwrap()
        };
        let store = open(dir.path());
        assert_eq!(store.get(&a.id).await.unwrap(), Some(decided.clone()));
        assert_eq!(store.list(None).await.unwrap(), vec![decided]);
    }

    #[tokio::test]
    async fn subscribe_sees_creates_and_updates() {
        let dir = temp_dir("subscribe");
        let store = open(dir.path());
        let mut changes = store.subscribe();
        let a = approval("ar-00000000000000e1", "fp", "2026-01-01T10:00:00Z");
        store.create(a.clone()).await.unwrap();
        assert_eq!(changes.recv().await.unwrap(), a);
        store
            .update(&a.id, |a| {
                a.decide(&reviewer("bob"), Verdict::Deny, "no", "now")
                    .map(drop)
            })
            .await
            .unwrap();
        let seen = changes.recv().await.unwrap();
        assert_eq!(seen.status.state, State::Denied);
        // A refused change and a no-op change send nothing.
        let _ = store
            .update(&a.id, |_| Err(DecisionError::MissingReason))
            .await;
        store.update(&a.id, |_| Ok(())).await.unwrap();
        assert!(changes.try_recv().is_err());
    }

    #[test]
    fn bad_paths_are_clear_errors() {
        let dir = temp_dir("bad");
        let junk = dir.path().join("junk.redb");
        std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
        let err = EmbeddedStore::open(&junk).err().expect("junk refused");
        assert!(
            matches!(&err, StoreError::Embedded(m) if m.contains("junk.redb")),
            "{err}"
        );

        let missing = dir.path().join("no/such/dir/approvals.redb");
        let err = EmbeddedStore::open(&missing).err().expect("missing dir");
        assert!(
            matches!(&err, StoreError::Embedded(m) if m.contains("no/such/dir")),
            "{err}"
        );

        // A real store cut short (a disk that filled up, a bad copy).
        let cut = dir.path().join("cut.redb");
        {
            let store = EmbeddedStore::open(&cut).expect("open");
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            for n in 0..50 {
                let id = format!("ar-{n:016x}");
                rt.block_on(store.create(approval(&id, "fp", "2026-01-01T10:00:00Z")))
                    .unwrap();
            }
        }
        let len = std::fs::metadata(&cut).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
        file.set_len(len / 2).unwrap();
        drop(file);
        match EmbeddedStore::open(&cut) {
            Err(StoreError::Embedded(m)) => assert!(m.contains("cut.redb"), "{m}"),
            Err(other) => panic!("unexpected error {other}"),
            // redb may recover an older committed state; what it keeps must read.
            Ok(store) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(store.list(None)).expect("list after recovery");
            }
        }

        // A directory where the file should be.
        let err = EmbeddedStore::open(dir.path()).err().expect("directory");
        assert!(matches!(err, StoreError::Embedded(_)), "{err}");
    }
}
