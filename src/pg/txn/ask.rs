//! Questions of the proxy's own on a held server connection, between units: one simple
//! Query whose answer is read here and never relayed (whether what pinned a client is
//! released). The whole answer is read, up to its ReadyForQuery, even after an error:
//! what is left unread would reach the client as an answer to its next statement.

use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{DataRowBody, Message};
use tokio::io::AsyncReadExt;

use crate::tls::ServerStream;

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
        stream.send(&q).await.ok()?;
        let (mut row, mut failed) = (None, false);
        loop {
            while let Some(msg) = Message::parse(sbuf).ok()? {
                match msg {
                    Message::DataRow(body) => row = Some(text_columns(&body)?),
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

/// The text columns of a row (a NULL, or text that is not UTF-8, is None).
fn text_columns(body: &DataRowBody) -> Option<Vec<Option<String>>> {
    let mut cols = Vec::new();
    let mut ranges = body.ranges();
    while let Some(r) = ranges.next().ok()? {
        cols.push(r.and_then(|r| String::from_utf8(body.buffer()[r].to_vec()).ok()));
    }
    Some(cols)
}

/// The text columns of `msg`, one whole DataRow message (tag and length included); None
/// if it is not one. For the answer to a question sent with a client's statements
/// (`Owed::Floor`), which the machine sees message by message.
pub fn row_of(msg: &[u8]) -> Option<Vec<Option<String>>> {
    match Message::parse(&mut BytesMut::from(msg)).ok()?? {
        Message::DataRow(body) => text_columns(&body),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::protocol::messages::{
        command_complete, data_row_text, error_response, ready_for_query, row_description_text, Severity,
    };
    use crate::tx::TxStatus;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A server that reads the question, then sends `parts` one at a time, 20 ms apart.
    async fn asked_of(parts: Vec<BytesMut>) -> (Asked, ServerStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut q = BytesMut::new();
            s.read_buf(&mut q).await.unwrap();
            assert_eq!(q[0], b'Q');
            for p in parts {
                s.write_all(&p).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            s
        });
        let mut stream = ServerStream::Plain(TcpStream::connect(addr).await.unwrap());
        let mut sbuf = BytesMut::new();
        let answer = ask(&mut stream, &mut sbuf, "SELECT 1").await;
        assert!(sbuf.is_empty());
        drop(server.await.unwrap());
        (answer, stream)
    }

    #[tokio::test]
    async fn a_row_is_read_with_its_ready_for_query() {
        let mut a = BytesMut::new();
        row_description_text(&mut a, &["n"]);
        data_row_text(&mut a, &["3"]);
        let mut b = BytesMut::new();
        command_complete(&mut b, "SELECT 1");
        ready_for_query(&mut b, TxStatus::Idle);
        let (answer, _) = asked_of(vec![a, b]).await;
        assert_eq!(answer, Asked::Row(vec![Some("3".to_string())]));
    }

    /// The old reader stopped at the error: the ReadyForQuery that came after it reached
    /// the client as the answer to its next statement.
    #[tokio::test]
    async fn after_an_error_the_answer_is_read_to_its_end() {
        let mut a = BytesMut::new();
        error_response(&mut a, Severity::Error, "42501", "permission denied", None);
        let mut b = BytesMut::new();
        ready_for_query(&mut b, TxStatus::Idle);
        let (answer, mut stream) = asked_of(vec![a, b]).await;
        assert_eq!(answer, Asked::NoRow);
        // Nothing is left on the connection: the server has closed it, and the next read
        // finds its end, not a ReadyForQuery.
        let mut rest = BytesMut::new();
        assert_eq!(stream.read_buf(&mut rest).await.unwrap(), 0, "left unread: {rest:?}");
    }

    #[test]
    fn a_row_is_read_from_one_whole_message() {
        let mut m = BytesMut::new();
        data_row_text(&mut m, &["0/3000148", "000000010000000000000003"]);
        assert_eq!(
            row_of(&m),
            Some(vec![
                Some("0/3000148".to_string()),
                Some("000000010000000000000003".to_string())
            ])
        );
        let mut other = BytesMut::new();
        ready_for_query(&mut other, TxStatus::Idle);
        assert_eq!(row_of(&other), None);
        assert_eq!(row_of(&m[..m.len() - 1]), None);
    }

    #[tokio::test]
    async fn an_answer_cut_short_is_lost() {
        let mut a = BytesMut::new();
        row_description_text(&mut a, &["n"]);
        let (answer, _) = asked_of(vec![a]).await;
        assert_eq!(answer, Asked::Lost);
    }
}
