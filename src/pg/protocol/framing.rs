//! A streaming framer for the relay. It never buffers a message: it walks the bytes as
//! they pass, learns each message's tag and length from its 5-byte header (which may be
//! split across reads), and so knows where message boundaries are. That is all the
//! session loop needs: to vet client messages, and to inject an ErrorResponse only at a
//! boundary so the client's stream stays well-formed.

use crate::pg::protocol::tags::{BackendTag, TxStatus};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {len} for message type '{tag}'")]
    BadLength { tag: char, len: u32 },
    #[error("message of type '{tag}' is {len} bytes, over the limit of {limit} bytes (proxy.max_message_bytes)")]
    TooLong { tag: char, len: u32, limit: u32 },
}

#[derive(Debug)]
pub struct Framer {
    /// Body bytes of the current message still to pass.
    remaining: usize,
    header: [u8; 5],
    header_len: usize,
    limit: u32,
    /// The next body byte is a ReadyForQuery status.
    want_status: bool,
    last_status: TxStatus,
}

impl Framer {
    pub fn new(limit: u32) -> Framer {
        Framer {
            remaining: 0,
            header: [0; 5],
            header_len: 0,
            limit,
            want_status: false,
            last_status: TxStatus::Idle,
        }
    }

    /// Transaction status of the last ReadyForQuery seen.
    pub fn last_ready_status(&self) -> TxStatus {
        self.last_status
    }

    /// True between messages.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0 && self.header_len == 0
    }

    /// Walk `chunk`, calling `on_message(tag, total_len_including_length_word)` at the
    /// start of every message whose header completes in it. Stops at the first error
    /// from the framer or the callback.
    pub fn scan<E: From<FrameError>>(
        &mut self,
        chunk: &[u8],
        mut on_message: impl FnMut(u8, u32) -> Result<(), E>,
    ) -> Result<(), E> {
        self.scan_bodies(chunk, |tag, len, _| on_message(tag, len))
    }

    /// As `scan`, also giving each message's body (after the length word) when all of
    /// it is in `chunk` (None when it continues in a later read).
    pub fn scan_bodies<E: From<FrameError>>(
        &mut self,
        chunk: &[u8],
        mut on_message: impl FnMut(u8, u32, Option<&[u8]>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut pos = 0;
        while pos < chunk.len() {
            if self.remaining > 0 {
                if self.want_status {
                    self.last_status = TxStatus::of(chunk[pos]);
                    self.want_status = false;
                }
                let step = self.remaining.min(chunk.len() - pos);
                self.remaining -= step;
                pos += step;
                continue;
            }
            let need = 5 - self.header_len;
            let take = need.min(chunk.len() - pos);
            self.header[self.header_len..self.header_len + take].copy_from_slice(&chunk[pos..pos + take]);
            self.header_len += take;
            pos += take;
            if self.header_len < 5 {
                break;
            }
            self.header_len = 0;
            let tag = self.header[0];
            let len = u32::from_be_bytes(self.header[1..5].try_into().unwrap());
            if len < 4 || len > i32::MAX as u32 {
                return Err(FrameError::BadLength { tag: tag as char, len }.into());
            }
            if len > self.limit {
                return Err(FrameError::TooLong {
                    tag: tag as char,
                    len,
                    limit: self.limit,
                }
                .into());
            }
            let body = chunk.get(pos..pos + (len as usize - 4));
            on_message(tag, len, body)?;
            self.remaining = len as usize - 4;
            self.want_status = BackendTag::of(tag) == BackendTag::ReadyForQuery && len == 5;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(f: &mut Framer, chunk: &[u8]) -> Result<Vec<(char, u32)>, FrameError> {
        let mut seen = Vec::new();
        f.scan::<FrameError>(chunk, |t, l| {
            seen.push((t as char, l));
            Ok(())
        })?;
        Ok(seen)
    }

    #[test]
    fn finds_messages_across_arbitrary_splits() {
        let stream: &[u8] = b"Q\0\0\0\x0bSELECT\0X\0\0\0\x04Z\0\0\0\x05I";
        for split in 0..stream.len() {
            let mut f = Framer::new(1 << 20);
            let mut seen = collect(&mut f, &stream[..split]).unwrap();
            seen.extend(collect(&mut f, &stream[split..]).unwrap());
            assert_eq!(seen, vec![('Q', 11), ('X', 4), ('Z', 5)], "split at {split}");
            assert!(f.at_boundary());
        }
    }

    #[test]
    fn bodies_are_given_when_whole_in_the_chunk() {
        let stream: &[u8] = b"Q\0\0\0\x0bSELECT\0X\0\0\0\x04";
        for split in 0..stream.len() {
            let mut f = Framer::new(1 << 20);
            let mut seen = Vec::new();
            for chunk in [&stream[..split], &stream[split..]] {
                f.scan_bodies::<FrameError>(chunk, |t, _, body| {
                    seen.push((t as char, body.map(<[u8]>::to_vec)));
                    Ok(())
                })
                .unwrap();
            }
            let query = if !(5..12).contains(&split) {
                Some(b"SELECT\0".to_vec())
            } else {
                None
            };
            assert_eq!(seen, vec![('Q', query), ('X', Some(Vec::new()))], "split at {split}");
        }
    }

    #[test]
    fn boundary_is_tracked_mid_message() {
        let mut f = Framer::new(1 << 20);
        collect(&mut f, b"Q\0\0\0\x0bSEL").unwrap();
        assert!(!f.at_boundary());
        collect(&mut f, b"ECT\0").unwrap();
        assert!(f.at_boundary());
        collect(&mut f, b"Q\0").unwrap();
        assert!(!f.at_boundary());
    }

    #[test]
    fn remembers_the_last_ready_for_query_status_across_splits() {
        let stream: &[u8] = b"Z\0\0\0\x05TC\0\0\0\x05xZ\0\0\0\x05I";
        for split in 0..stream.len() {
            let mut f = Framer::new(1 << 20);
            collect(&mut f, &stream[..split]).unwrap();
            collect(&mut f, &stream[split..]).unwrap();
            assert_eq!(f.last_ready_status(), TxStatus::Idle, "split at {split}");
        }
        let mut f = Framer::new(1 << 20);
        collect(&mut f, b"Z\0\0\0\x05T").unwrap();
        assert_eq!(f.last_ready_status(), TxStatus::InTransaction);
    }

    #[test]
    fn rejects_bad_and_oversized_lengths() {
        let mut f = Framer::new(1024);
        assert_eq!(
            collect(&mut f, b"Q\0\0\0\x02"),
            Err(FrameError::BadLength { tag: 'Q', len: 2 })
        );
        let mut f = Framer::new(1024);
        assert_eq!(
            collect(&mut f, b"Q\x7f\xff\xff\xff"),
            Err(FrameError::TooLong {
                tag: 'Q',
                len: 0x7fffffff,
                limit: 1024
            })
        );
        let mut f = Framer::new(1024);
        assert!(matches!(
            collect(&mut f, b"Q\xff\xff\xff\xff"),
            Err(FrameError::BadLength { .. })
        ));
    }
}
