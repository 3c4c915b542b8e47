//! How a command fails, and the exit code each way gives. Scripts branch on the codes:
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | done |
//! | 1 | failed ([`Failure::Unexpected`]) |
//! | 2 | configuration or usage error ([`Failure::Config`]; clap exits 2 on a usage error) |
//! | 3 | refused: the group is running ([`Failure::Busy`]) |
//! | 4 | the audit found problems ([`Failure::AuditFailed`]) |
//!
//! A variant exists only where a caller (a script) branches on it; everything else is
//! `Unexpected`, which `?` makes of any `anyhow::Error`.

use keel_core::settings::SettingsError;

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A `KEEL_*` setting is unusable at start-up. Not `#[from]`: a setting found wanting while a
    /// command runs (`require_redis`, when `KEEL_REDIS_URL` is empty) fails that command, exit 1.
    #[error("configuration error: {0}")]
    Config(SettingsError),
    /// The group has live members (`keel replay`), or another rebuild runs (`keel analytics
    /// rebuild`): nothing was changed.
    #[error("group {group} has {members} live member(s); stop them first or pass --wait <seconds>")]
    Busy { group: String, members: usize },
    /// The audit ran and this many checks found problems (the report says which).
    #[error("audit failed: {0} check(s) found problems")]
    AuditFailed(usize),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl Failure {
    /// The process's exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Unexpected(_) => 1,
            Self::Config(_) => 2,
            Self::Busy { .. } => 3,
            Self::AuditFailed(_) => 4,
        }
    }
}
