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

/// The server messages the proxy looks into (PostgreSQL protocol 3.0); every other
/// type passes through untouched and is kept as its byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendTag {
    /// `1`
    ParseComplete,
    /// `2`
    BindComplete,
    /// `3`
    CloseComplete,
    /// `C`
    CommandComplete,
    /// `E`
    ErrorResponse,
    /// `N`
    NoticeResponse,
    /// `S`
    ParameterStatus,
    /// `A`
    Notification,
    /// `Z`
    ReadyForQuery,
    /// `R` (login)
    Authentication,
    /// `K` (login)
    BackendKeyData,
    /// `v` (login)
    NegotiateProtocolVersion,
    /// `D`
    DataRow,
    /// `I`
    EmptyQueryResponse,
    Other(u8),
}

impl BackendTag {
    pub const fn of(byte: u8) -> BackendTag {
        use BackendTag::*;
        match byte {
            b'1' => ParseComplete,
            b'2' => BindComplete,
            b'3' => CloseComplete,
            b'C' => CommandComplete,
            b'E' => ErrorResponse,
            b'N' => NoticeResponse,
            b'S' => ParameterStatus,
            b'A' => Notification,
            b'Z' => ReadyForQuery,
            b'R' => Authentication,
            b'K' => BackendKeyData,
            b'v' => NegotiateProtocolVersion,
            b'D' => DataRow,
            b'I' => EmptyQueryResponse,
            other => Other(other),
        }
    }

    pub const fn byte(self) -> u8 {
        use BackendTag::*;
        match self {
            ParseComplete => b'1',
            BindComplete => b'2',
            CloseComplete => b'3',
            CommandComplete => b'C',
            ErrorResponse => b'E',
            NoticeResponse => b'N',
            ParameterStatus => b'S',
            Notification => b'A',
            ReadyForQuery => b'Z',
            Authentication => b'R',
            BackendKeyData => b'K',
            NegotiateProtocolVersion => b'v',
            DataRow => b'D',
            EmptyQueryResponse => b'I',
            Other(b) => b,
        }
    }

    /// A message the transaction engine reads (the rest it only passes on, and may
    /// stream when large).
    pub fn looked_into(self) -> bool {
        use BackendTag::*;
        matches!(
            self,
            ParseComplete
                | CloseComplete
                | ErrorResponse
                | NoticeResponse
                | ParameterStatus
                | Notification
                | ReadyForQuery
        )
    }

    /// Sent by the server on its own, whatever was asked (asynchronous messages, which
    /// never count as the answer to a request).
    pub fn is_asynchronous(self) -> bool {
        matches!(
            self,
            BackendTag::NoticeResponse | BackendTag::ParameterStatus | BackendTag::Notification
        )
    }
}

/// The status byte of ReadyForQuery is a session's transaction status (`crate::tx`).
pub use crate::tx::TxStatus;

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
    fn backend_tags_round_trip() {
        for b in 0..=255u8 {
            let t = BackendTag::of(b);
            assert_eq!(t.byte(), b);
            assert_eq!(
                matches!(t, BackendTag::Other(_)),
                !b"123CENSAZRKvDI".contains(&b),
                "{b}"
            );
        }
        assert!(BackendTag::of(b'A').is_asynchronous() && !BackendTag::of(b'Z').is_asynchronous());
        // The engine streams large rows and COPY data; it reads what steers it.
        assert!(!BackendTag::of(b'D').looked_into() && !BackendTag::of(b'd').looked_into());
        assert!(BackendTag::of(b'1').looked_into() && BackendTag::of(b'Z').looked_into());
    }

    #[test]
    fn status_bytes() {
        for s in [TxStatus::Idle, TxStatus::InTransaction, TxStatus::Failed] {
            assert_eq!(TxStatus::of(s.byte()), s);
        }
        assert_eq!(TxStatus::of(0), TxStatus::Failed);
    }
}
