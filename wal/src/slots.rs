//! Named consumer slots: each holds the log from its restart offset on.
//!
//! Slots are kept in `slots.json` beside the segments, replaced atomically (write a temporary
//! file, sync it, rename, sync the directory). A slot's position may go backwards after a crash
//! if the newest advance was not yet saved; that only holds more log, never less.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::storage::Storage;
use crate::{Error, Offset};

pub(crate) const FILE: &str = "slots.json";
const TMP: &str = "slots.json.tmp";

/// Whether a slot still holds the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SlotState {
    /// Holding segments from its restart offset on.
    Active,
    /// The retention cap removed log this slot needed, and it holds none any more: drop and
    /// re-create it. Its consumer re-bootstraps only if the log no longer holds its position.
    Invalidated {
        /// Why, naming the cap and the first offset still available.
        reason: String,
    },
}

/// A slot as reported by [`crate::Wal::slots`].
///
/// persisted: changes must stay backward compatible (stored in `slots.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// The slot's name.
    pub name: String,
    /// The first offset the consumer still needs (everything before it is confirmed).
    pub restart_offset: u64,
    /// Active or invalidated.
    #[serde(flatten)]
    pub state: SlotState,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SlotsFile {
    slots: BTreeMap<String, SlotInfo>,
}

#[derive(Debug, Default)]
pub(crate) struct Slots {
    map: BTreeMap<String, SlotInfo>,
    dirty: bool,
}

pub(crate) fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::BadSlotName(name.chars().take(80).collect()))
    }
}

impl Slots {
    pub(crate) fn load(storage: &dyn Storage) -> Result<Slots, Error> {
        let names = storage
            .list()
            .map_err(|e| Error::io("list log directory", e))?;
        if !names.iter().any(|n| n == FILE) {
            return Ok(Slots::default());
        }
        let file = storage
            .open_read(FILE)
            .map_err(|e| Error::io(format!("open {}", storage.describe(FILE)), e))?;
        let len = file
            .len()
            .map_err(|e| Error::io(format!("stat {}", storage.describe(FILE)), e))?;
        if len > 64 << 20 {
            return Err(Error::Corrupt {
                file: storage.describe(FILE),
                byte: 0,
                reason: format!("slots file is {len} bytes, more than 64 MiB"),
            });
        }
        let mut buf = vec![0; len as usize];
        file.read_full_at(&mut buf, 0)
            .map_err(|e| Error::io(format!("read {}", storage.describe(FILE)), e))?;
        let parsed: SlotsFile = serde_json::from_slice(&buf).map_err(|e| Error::Corrupt {
            file: storage.describe(FILE),
            byte: 0,
            reason: format!("slots file does not parse ({e}); fix or remove it"),
        })?;
        Ok(Slots {
            map: parsed.slots,
            dirty: false,
        })
    }

    pub(crate) fn save(&mut self, storage: &dyn Storage) -> Result<(), Error> {
        if !self.dirty {
            return Ok(());
        }
        let body = serde_json::to_vec_pretty(&SlotsFile {
            slots: self.map.clone(),
        })
        .map_err(|e| Error::Encode {
            reason: e.to_string(),
        })?;
        let ctx = |what: &str| format!("{what} {}", storage.describe(TMP));
        if storage
            .list()
            .map_err(|e| Error::io(ctx("list"), e))?
            .iter()
            .any(|n| n == TMP)
        {
            storage
                .remove(TMP)
                .map_err(|e| Error::io(ctx("remove"), e))?;
        }
        let f = storage
            .create(TMP)
            .map_err(|e| Error::io(ctx("create"), e))?;
        f.write_all_at(&body, 0)
            .map_err(|e| Error::io(ctx("write"), e))?;
        f.sync_data().map_err(|e| Error::io(ctx("sync"), e))?;
        storage
            .rename(TMP, FILE)
            .map_err(|e| Error::io(ctx("rename"), e))?;
        storage
            .sync_dir()
            .map_err(|e| Error::io("sync log directory", e))?;
        self.dirty = false;
        Ok(())
    }

    /// Creates slot `name` at `restart`; `first_available` is the log's first offset, for the
    /// advice when the slot was invalidated.
    pub(crate) fn create(
        &mut self,
        name: &str,
        restart: Offset,
        first_available: Offset,
    ) -> Result<SlotInfo, Error> {
        check_name(name)?;
        if let Some(SlotInfo {
            state: SlotState::Invalidated { reason },
            ..
        }) = self.map.get(name)
        {
            return Err(refusal(name, reason, restart, first_available));
        }
        let info = self
            .map
            .entry(name.to_owned())
            .or_insert_with(|| SlotInfo {
                name: name.to_owned(),
                restart_offset: restart.get(),
                state: SlotState::Active,
            })
            .clone();
        self.dirty = true;
        Ok(info)
    }

    /// Moves slot `name` on to `restart`. Fails for an invalidated slot: it holds no log, and
    /// a consumer whose acks it took would believe its position is kept. `first_available`
    /// gives the log's first offset, for the advice then.
    pub(crate) fn advance(
        &mut self,
        name: &str,
        restart: Offset,
        first_available: impl FnOnce() -> Offset,
    ) -> Result<(), Error> {
        let slot = self
            .map
            .get_mut(name)
            .ok_or_else(|| Error::NoSuchSlot(name.to_owned()))?;
        if let SlotState::Invalidated { reason } = &slot.state {
            return Err(refusal(name, reason, restart, first_available()));
        }
        if restart.get() > slot.restart_offset {
            slot.restart_offset = restart.get();
            self.dirty = true;
        }
        Ok(())
    }

    pub(crate) fn drop_slot(&mut self, name: &str) -> Result<(), Error> {
        self.map
            .remove(name)
            .ok_or_else(|| Error::NoSuchSlot(name.to_owned()))?;
        self.dirty = true;
        Ok(())
    }

    pub(crate) fn get(&self, name: &str) -> Option<&SlotInfo> {
        self.map.get(name)
    }

    pub(crate) fn list(&self) -> Vec<SlotInfo> {
        self.map.values().cloned().collect()
    }

    /// Lowest restart offset among active slots.
    pub(crate) fn min_active_restart(&self) -> Option<u64> {
        self.map
            .values()
            .filter(|s| s.state == SlotState::Active)
            .map(|s| s.restart_offset)
            .min()
    }

    /// Invalidates every active slot that needs an offset below `first_kept`.
    pub(crate) fn invalidate_below(&mut self, first_kept: u64, cap: &str) -> Vec<String> {
        let mut out = Vec::new();
        for slot in self.map.values_mut() {
            if slot.state == SlotState::Active && slot.restart_offset < first_kept {
                slot.state = SlotState::Invalidated {
                    reason: format!(
                        "needed offset {} but the {cap} cap removed the log before offset \
                         {first_kept}",
                        slot.restart_offset
                    ),
                };
                out.push(slot.name.clone());
                self.dirty = true;
            }
        }
        out
    }
}

/// The error for using invalidated slot `name` (stored `reason`) for a consumer whose first
/// needed offset is `position`, with the advice for where that is: a position the log still
/// holds needs only a new slot, one it no longer holds a re-bootstrap.
fn refusal(name: &str, reason: &str, position: Offset, first_available: Offset) -> Error {
    let advice = if position >= first_available {
        format!(
            "the log still holds offset {position}, the first this consumer needs, so it need \
             not re-bootstrap: drop and re-create the slot and resume from the consumer's \
             checkpoint"
        )
    } else {
        format!(
            "the log no longer holds offset {position}, the first this consumer needs (it \
             starts at {first_available}): re-bootstrap the consumer, then drop and re-create \
             the slot"
        )
    };
    Error::SlotInvalidated {
        name: name.to_owned(),
        reason: format!("{reason}; {advice}"),
    }
}
