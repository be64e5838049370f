//! A session's transaction status, the same three states in both engines: PostgreSQL
//! reports it in every ReadyForQuery (its byte is `byte()`), MySQL in the status flags of
//! OK and EOF packets (`SERVER_STATUS_IN_TRANS`). Sessions, the client list (`obs`) and
//! the control plane's holds at transaction boundaries read it.

/// Transaction status in a ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    #[default]
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block.
    Failed,
}

impl TxStatus {
    /// From a ReadyForQuery's status byte; anything unknown counts as failed (never
    /// taken for idle).
    pub fn of(byte: u8) -> TxStatus {
        match byte {
            b'I' => TxStatus::Idle,
            b'T' => TxStatus::InTransaction,
            _ => TxStatus::Failed,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}
