//! The engine's configuration: durability, recovery of damage, sizes.

use std::time::Duration;

use relq_core::ConfigError;

/// What an acknowledged operation survives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Every publish, acknowledgement, retry and dead letter is fdatasynced before the call
    /// returns (many callers share one sync). Survives a process crash and a power loss, on a
    /// disk that honours flushes. The default.
    #[default]
    Sync,
    /// Writes reach the operating system before the call returns and are synced every
    /// `interval`. A publish survives a process crash (kill -9) once acknowledged; a power loss
    /// or kernel crash loses up to `interval` of publishes. Acknowledgements, retries and dead
    /// letters since the last sync are forgotten by any crash, so those messages are delivered
    /// again (never lost).
    Periodic(Duration),
}

/// What open does with damage in a topic's active (newest) log segment that is not a torn write:
/// a damaged record followed by valid ones. (A torn tail, with nothing valid after it, is always
/// cut and logged; see `docs/design.md`, failure model.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Recovery {
    /// Refuse to open: the error ([`BackendErrorKind::Corrupt`](relq_core::BackendErrorKind::Corrupt)) names the topic, segment,
    /// position and offsets, and nothing on disk changes. The default.
    #[default]
    Refuse,
    /// The operator's decision: cut the damaged record and every record after it in that
    /// segment, logging at error level exactly what was dropped. Offsets of dropped records are
    /// never handed out again. Use it after `relq check` showed the damage and a restore from a
    /// backup is not possible.
    CutDamagedTail,
}

/// Configuration of an [`EmbeddedBackend`](crate::EmbeddedBackend).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EmbeddedConfig {
    /// What an acknowledged operation survives. Default [`Durability::Sync`].
    pub durability: Durability,
    /// Size of a log segment file. Retention frees disk space a segment at a time. Default
    /// 64 MiB.
    pub segment_size: u64,
    /// Bytes of recent messages kept in memory per topic, so consumers that keep up never read
    /// the disk. Default 16 MiB.
    pub tail_cache: usize,
    /// Most messages waiting for a commit cycle; publishers wait beyond it. Default 65,536.
    pub max_queued: usize,
    /// Scheduled messages (retries, delayed messages a group has read past) due within this
    /// window are held in memory; later ones wait in the state database only, and reads take
    /// them back in due order when their time comes. So millions of far-future messages cost
    /// disk, not memory or reopen time. Default 30 s.
    pub resident_window: Duration,
    /// What open does with a damaged record followed by valid ones in an active segment.
    /// Default [`Recovery::Refuse`].
    pub recovery: Recovery,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            durability: Durability::Sync,
            segment_size: 64 << 20,
            tail_cache: 16 << 20,
            max_queued: 65_536,
            resident_window: Duration::from_secs(30),
            recovery: Recovery::Refuse,
        }
    }
}

impl EmbeddedConfig {
    /// Sets the durability mode.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }
    /// Sets the segment size.
    pub fn segment_size(mut self, bytes: u64) -> Self {
        self.segment_size = bytes;
        self
    }
    /// Sets the per-topic tail cache size.
    pub fn tail_cache(mut self, bytes: usize) -> Self {
        self.tail_cache = bytes;
        self
    }
    /// Sets how many messages may wait for a commit cycle.
    pub fn max_queued(mut self, n: usize) -> Self {
        self.max_queued = n;
        self
    }
    /// Sets the window of scheduled messages held in memory.
    pub fn resident_window(mut self, window: Duration) -> Self {
        self.resident_window = window;
        self
    }
    /// Sets what open does with damage followed by valid records (see [`Recovery`]).
    pub fn recovery(mut self, recovery: Recovery) -> Self {
        self.recovery = recovery;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.segment_size < 4096 {
            return Err(ConfigError::new(
                "segment_size",
                "must be at least 4096 bytes",
            ));
        }
        if self.max_queued == 0 {
            return Err(ConfigError::new("max_queued", "must be at least 1"));
        }
        if let Durability::Periodic(d) = self.durability {
            if d.is_zero() {
                return Err(ConfigError::new(
                    "durability",
                    "the periodic sync interval must be positive (use Durability::Sync)",
                ));
            }
        }
        Ok(())
    }
}
