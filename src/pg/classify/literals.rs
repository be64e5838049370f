//! The cache key of a statement: its text with the literals blanked, so statements that
//! differ only in their values share one classification; and the same text without
//! comments, for query digests.

/// Copy `sql` into `out` with every literal (number, string, dollar-quoted string, bit
/// or hex string) replaced by `?` and every comment by a space, except a comment that
/// holds a `switchyard:` hint, which is kept. Identifiers (quoted or not) and `$n`
/// parameters are kept, so statements that differ only in their values, or in a comment
/// such as sqlcommenter's per-request `traceparent`, get one key.
/// Written by hand: this must cost one pass and no allocation per query, and
/// libpg_query's own normalization parses the query, which is what the cache avoids.
pub fn blank_literals(sql: &str, out: &mut String) {
    out.clear();
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    // `sql[kept..i]` is text that stays as it is: copied in one piece when the next
    // replacement (or the end) comes, rather than run by run. A statement with two
    // literals is then three copies, however many runs its text has.
    let mut kept = 0;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let prev_ident = i > 0 && CLASS[b[i - 1] as usize] & GLUES != 0;
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                let end = sql[i..].find('\n').map_or(b.len(), |e| i + e);
                out.push_str(&sql[kept..i]);
                push_comment(out, &sql[i..end]);
                i = end;
                kept = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let j = block_comment_end(b, i);
                out.push_str(&sql[kept..i]);
                push_comment(out, &sql[i..j]);
                i = j;
                kept = j;
            }
            b'"' => {
                // A quoted identifier: kept.
                let j = closing_quote(b, i + 1, b'"', false);
                i = (j + 1).min(b.len());
            }
            b'\'' => {
                // A one-letter prefix (E'', B'', X'', N'') belongs to the literal: it is
                // left out of the copy (an ASCII letter, so `i - 1` is a char boundary),
                // or, when a replacement just took it (`1.x'…'`: the number's `?`), what
                // that pushed is taken back, as the copy-per-run version did.
                let escapes = i > 0 && matches!(b[i - 1], b'E' | b'e') && !(i > 1 && ident(b[i - 2]));
                let prefixed = i > 0
                    && matches!(b[i - 1], b'E' | b'e' | b'B' | b'b' | b'X' | b'x' | b'N' | b'n')
                    && !(i > 1 && ident(b[i - 2]));
                match (prefixed, kept < i) {
                    (true, true) => out.push_str(&sql[kept..i - 1]),
                    (true, false) => {
                        out.pop();
                    }
                    (false, _) => out.push_str(&sql[kept..i]),
                }
                let j = closing_quote(b, i + 1, b'\'', escapes);
                out.push('?');
                i = (j + 1).min(b.len());
                kept = i;
            }
            b'$' if !prev_ident => {
                // $1 parameter, or $tag$ ... $tag$ string.
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|&x| !(x.is_ascii_alphanumeric() || x == b'_'))
                    .map(|p| i + 1 + p);
                match tag_end {
                    Some(t) if b[t] == b'$' && !b[i + 1..t].first().is_some_and(u8::is_ascii_digit) => {
                        let tag = &sql[i..=t];
                        let body_end = sql[t + 1..].find(tag).map_or(b.len(), |e| t + 1 + e + tag.len());
                        out.push_str(&sql[kept..i]);
                        out.push('?');
                        i = body_end;
                        kept = i;
                    }
                    _ => {
                        // A parameter: kept.
                        i += 1;
                        while i < b.len() && b[i].is_ascii_digit() {
                            i += 1;
                        }
                    }
                }
            }
            b'0'..=b'9' if !prev_ident => {
                let mut j = i;
                while j < b.len() && CLASS[b[j] as usize] & NUMBER != 0 {
                    // 1e-5: a sign right after the exponent belongs to the number.
                    if b[j] | 0x20 == b'e' && matches!(b.get(j + 1), Some(b'+' | b'-')) {
                        j += 1;
                    }
                    j += 1;
                }
                out.push_str(&sql[kept..i]);
                out.push('?');
                i = j;
                kept = j;
            }
            // A run in which nothing can start. It ends only before an ASCII byte, so
            // always on a character boundary.
            _ => i = plain_run_end(b, i + 1),
        }
    }
    out.push_str(&sql[kept..]);
}

/// Where the plain run that goes on at `from` (≥ 1) ends: the first byte there or later
/// that may start a comment, a quoted run, a parameter or a number, or the end.
///
/// Most of a query's bytes are in such runs, so they are skipped eight at a time: every
/// byte that can end a run lies in `"` ..= `9`, and a word with no byte in that range
/// (a SWAR test, three operations on a `u64`) has none. In a word with one (a digit, or
/// punctuation such as `(`, `,` or `*` that shares the range) only the bytes that may
/// end the run are looked at (`starts_or_digits`). Under `bench/instructions` the first
/// test halved the cost per byte of pgbench's query.
fn plain_run_end(b: &[u8], from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Bytes strictly between these two: '"' (0x22) ..= '9' (0x39).
    const ABOVE: u64 = 0x21;
    const BELOW: u64 = 0x3a;
    let ends = |j: usize| {
        let class = CLASS[b[j] as usize];
        class & STARTS != 0 || (class & DIGIT != 0 && CLASS[b[j - 1] as usize] & GLUES == 0)
    };
    let mut j = from;
    while let Some(word) = b.get(j..j + 8) {
        let x = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let low7 = x & (ONES * 0x7f);
        // Per byte, without carries between bytes: the high bit of each factor says
        // low7 < BELOW, the byte is ASCII, low7 > ABOVE.
        let in_range = (ONES * (0x7f + BELOW)).wrapping_sub(low7) & !x & (low7 + ONES * (0x7f - ABOVE)) & HIGH;
        if in_range != 0 {
            // Which bytes of the word can end the run at all (a start byte or a digit):
            // each looked at in turn, lowest first, skipping the punctuation between.
            let mut candidates = starts_or_digits(x);
            while candidates != 0 {
                let k = j + (candidates.trailing_zeros() / 8) as usize;
                if ends(k) {
                    return k;
                }
                candidates &= candidates - 1;
            }
        }
        j += 8;
    }
    (j..b.len()).find(|&k| ends(k)).unwrap_or(b.len())
}

/// The high bit of each byte of `x` (eight bytes of text, the first lowest) that is one of
/// `- / " ' $` or a digit, and maybe of bytes after such a byte (a zero test's borrow
/// can carry into the next byte): a superset, so each is checked again. No byte that is
/// one of them is missed.
fn starts_or_digits(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let equal = |c: u8| {
        let t = x ^ (ONES * c as u64);
        t.wrapping_sub(ONES) & !t & HIGH
    };
    let low7 = x & (ONES * 0x7f);
    // '0' (0x30) ..= '9' (0x39), per byte as in `plain_run_end`.
    let digits = (ONES * (0x7f + 0x3a)).wrapping_sub(low7) & !x & (low7 + ONES * (0x7f - 0x2f)) & HIGH;
    equal(b'-') | equal(b'/') | equal(b'"') | equal(b'\'') | equal(b'$') | digits
}

/// `CLASS[byte]`: what a byte can do in `blank_literals`'s plain runs.
const STARTS: u8 = 1; // - / " ' $: may start a comment, a quoted run or a parameter
const DIGIT: u8 = 2; // starts a number unless it continues a word or a `$n`
const GLUES: u8 = 4; // part of a word (or `$`): a digit after it is no number
const NUMBER: u8 = 8; // part of a number once one started: a letter, digit, `.` or `_`
const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        if matches!(b, b'-' | b'/' | b'"' | b'\'' | b'$') {
            t[c] |= STARTS;
        }
        if b.is_ascii_digit() {
            t[c] |= DIGIT;
        }
        if b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80 || b == b'$' {
            t[c] |= GLUES;
        }
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' {
            t[c] |= NUMBER;
        }
        c += 1;
    }
    t
};

/// Where the `/* */` comment starting at `from` ends (past its `*/`, or the text's end),
/// nested comments included, as PostgreSQL allows them.
pub(crate) fn block_comment_end(b: &[u8], from: usize) -> usize {
    let (mut depth, mut j) = (1, from + 2);
    while j < b.len() && depth > 0 {
        if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
            depth += 1;
            j += 2;
        } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
            depth -= 1;
            j += 2;
        } else {
            j += 1;
        }
    }
    j.min(b.len())
}

/// A comment in a cache key: only a hint changes what a statement does.
fn push_comment(out: &mut String, comment: &str) {
    if comment.contains("switchyard:") {
        out.push_str(comment);
    } else {
        out.push(' ');
    }
}

/// `sql` without its comments (each becomes a space), quoted text left alone: a
/// digest's text to show.
pub fn without_comments(sql: &str) -> String {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = sql[i..].find('\n').map_or(b.len(), |e| i + e);
                out.push(' ');
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = block_comment_end(b, i);
                out.push(' ');
            }
            q @ (b'\'' | b'"') => {
                let end = (closing_quote(b, i + 1, q, false) + 1).min(b.len());
                out.push_str(&sql[i..end]);
                i = end;
            }
            _ => {
                let j = sql[i..]
                    .find(['-', '/', '\'', '"'])
                    .map_or(b.len(), |p| if p == 0 { i + 1 } else { i + p });
                out.push_str(&sql[i..j]);
                i = j;
            }
        }
    }
    out
}

/// Where the quote that closes a quoted run starting at `from` is (`b.len()` if none): a
/// doubled quote is part of the text, and so is a backslash-escaped byte in an E'' string.
fn closing_quote(b: &[u8], from: usize, quote: u8, backslash_escapes: bool) -> usize {
    let mut j = from;
    while j < b.len() {
        if backslash_escapes && b[j] == b'\\' {
            j += 2;
            continue;
        }
        if b[j] == quote {
            if b.get(j + 1) == Some(&quote) {
                j += 2;
                continue;
            }
            return j;
        }
        j += 1;
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `blank_literals` as it was before it copied kept text lazily: every run pushed as
    /// it is passed.
    fn blank_literals_run_by_run(sql: &str, out: &mut String) {
        out.clear();
        let b = sql.as_bytes();
        let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            let prev_ident = i > 0 && CLASS[b[i - 1] as usize] & GLUES != 0;
            match c {
                b'-' if b.get(i + 1) == Some(&b'-') => {
                    let end = sql[i..].find('\n').map_or(b.len(), |e| i + e);
                    push_comment(out, &sql[i..end]);
                    i = end;
                }
                b'/' if b.get(i + 1) == Some(&b'*') => {
                    let j = block_comment_end(b, i);
                    push_comment(out, &sql[i..j]);
                    i = j;
                }
                b'"' => {
                    let j = closing_quote(b, i + 1, b'"', false);
                    let end = (j + 1).min(b.len());
                    out.push_str(&sql[i..end]);
                    i = end;
                }
                b'\'' => {
                    // A one-letter prefix (E'', B'', X'', N'') belongs to the literal.
                    let escapes = i > 0 && matches!(b[i - 1], b'E' | b'e') && !(i > 1 && ident(b[i - 2]));
                    if i > 0
                        && matches!(b[i - 1], b'E' | b'e' | b'B' | b'b' | b'X' | b'x' | b'N' | b'n')
                        && !(i > 1 && ident(b[i - 2]))
                    {
                        out.pop();
                    }
                    let j = closing_quote(b, i + 1, b'\'', escapes);
                    out.push('?');
                    i = (j + 1).min(b.len());
                }
                b'$' if !prev_ident => {
                    // $1 parameter, or $tag$ ... $tag$ string.
                    let tag_end = b[i + 1..]
                        .iter()
                        .position(|&x| !(x.is_ascii_alphanumeric() || x == b'_'))
                        .map(|p| i + 1 + p);
                    match tag_end {
                        Some(t) if b[t] == b'$' && !b[i + 1..t].first().is_some_and(u8::is_ascii_digit) => {
                            let tag = &sql[i..=t];
                            let body_end = sql[t + 1..].find(tag).map_or(b.len(), |e| t + 1 + e + tag.len());
                            out.push('?');
                            i = body_end;
                        }
                        _ => {
                            out.push('$');
                            i += 1;
                            while i < b.len() && b[i].is_ascii_digit() {
                                out.push(b[i] as char);
                                i += 1;
                            }
                        }
                    }
                }
                b'0'..=b'9' if !prev_ident => {
                    let mut j = i;
                    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'.' || b[j] == b'_') {
                        // 1e-5: a sign right after the exponent belongs to the number.
                        if matches!(b[j], b'e' | b'E') && matches!(b.get(j + 1), Some(b'+' | b'-')) {
                            j += 1;
                        }
                        j += 1;
                    }
                    out.push('?');
                    i = j;
                }
                _ => {
                    // A run in which nothing can start: copied at once. It ends only before
                    // an ASCII byte, so always on a character boundary.
                    let j = plain_run_end(b, i + 1);
                    out.push_str(&sql[i..j]);
                    i = j;
                }
            }
        }
    }

    /// `plain_run_end` as the byte-at-a-time loop it replaces.
    fn plain_run_end_bytewise(b: &[u8], from: usize) -> usize {
        let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
        (from..b.len())
            .find(|&j| {
                let c = b[j];
                matches!(c, b'-' | b'/' | b'"' | b'\'' | b'$')
                    || (c.is_ascii_digit() && !(ident(b[j - 1]) || b[j - 1] == b'$'))
            })
            .unwrap_or(b.len())
    }

    #[test]
    fn the_word_at_a_time_scan_ends_runs_where_the_bytewise_one_does() {
        // Every byte value, in every position of a word, after each kind of byte.
        for v in 0..=255u8 {
            for before in [b'a', b' ', b'$', b'_', 0xc3] {
                for pos in 0..20 {
                    let mut b = vec![b'x'; 24];
                    b[pos] = before;
                    b[pos + 1] = v;
                    for from in 1..4 {
                        assert_eq!(
                            plain_run_end(&b, from),
                            plain_run_end_bytewise(&b, from),
                            "byte {v:#x} at {} after {before:#x}, from {from}",
                            pos + 1
                        );
                    }
                }
            }
        }
        // Random text over the bytes that matter (a small LCG: no dependency for this).
        let alphabet = b"ab_9$-/'\"(),.* \xc3\xa9\x7f=;";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let len = (seed >> 59) as usize + 1;
            let b: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    alphabet[(seed >> 33) as usize % alphabet.len()]
                })
                .collect();
            for from in 1..=len {
                assert_eq!(
                    plain_run_end(&b, from),
                    plain_run_end_bytewise(&b, from),
                    "{b:?} from {from}"
                );
            }
        }
    }

    #[test]
    fn lazy_copies_blank_as_run_by_run_copies_did() {
        let mut fixed = vec![
            "UPDATE pgbench_accounts SET abalance = abalance + -3419 WHERE aid = 649373;".to_string(),
            "SELECT E'a\\'b', x'1f', n'é', B'01', $1, $tag$ x $tag$, \"q\"\"x\" -- c\n/* s /* n */ */ 1e-5".into(),
            "/* switchyard:primary */ SELECT 'x' -- switchyard:primary".into(),
            "e'unterminated".into(),
            "$$".into(),
            "".into(),
        ];
        let alphabet: &[&str] = &[
            "a", "E", "e", "x", "N", "_", "9", "0", "$", "-", "/", "*", "'", "\"", "\\", " ", "\n", ".", "+", "é",
            "$t$",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..30_000 {
            let len = (seed >> 59) as usize + 1;
            let text: String = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    alphabet[(seed >> 33) as usize % alphabet.len()]
                })
                .collect();
            fixed.push(text);
        }
        let (mut lazy, mut runs) = (String::new(), String::new());
        for text in &fixed {
            blank_literals(text, &mut lazy);
            blank_literals_run_by_run(text, &mut runs);
            assert_eq!(lazy, runs, "{text:?}");
        }
    }

    #[test]
    fn the_candidate_mask_holds_every_start_byte_and_digit() {
        for v in 0..=255u8 {
            for pos in 0..8 {
                for fill in [b'a', b'(', 0x80, 0xff, b'0'] {
                    let mut w = [fill; 8];
                    w[pos] = v;
                    let mask = starts_or_digits(u64::from_le_bytes(w));
                    let wanted = matches!(v, b'-' | b'/' | b'"' | b'\'' | b'$') || v.is_ascii_digit();
                    if wanted {
                        assert_ne!(mask & (0x80 << (8 * pos)), 0, "byte {v:#x} at {pos} among {fill:#x}");
                    }
                    // Below the first wanted byte nothing is flagged that is not wanted.
                    let first = w
                        .iter()
                        .position(|&c| matches!(c, b'-' | b'/' | b'"' | b'\'' | b'$') || c.is_ascii_digit());
                    let lowest = (mask != 0).then(|| mask.trailing_zeros() as usize / 8);
                    assert_eq!(lowest, first, "{w:?}");
                }
            }
        }
    }
}
