//! The Redis sink's side of a copy that starts again from scratch ([`crate::sink::Sink::begin_copy`]):
//! deleting the keys an interrupted copy wrote, with the new copy's position, or holding the
//! pipeline where the key template cannot tell them from other data.
//!
//! Owns: which keys an earlier copy left, and when to hold. Must never: delete a
//! `tideline:position:*` key other than its own pipeline's.

use super::{POSITION_PREFIX, RedisSink, WATCH_TRIES, classify, scan};
use crate::sink::{EarlierCopy, SinkError};

impl RedisSink {
    /// [`crate::sink::Sink::begin_copy`]: the keys of the trees an earlier copy wrote (found with `SCAN
    /// MATCH` on the template, as for a dropped tree; with the pipeline's key prefix, only the
    /// keys it could have written) are deleted in one transaction with storing the new copy's
    /// checkpoint, checked as a batch's. A template without `{tree}` gives every tree one
    /// pattern: the earlier copy wrote everything of this pipeline under it, so it all goes (the
    /// template's keys are the pipeline's, as a drop already assumes). A template that begins
    /// with `{key}` anchors its pattern nowhere (`*...`: `{key}` alone matches every key of the
    /// database), so nothing tells the pipeline's keys from other data: the pipeline is held
    /// for an operator instead.
    pub(super) async fn begin_copy_inner(
        &mut self,
        checkpoint: &[u8],
        earlier: &EarlierCopy,
    ) -> Result<(), SinkError> {
        let (trees, prefix) = match earlier {
            EarlierCopy::None => return Ok(()),
            EarlierCopy::Trees { trees, prefix } => (trees, prefix.as_deref().unwrap_or_default()),
            EarlierCopy::Unrecorded => {
                let why = format!(
                    "{}, and Redis holds keys of the interrupted copy, whose stored position \
                     (written by an earlier version) does not name its trees: delete the keys \
                     this pipeline wrote (its key template is `{}`) and its position `{}`; the \
                     copy then starts again by itself",
                    self.must_copy_again(),
                    self.cfg.key,
                    self.position_key
                );
                return self.hold_unless_started_over(why).await;
            }
        };
        if self.template.begins_with_key() {
            let why = format!(
                "{}, and Redis holds keys of the interrupted copy of trees {}; the key \
                 template `{}` begins with `{{key}}`, so its pattern `{}` cannot tell this \
                 pipeline's keys from other data: delete the keys this pipeline wrote and its \
                 position `{}`; the copy then starts again by itself",
                self.must_copy_again(),
                trees.join(", "),
                self.cfg.key,
                String::from_utf8_lossy(
                    &self
                        .template
                        .pattern_with(trees.first().map_or("", String::as_str), prefix)
                ),
                self.position_key
            );
            return self.hold_unless_started_over(why).await;
        }
        let mut patterns: Vec<Vec<u8>> = trees
            .iter()
            .map(|t| self.template.pattern_with(t, prefix))
            .collect();
        patterns.sort();
        patterns.dedup();
        let mut con = self.connect().await?;
        let mut keys = Vec::new();
        for pattern in &patterns {
            keys.extend(scan(&mut con, pattern).await?);
        }
        keys.sort();
        keys.dedup();
        // Never a pipeline's position (a tree named `tideline` under the default template
        // would match them all): this one's is replaced below, the others are not ours.
        keys.retain(|k| !k.starts_with(POSITION_PREFIX));
        for _ in 0..WATCH_TRIES {
            let (position,): (Option<Vec<u8>>,) = redis::pipe()
                .cmd("WATCH")
                .arg(&self.position_key)
                .ignore()
                .cmd("GET")
                .arg(&self.position_key)
                .query_async(&mut con)
                .await
                .map_err(|e| classify(&e, "watch and read the position"))?;
            if position != self.expected {
                let _ = redis::cmd("UNWATCH").query_async::<()>(&mut con).await;
                if position.as_deref() == Some(checkpoint) {
                    // Cleared and stored before; only the answer was lost.
                    self.expected = position;
                    return Ok(());
                }
                return Err(self.moved());
            }
            let mut pipe = redis::pipe();
            pipe.atomic();
            for chunk in keys.chunks(1000) {
                pipe.cmd("DEL").arg(chunk).ignore();
            }
            pipe.cmd("SET").arg(&self.position_key).arg(checkpoint);
            let r: Option<(redis::Value,)> = pipe
                .query_async(&mut con)
                .await
                .map_err(|e| classify(&e, "delete the keys of the interrupted copy"))?;
            if r.is_some() {
                tracing::warn!(sink = %self.describe, keys = keys.len(), trees = %trees.join(", "), "deleted the keys of the interrupted copy; copying again from scratch");
                self.expected = Some(checkpoint.to_vec());
                return Ok(());
            }
            // EXEC answered nil: the position changed between the read and EXEC.
        }
        Err(SinkError::Retry(format!(
            "redis: the position `{}` kept changing while the keys of the interrupted copy were \
             deleted ({WATCH_TRIES} tries); is another connector running this pipeline?",
            self.position_key
        )))
    }

    fn must_copy_again(&self) -> String {
        format!(
            "the bootstrap of this pipeline (position `{}`) cannot resume and must copy again \
             from scratch",
            self.position_key
        )
    }

    /// Holds the pipeline with `why`, unless its position is gone: an operator who deleted
    /// its keys and its position started it over, and the copy may begin.
    async fn hold_unless_started_over(&mut self, why: String) -> Result<(), SinkError> {
        let mut con = self.connect().await?;
        let position: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&self.position_key)
            .query_async(&mut con)
            .await
            .map_err(|e| classify(&e, "read the position"))?;
        if position.is_none() {
            self.expected = None;
            return Ok(());
        }
        Err(SinkError::Hold(why))
    }
}
