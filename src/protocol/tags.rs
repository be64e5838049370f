//! Message types and transaction status as types, not bare bytes.

/// The messages a client may send after startup (PostgreSQL protocol 3.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendTag {
    Bind,
    Close,
    CopyData,
    CopyDone,
    CopyFail,
    Describe,
    Execute,
    Flush,
    FunctionCall,
    Parse,
    Query,
    Sync,
    Terminate,
}

impl FrontendTag {
    /// The type of a message's first byte; None for anything a client may not send.
    pub fn of(byte: u8) -> Option<FrontendTag> {
        use FrontendTag::*;
        Some(match byte {
            b'B' => Bind,
            b'C' => Close,
            b'd' => CopyData,
            b'c' => CopyDone,
            b'f' => CopyFail,
            b'D' => Describe,
            b'E' => Execute,
            b'H' => Flush,
            b'F' => FunctionCall,
            b'P' => Parse,
            b'Q' => Query,
            b'S' => Sync,
            b'X' => Terminate,
            _ => return None,
        })
    }

    /// Answered by a ReadyForQuery (ends a request).
    pub fn requests_ready(self) -> bool {
        matches!(self, FrontendTag::Query | FrontendTag::Sync | FrontendTag::FunctionCall)
    }

    /// Part of an extended-protocol batch that only a Sync closes.
    pub fn opens_batch(self) -> bool {
        use FrontendTag::*;
        matches!(self, Parse | Bind | Describe | Execute | Close)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_classify() {
        for b in 0..=255u8 {
            assert_eq!(FrontendTag::of(b).is_some(), b"BCdcfDEHFPQSX".contains(&b), "{b}");
        }
        assert!(FrontendTag::Sync.requests_ready() && !FrontendTag::Execute.requests_ready());
        assert!(FrontendTag::Execute.opens_batch() && !FrontendTag::Flush.opens_batch());
        assert_eq!(
            FrontendTag::of(b'p'),
            None,
            "a PasswordMessage after startup is not accepted"
        );
    }

    #[test]
    fn status_bytes() {
        for s in [TxStatus::Idle, TxStatus::InTransaction, TxStatus::Failed] {
            assert_eq!(TxStatus::of(s.byte()), s);
        }
        assert_eq!(TxStatus::of(0), TxStatus::Failed);
    }
}
