//! Questions of the proxy's own on a held server connection, between units: one simple
//! Query whose answer is read here and never relayed (whether what pinned a client is
//! released; the primary's WAL position after a client's write).

use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use tokio::io::AsyncReadExt;

use crate::tls::{write_flush, ServerStream};

/// How long an answer may take (a healthy server answers these in well under 1 ms).
const WITHIN: Duration = Duration::from_secs(1);

/// What a question got.
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    /// The text columns of the last row of the answer (a NULL is None), its
    /// ReadyForQuery read: the connection is as before.
    Row(Vec<Option<String>>),
    /// An ErrorResponse, or no row; the ReadyForQuery read: the connection is as before.
    NoRow,
    /// No whole answer within `WITHIN`, or the connection failed: what it still owes is
    /// unknown, so it must not serve anyone else.
    Lost,
}

/// Ask `sql` on `stream` and read its whole answer. `sbuf` must hold nothing owed to a
/// client (the unit ended with nothing owed); it is empty again afterwards.
pub async fn ask(stream: &mut ServerStream, sbuf: &mut BytesMut, sql: &str) -> Asked {
    let asked = async {
        let mut q = BytesMut::with_capacity(sql.len() + 6);
        postgres_protocol::message::frontend::query(sql, &mut q).ok()?;
        write_flush(stream, &q).await.ok()?;
        let (mut row, mut failed) = (None, false);
        loop {
            while let Some(msg) = Message::parse(sbuf).ok()? {
                match msg {
                    Message::DataRow(body) => {
                        let mut cols = Vec::new();
                        let mut ranges = body.ranges();
                        while let Some(r) = ranges.next().ok()? {
                            cols.push(r.and_then(|r| String::from_utf8(body.buffer()[r].to_vec()).ok()));
                        }
                        row = Some(cols);
                    }
                    Message::ErrorResponse(_) => failed = true,
                    Message::ReadyForQuery(_) => {
                        return Some(match row {
                            Some(r) if !failed => Asked::Row(r),
                            _ => Asked::NoRow,
                        })
                    }
                    _ => {}
                }
            }
            if stream.read_buf(sbuf).await.ok()? == 0 {
                return None;
            }
        }
    };
    let answer = tokio::time::timeout(WITHIN, asked)
        .await
        .ok()
        .flatten()
        .unwrap_or(Asked::Lost);
    sbuf.clear();
    answer
}
