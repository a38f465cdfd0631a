//! The ActionCache: the synthetic Action that names a derivation, and its signed entry found
//! through it.

use super::*;

/// The output file of an entry's ActionResult.
pub(crate) const ENTRY_FILE: &str = "rbuild-entry.json";

/// Entries larger than this are refused (a tree listing of a whole system is a few MiB).
pub(super) const MAX_ENTRY: u64 = 256 << 20;

/// One entry lookup: its bytes, none, or why this entry cannot be used.
pub(super) type Entry = Result<Option<Vec<u8>>, CacheError>;

impl Ctx {
    /// The Action whose ActionCache entry holds `drv_hash`'s signed entry, and its digest.
    /// The Command is not meant to be run: it names the derivation.
    pub(super) fn action(&self, drv_hash: &str) -> (Vec<(re::Digest, Vec<u8>)>, re::Digest) {
        let command = re::Command {
            arguments: vec!["rbuild-substitute".into(), drv_hash.into()],
            output_paths: vec![ENTRY_FILE.into()],
            ..Default::default()
        }
        .encode_to_vec();
        let command_digest = self.digest_of(&command);
        let action = re::Action {
            command_digest: Some(command_digest.clone()),
            input_root_digest: Some(self.digest_of(&[])),
            ..Default::default()
        }
        .encode_to_vec();
        let action_digest = self.digest_of(&action);
        (
            vec![(command_digest, command), (action_digest.clone(), action)],
            action_digest,
        )
    }

    /// Entries whose blobs are not all in the CAS any more become misses: servers evict CAS
    /// blobs independently of ActionCache results (BuildGrid only checks the blobs a result
    /// names, here the entry itself), and a half-evicted output is a miss, not a failure.
    /// Entries that do not parse are left for the caller to report.
    pub(super) async fn complete_only(
        &mut self,
        mut entries: Vec<Entry>,
    ) -> Result<Vec<Entry>, GrpcError> {
        let mut wanted: Vec<Vec<String>> = vec![Vec::new(); entries.len()];
        let mut digests = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, bytes) in entries.iter().enumerate() {
            let Some(entry) = bytes
                .as_ref()
                .ok()
                .and_then(|b| b.as_deref())
                .and_then(|b| serde_json::from_slice::<crate::cache::CacheEntry>(b).ok())
            else {
                continue;
            };
            for blob in entry.body.blobs() {
                let Ok(d) = self.digest(&blob) else { continue };
                wanted[i].push(d.hash.clone());
                if d.size_bytes > 0 && seen.insert(d.hash.clone()) {
                    digests.push(d);
                }
            }
        }
        if digests.is_empty() {
            return Ok(entries);
        }
        let missing: std::collections::HashSet<String> = self
            .find_missing(digests)
            .await?
            .into_iter()
            .map(|d| d.hash)
            .collect();
        for (entry, hashes) in entries.iter_mut().zip(wanted) {
            if hashes.iter().any(|h| missing.contains(h)) {
                tracing::debug!("an entry's blobs were evicted from the CAS: treated as a miss");
                *entry = Ok(None);
            }
        }
        Ok(entries)
    }

    /// The signed entry of `drv_hash`, if the ActionCache has one. The outer error is the
    /// server's (unreachable, failing); the inner one is about this entry alone.
    pub(super) async fn get_entry(mut self, drv_hash: String) -> Result<Entry, GrpcError> {
        let (_, action_digest) = self.action(&drv_hash);
        let req = re::GetActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(action_digest),
            inline_output_files: vec![ENTRY_FILE.into()],
            digest_function: self.digest_function(),
            ..Default::default()
        };
        let answer = retried("GetActionResult", || {
            let (mut ac, req) = (self.ac.clone(), req.clone());
            async move { ac.get_action_result(req).await }
        })
        .await?;
        let result = match answer {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(Ok(None)),
            Err(s) => return Err(status("GetActionResult", s)),
        };
        let bad = |source: EntryError| {
            Ok(Err(CacheError::BadEntry {
                drv: drv_hash.clone(),
                source: Box::new(source),
            }))
        };
        let Some(file) = result
            .output_files
            .into_iter()
            .find(|f| f.path == ENTRY_FILE)
        else {
            return bad(EntryError::NoEntryFile);
        };
        let d = file.digest.unwrap_or_default();
        if d.size_bytes < 0 || d.size_bytes as u64 > MAX_ENTRY {
            return bad(EntryError::Size(d.size_bytes));
        }
        let bytes = if !file.contents.is_empty() || d.size_bytes == 0 {
            file.contents
        } else {
            // The entry blob itself may have been evicted while the result stayed: a miss.
            if !self.find_missing(vec![d.clone()]).await?.is_empty() {
                return Ok(Ok(None));
            }
            match self.read_whole(d.clone()).await {
                Ok(b) => b,
                Err(e) => return bad(EntryError::Read(e)),
            }
        };
        // Entries are checked against their signature later; this catches transport damage.
        if self.digest_of(&bytes) != d {
            return bad(EntryError::EntryDigest(d.hash));
        }
        Ok(Ok(Some(bytes)))
    }
}
