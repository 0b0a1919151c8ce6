//! `/v1/snapshot`: save the whole state as an archive with checksums, and restore one into a
//! cluster through Raft (so every server installs the same state at the same index).
//!
//! The archive is a tar file holding `meta.json`, `state.bin` (the tables, postcard-encoded) and
//! `SHA256SUMS`, which restore verifies before anything is applied. The auto-encrypt CA is left
//! out of archives, and a restore keeps the cluster's own: it decides which agents the servers
//! trust, so neither a download nor an upload may move it.

use std::io::Read;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use super::query::{Meta, Params};
use super::{ApiError, Ctx};
use crate::state::{Command, StateData};

const META: &str = "meta.json";
const STATE: &str = "state.bin";
const SUMS: &str = "SHA256SUMS";
/// Bumped when `state.bin`'s encoding changes incompatibly.
const FORMAT_VERSION: u32 = 3;

pub fn routes() -> Router<Ctx> {
    Router::new().route("/v1/snapshot", get(save).put(restore))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SnapshotMeta {
    #[serde(rename = "ID")]
    pub id: String,
    pub index: u64,
    pub datacenter: String,
    pub version: u32,
    pub timestamp: String,
}

fn sha256_hex(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b).as_ref().iter().map(|x| format!("{x:02x}")).collect()
}

pub fn build_archive(meta: &SnapshotMeta, data: &StateData) -> Result<Vec<u8>, ApiError> {
    let state = postcard::to_allocvec(data).map_err(|e| ApiError::Internal(format!("encoding snapshot: {e}")))?;
    let meta_json = serde_json::to_vec_pretty(meta).map_err(|e| ApiError::Internal(e.to_string()))?;
    let sums = format!("{}  {META}\n{}  {STATE}\n", sha256_hex(&meta_json), sha256_hex(&state));
    let mut tar = tar::Builder::new(Vec::new());
    for (name, bytes) in [(META, meta_json.as_slice()), (STATE, state.as_slice()), (SUMS, sums.as_bytes())] {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        tar.append_data(&mut h, name, bytes).map_err(|e| ApiError::Internal(format!("writing snapshot: {e}")))?;
    }
    tar.into_inner().map_err(|e| ApiError::Internal(format!("writing snapshot: {e}")))
}

/// Read and verify an archive; nothing is trusted until every checksum matches.
pub fn read_archive(bytes: &[u8]) -> Result<(SnapshotMeta, StateData), ApiError> {
    let (meta, state) = read_archive_raw(bytes)?;
    let data: StateData = postcard::from_bytes(&state).map_err(|e| ApiError::BadRequest(format!("Invalid snapshot: {STATE}: {e}")))?;
    Ok((meta, data))
}

/// `read_archive`, returning the verified state bytes undecoded.
fn read_archive_raw(bytes: &[u8]) -> Result<(SnapshotMeta, Vec<u8>), ApiError> {
    let bad = |m: String| ApiError::BadRequest(format!("Invalid snapshot: {m}"));
    let mut files: std::collections::BTreeMap<String, Vec<u8>> = std::collections::BTreeMap::new();
    let mut ar = tar::Archive::new(bytes);
    for entry in ar.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let name = entry.path().map_err(|e| bad(e.to_string()))?.to_string_lossy().into_owned();
        let mut buf = Vec::new();
        entry.read_to_end(&mut buf).map_err(|e| bad(e.to_string()))?;
        files.insert(name, buf);
    }
    let get = |n: &str| files.get(n).ok_or_else(|| bad(format!("archive has no {n}")));
    let sums = String::from_utf8_lossy(get(SUMS)?).into_owned();
    for name in [META, STATE] {
        let want = sums.lines().find_map(|l| l.strip_suffix(&format!("  {name}"))).ok_or_else(|| bad(format!("{SUMS} has no entry for {name}")))?;
        if sha256_hex(get(name)?) != want {
            return Err(bad(format!("checksum mismatch for {name}")));
        }
    }
    let meta: SnapshotMeta = serde_json::from_slice(get(META)?).map_err(|e| bad(format!("{META}: {e}")))?;
    if meta.version != FORMAT_VERSION {
        return Err(bad(format!("unsupported snapshot version {}", meta.version)));
    }
    let state = files.remove(STATE).unwrap_or_default();
    Ok((meta, state))
}

async fn save(State(ctx): State<Ctx>, p: Params) -> Result<Response, ApiError> {
    if !p.flag("stale") {
        ctx.raft()?.verify_leader().await?;
    }
    let (mut data, index) = {
        let store = ctx.raft()?.store.read();
        (store.data().clone(), ctx.raft()?.applied_index())
    };
    // The auto-encrypt CA decides which client agents the servers trust: its key never
    // leaves the servers, and a restore keeps the running cluster's own.
    data.agent_ca = None;
    let meta = SnapshotMeta {
        id: format!("{index}-{}", crate::cluster::now_ms()),
        index,
        datacenter: ctx.info.datacenter.clone(),
        version: FORMAT_VERSION,
        timestamp: crate::duration::rfc3339(std::time::SystemTime::now()),
    };
    let archive = build_archive(&meta, &data)?;
    let mut resp = ([("content-type", "application/x-tar")], archive).into_response();
    Meta::of(&ctx, index, &p).apply(&mut resp);
    Ok(resp)
}

/// Restores travel through Raft in chunks of this size, so that no log entry (and no
/// replication message) outgrows an RPC frame.
const RESTORE_CHUNK: usize = 1 << 20;

async fn restore(State(ctx): State<Ctx>, body: Bytes) -> Result<Response, ApiError> {
    let (_, state) = read_archive_raw(&body)?;
    drop(body);
    // Refuse an archive the servers could not decode before staging any of it.
    postcard::from_bytes::<StateData>(&state).map_err(|e| ApiError::BadRequest(format!("Invalid snapshot: {STATE}: {e}")))?;
    let raft = ctx.raft()?;
    let id = uuid::Uuid::new_v4().to_string();
    let sha256 = ring::digest::digest(&ring::digest::SHA256, &state).as_ref().to_vec();
    let chunks: Vec<&[u8]> = if state.is_empty() { vec![&[][..]] } else { state.chunks(RESTORE_CHUNK).collect() };
    for (seq, chunk) in chunks.into_iter().enumerate() {
        let cmd = Command::RestoreChunk { id: id.clone(), seq: seq as u32, bytes: chunk.to_vec() };
        if let (crate::state::Outcome::Rejected(m), _) = raft.write(cmd).await? {
            return Err(ApiError::Conflict(m));
        }
    }
    let (outcome, index) = raft.write(Command::RestoreCommit { id, sha256 }).await?;
    if let crate::state::Outcome::Rejected(m) = outcome {
        return Err(ApiError::Conflict(m));
    }
    let mut resp = ().into_response();
    Meta::of(&ctx, index, &Params::default()).apply(&mut resp);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> SnapshotMeta {
        SnapshotMeta { id: "1".into(), index: 1, datacenter: "dc1".into(), version: FORMAT_VERSION, timestamp: String::new() }
    }

    #[test]
    fn archive_round_trips() {
        let mut d = StateData::default();
        d.kv.insert("a".into(), crate::state::KvEntry { key: "a".into(), value: Some(b"v".to_vec()), ..Default::default() });
        let bytes = build_archive(&meta(), &d).unwrap();
        assert_eq!(read_archive(&bytes).unwrap().1, d);
    }

    #[test]
    fn corrupted_archive_is_rejected_before_use() {
        let mut bytes = build_archive(&meta(), &StateData::default()).unwrap();
        // Flip a byte inside meta.json's contents (after the first 512-byte tar header).
        bytes[520] ^= 0x20;
        assert!(matches!(read_archive(&bytes), Err(ApiError::BadRequest(_))));
        assert!(read_archive(b"not a tar").is_err());
    }
}
