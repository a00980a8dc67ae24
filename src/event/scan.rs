//! Structural scanning of upstream JSON events: the few values the gateway reads (the event
//! type, a response's id, usage, error and incomplete details) are found by key without
//! parsing anything else. Strings are skipped with `memchr` (SIMD), containers by depth;
//! nothing is allocated unless a wanted string has escapes. An object can also be walked from
//! its end ([`MembersRev`]), for a value the upstream writes last (a response's usage).
//!
//! The upstream's text is not validated here (it is relayed as it came, and was checked to
//! be UTF-8); a scan of malformed text ends early and finds less, never panics, and is linear
//! in the text's length. Keys are compared as written: an escaped key (`"\u0069d"`) is not the
//! key it spells, which the real upstream never writes. Where a key repeats, the first wins
//! (walking from the end, the last).

use std::borrow::Cow;

/// Index after the JSON whitespace at `i`.
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;
/// How far into a string the search stays in a register before it calls `memchr`.
const SHORT: usize = 32;

/// The high bit of every byte of `word` equal to `byte`, and possibly of bytes above the
/// lowest such one (a borrow runs upward): only the lowest set bit is exact.
fn lowest_equal(word: u64, byte: u8) -> u64 {
    let x = word ^ (ONES * byte as u64);
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// Index of the quote that closes a string whose body starts at `from`, when the body has no
/// escape: `None` when a backslash comes first (or no quote at all), so a type or a key can be
/// compared as written. Most strings in an event are short (keys, types, ids, statuses):
/// their first 32 bytes are searched eight at a time in a register for a quote or a
/// backslash (a `memchr` call costs more than such a string), anything longer with
/// `memchr2` (SIMD).
pub fn plain_string_end(b: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    let short_end = (from + SHORT).min(b.len());
    while let Some(chunk) = b.get(at..short_end).and_then(<[u8]>::first_chunk::<8>) {
        let word = u64::from_le_bytes(*chunk);
        // The lowest of the two marks is exact (each mask's lowest bit is).
        let found = lowest_equal(word, b'"') | lowest_equal(word, b'\\');
        if found != 0 {
            at += (found.trailing_zeros() / 8) as usize;
            return (b[at] == b'"').then_some(at);
        }
        at += 8;
    }
    at += memchr::memchr2(b'"', b'\\', b.get(at..)?)?;
    (b[at] == b'"').then_some(at)
}

/// Index of the quote that closes the string whose body starts at `from`. The first 32 bytes
/// are read eight at a time for a quote or a backslash (an escape skips the byte after it);
/// past them the first quote not preceded by an odd run of backslashes is searched with
/// `memchr`, so escapes such as `\n`, which long texts are full of, cost nothing.
fn string_end(b: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    let short_end = (from + SHORT).min(b.len());
    while let Some(chunk) = b.get(at..short_end).and_then(<[u8]>::first_chunk::<8>) {
        let word = u64::from_le_bytes(*chunk);
        let found = lowest_equal(word, b'"') | lowest_equal(word, b'\\');
        if found == 0 {
            at += 8;
            continue;
        }
        // The lowest of the two marks is exact (each mask's lowest bit is).
        at += (found.trailing_zeros() / 8) as usize;
        if b[at] == b'"' {
            return Some(at);
        }
        at += 2;
    }
    // A long string: memchr from here (the words above are not searched again).
    loop {
        at += memchr::memchr(b'"', b.get(at..)?)?;
        let backslashes = b[from..at]
            .iter()
            .rev()
            .take_while(|&&c| c == b'\\')
            .count();
        if backslashes % 2 == 0 {
            return Some(at);
        }
        at += 1;
    }
}

/// Index just past the value that starts at `i`: a string to its closing quote, an object or
/// array to the bracket that closes it (strings inside skipped whole), anything else (numbers,
/// `true`, `null`) to the next delimiter.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i + 1).map(|e| e + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match *b.get(j)? {
                    b'"' => {
                        j = string_end(b, j + 1)?;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let n = b[i..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(b.len() - i);
            (n > 0).then_some(i + n)
        }
    }
}

/// The members of a JSON object, in order: each key as written (between its quotes, escapes
/// not decoded) and the text of its value. Ends at the object's end, or at the first thing
/// that is not a member. Besides iterating, a caller can take keys one at a time
/// ([`Members::next_key`]) and either skip each value ([`Members::value`]) or read it in
/// place and [`Members::resume`] after it: a nested object is then scanned once, not skipped
/// and scanned again.
pub struct Members<'a> {
    text: &'a str,
    /// Where the next member (or the comma before it) is looked for; `None` once ended.
    at: Option<usize>,
    first: bool,
    /// Just past the closing brace, once reached.
    end: Option<usize>,
}

/// The members of the object `text` holds (leading whitespace allowed).
pub fn members(text: &str) -> Members<'_> {
    members_at(text, 0)
}

/// The members of the object that starts at `text[at..]` (leading whitespace allowed).
pub fn members_at(text: &str, at: usize) -> Members<'_> {
    let b = text.as_bytes();
    let i = skip_ws(b, at);
    Members {
        text,
        at: (b.get(i) == Some(&b'{')).then_some(i + 1),
        first: true,
        end: None,
    }
}

impl<'a> Members<'a> {
    /// The next member's key and where its value starts (an index into the whole text).
    pub fn next_key(&mut self) -> Option<(&'a [u8], usize)> {
        let b = self.text.as_bytes();
        let mut i = skip_ws(b, self.at.take()?);
        if b.get(i) == Some(&b'}') {
            self.end = Some(i + 1);
            return None;
        }
        if !self.first {
            if b.get(i) != Some(&b',') {
                return None;
            }
            i = skip_ws(b, i + 1);
        }
        self.first = false;
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let end = string_end(b, i + 1)?;
        let colon = skip_ws(b, end + 1);
        if b.get(colon) != Some(&b':') {
            return None;
        }
        Some((&b[i + 1..end], skip_ws(b, colon + 1)))
    }

    /// The text of the value starting at `at` (from [`Members::next_key`]); the walk goes on
    /// after it.
    pub fn value(&mut self, at: usize) -> Option<&'a str> {
        let end = value_end(self.text.as_bytes(), at)?;
        self.at = Some(end);
        self.text.get(at..end)
    }

    /// Goes on after a value the caller read itself, which ended just before `at`.
    pub fn resume(&mut self, at: usize) {
        self.at = Some(at);
    }

    /// Just past the object's closing brace, once the walk has reached it.
    pub fn end(&self) -> Option<usize> {
        self.end
    }

    /// The value of the first member named `key`, read no further than needed.
    pub fn find(mut self, key: &str) -> Option<&'a str> {
        loop {
            let (k, at) = self.next_key()?;
            let value = self.value(at)?;
            if k == key.as_bytes() {
                return Some(value);
            }
        }
    }
}

impl<'a> Iterator for Members<'a> {
    type Item = (&'a [u8], &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let (key, at) = self.next_key()?;
        Some((key, self.value(at)?))
    }
}

/// Index of the last byte before `end` that is not JSON whitespace.
pub fn last_non_ws(b: &[u8], end: usize) -> Option<usize> {
    b.get(..end)?
        .iter()
        .rposition(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
}

/// Index of the quote that opens the string whose closing quote is at `close`: the nearest
/// quote before it that no odd run of backslashes precedes (JSON has no backslash outside a
/// string, and inside one a quote is escaped exactly when an odd run precedes it).
fn string_start(b: &[u8], close: usize) -> Option<usize> {
    let mut end = close;
    loop {
        let at = memchr::memrchr(b'"', b.get(..end)?)?;
        let backslashes = b[..at].iter().rev().take_while(|&&c| c == b'\\').count();
        if backslashes % 2 == 0 {
            return Some(at);
        }
        end = at;
    }
}

/// Index of the first byte of the value whose last byte is at `last`, read backward: a string
/// to its opening quote, an object or array to the bracket that opens it (strings inside
/// skipped whole), anything else back to the delimiter before it.
fn value_start(b: &[u8], last: usize) -> Option<usize> {
    match *b.get(last)? {
        b'"' => string_start(b, last),
        b'}' | b']' => {
            let mut depth = 0usize;
            let mut j = last;
            loop {
                match *b.get(j)? {
                    b'"' => j = string_start(b, j)?,
                    b'}' | b']' => depth += 1,
                    b'{' | b'[' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j);
                        }
                    }
                    _ => {}
                }
                j = j.checked_sub(1)?;
            }
        }
        _ => {
            let n = b[..=last]
                .iter()
                .rev()
                .position(|c| matches!(c, b',' | b':' | b'[' | b'{' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(last + 1);
            (n > 0).then_some(last + 1 - n)
        }
    }
}

/// The members of a JSON object walked from its end, last member first: what the upstream
/// writes last (a response's usage) is read without skipping everything written before it.
/// A caller can take each member whole ([`Iterator::next`]) or look at where the next value
/// ends first ([`MembersRev::next_value_end`]) and decide whether to read it
/// ([`MembersRev::member`]); a large value it does not want is then never walked.
pub struct MembersRev<'a> {
    text: &'a str,
    /// Just past the members still to walk (the previous key's opening quote, at first the
    /// closing brace); `None` once ended.
    end: Option<usize>,
    first: bool,
}

/// The members of the object whose closing brace is at `close`, from the last.
pub fn members_rev(text: &str, close: usize) -> MembersRev<'_> {
    MembersRev {
        text,
        end: (text.as_bytes().get(close) == Some(&b'}')).then_some(close),
        first: true,
    }
}

impl<'a> MembersRev<'a> {
    /// Index of the last byte of the next member's value (walking backward); `None` at the
    /// object's opening brace or at anything that is not a member.
    pub fn next_value_end(&mut self) -> Option<usize> {
        let b = self.text.as_bytes();
        let mut i = last_non_ws(b, self.end.take()?)?;
        if b[i] == b'{' {
            return None;
        }
        if !self.first {
            if b[i] != b',' {
                return None;
            }
            i = last_non_ws(b, i)?;
        }
        self.first = false;
        Some(i)
    }

    /// The key and the text of the member whose value ends at `last` (from
    /// [`MembersRev::next_value_end`]); the walk goes on before its key.
    pub fn member(&mut self, last: usize) -> Option<(&'a [u8], &'a str)> {
        let b = self.text.as_bytes();
        let start = value_start(b, last)?;
        let colon = last_non_ws(b, start)?;
        if b[colon] != b':' {
            return None;
        }
        let quote = last_non_ws(b, colon)?;
        if b[quote] != b'"' {
            return None;
        }
        let open = string_start(b, quote)?;
        self.end = Some(open);
        Some((&b[open + 1..quote], self.text.get(start..=last)?))
    }

    /// Where the walk stands: just past the members still to walk (the last member taken
    /// starts here).
    pub fn position(&self) -> Option<usize> {
        self.end
    }
}

impl<'a> Iterator for MembersRev<'a> {
    type Item = (&'a [u8], &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let last = self.next_value_end()?;
        self.member(last)
    }
}

/// The value at `path` (keys of nested objects), reading nothing after it: the value of
/// `path[0]` is entered in place rather than skipped.
pub fn find<'a>(text: &'a str, path: &[&str]) -> Option<&'a str> {
    let (last, outer) = path.split_last()?;
    let mut m = members(text);
    for key in outer {
        m = loop {
            let (k, at) = m.next_key()?;
            if k == key.as_bytes() {
                break members_at(text, at);
            }
            m.value(at)?;
        };
    }
    m.find(last)
}

/// A string value's text: borrowed when it has no escapes, decoded when it has; `None` for
/// any other value (`null` included).
pub fn string(value: &str) -> Option<Cow<'_, str>> {
    let inner = value.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(value).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
    }
}

/// A non-negative integer value (digits only, as JSON writes one).
pub fn unsigned(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// The value of the top-level `type` key when it is a plain (unescaped) string.
pub fn type_value(text: &str) -> Option<&str> {
    let v = members(text).find("type")?;
    let inner = v.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains('\\')).then_some(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_in_order_with_values_skipped_whole() {
        let text =
            r#" { "a" : 1 , "b":{"x":[1,"]}",{"y":"\"}"}]},"c":"s\"q","d":null,"e":[],"f":-2.5e3}"#;
        let got: Vec<(String, &str)> = members(text)
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v))
            .collect();
        assert_eq!(
            got,
            [
                ("a".into(), "1"),
                ("b".into(), r#"{"x":[1,"]}",{"y":"\"}"}]}"#),
                ("c".into(), r#""s\"q""#),
                ("d".into(), "null"),
                ("e".into(), "[]"),
                ("f".into(), "-2.5e3"),
            ]
        );
        assert_eq!(members("{}").count(), 0);
        assert_eq!(members("[1]").count(), 0);
        assert_eq!(members("").count(), 0);
    }

    #[test]
    fn malformed_text_ends_the_scan_without_panicking() {
        for text in [
            r#"{"a":"#,
            r#"{"a":1"#,
            r#"{"a":"unterminated"#,
            r#"{"a":{"b":[1,2}"#,
            r#"{"a" 1}"#,
            r#"{"a":1 "b":2}"#,
            r#"{a:1}"#,
            r#"{"a":"\"#,
            "{\"a\":\"é\\",
            "{\"é\":é}",
            r#"{"a":}"#,
            r#"{"a":1,}"#,
        ] {
            let n = members(text).count();
            assert!(n <= 1, "{text}: {n}");
            let _ = find(text, &["a", "b"]);
            let _ = type_value(text);
        }
        // Closing brackets of the wrong kind still balance the depth (not validated).
        assert_eq!(members(r#"{"a":[1},"b":2}"#).nth(1), Some((&b"b"[..], "2")));
    }

    /// Walked from the end, an object's members are its members in reverse, whatever ends
    /// its strings (escaped quotes, escaped backslashes) and however its values nest.
    #[test]
    fn members_from_the_end_are_the_members_in_reverse() {
        let pieces: [&str; 7] = ["a", "\\\"", "\\\\", "\\n", "é", "}", "[,:"];
        let seed = std::cell::Cell::new(11u64);
        let next = |n: usize| {
            seed.set(
                seed.get()
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407),
            );
            (seed.get() >> 33) as usize % n
        };
        let mut texts = vec![
            r#" { "a" : 1 , "b":{"x":[1,"]}",{"y":"\"}"}]},"c":"s\"q","d":null,"e":[],"f":-2.5e3 } "#
                .to_string(),
            "{}".to_string(),
            " {\n}\t".to_string(),
            r#"{"k":"\\"}"#.to_string(),
            r#"{"k\\":"\\\"","l":true}"#.to_string(),
        ];
        for _ in 0..2000 {
            let members: Vec<String> = (0..next(5))
                .map(|_| {
                    let string = || {
                        let s: String = (0..next(6)).map(|_| pieces[next(pieces.len())]).collect();
                        format!("\"{s}\"")
                    };
                    let key = string();
                    let value = match next(5) {
                        0 => string(),
                        1 => format!("{{\"n\":[{},{{}}],\"m\":{}}}", string(), string()),
                        2 => format!("[{}, [], {{\"x\" : {}}}]", string(), string()),
                        3 => "-12.5".to_string(),
                        _ => "null".to_string(),
                    };
                    let ws = [" ", "", "\n "][next(3)];
                    format!("{ws}{key}{ws}:{ws}{value}{ws}")
                })
                .collect();
            texts.push(format!("{{{}}}", members.join(",")));
        }
        for text in &texts {
            assert!(
                serde_json::from_str::<serde_json::Value>(text).is_ok(),
                "{text}"
            );
            let close = last_non_ws(text.as_bytes(), text.len()).unwrap();
            let forward: Vec<_> = members(text).collect();
            let mut backward: Vec<_> = members_rev(text, close).collect();
            backward.reverse();
            assert_eq!(forward, backward, "{text}");
        }
    }

    #[test]
    fn malformed_text_ends_the_walk_from_the_end_without_panicking() {
        for text in [
            r#"{"a":"#,
            r#""a":1}"#,
            r#"{"a":"unterminated}"#,
            r#"{"a":{"b":[1,2}}"#,
            r#"{"a" 1}"#,
            r#"{"a":1 "b":2}"#,
            r#"{a:1}"#,
            r#"{"a":\"}"#,
            "{\"é\":é}",
            r#"{"a":}"#,
            r#"{,"a":1}"#,
            r#"}"#,
            r#"{"a":"\\\"}"#,
            "",
        ] {
            let b = text.as_bytes();
            for close in 0..=b.len() {
                let n = members_rev(text, close).count();
                assert!(n <= 2, "{text}: {n}");
            }
            assert_eq!(last_non_ws(b, b.len() + 1), None);
        }
    }

    #[test]
    fn find_enters_the_path_and_stops_at_the_value() {
        let text =
            r#"{"type":"response.created","response":{"id":"resp_1","instructions":"unterminated"#;
        assert_eq!(find(text, &["response", "id"]), Some(r#""resp_1""#));
        assert_eq!(find(text, &["type"]), Some(r#""response.created""#));
        assert_eq!(find(text, &["response", "status"]), None);
        assert_eq!(find(r#"{"a":{"b":{"c":7}}}"#, &["a", "b", "c"]), Some("7"));
        assert_eq!(find(r#"{"a":[{"b":1}]}"#, &["a", "b"]), None);
        // The first of repeated keys.
        assert_eq!(find(r#"{"a":1,"a":2}"#, &["a"]), Some("1"));
    }

    #[test]
    fn plain_string_end_finds_the_first_quote_unless_a_backslash_comes_first() {
        // Every position of the first quote and of the first backslash, in and past the
        // eight-byte words and past the 32 bytes searched in a register, from every starting
        // offset; bytes that differ from `"` or `\` by one bit or by a borrow (`!`, `#`,
        // 0xA2, `[`, `]`, 0xDC) must not match.
        let filler = [b'!', b'#', 0xA2, b'a', b'[', b']', 0xDC];
        for len in 0..80usize {
            for quote in (0..len).map(Some).chain([None]) {
                for backslash in [None, Some(len / 3), Some(len.saturating_sub(1))] {
                    let mut b: Vec<u8> = (0..len).map(|i| filler[i % filler.len()]).collect();
                    if let Some(q) = quote {
                        b[q] = b'"';
                        if q + 1 < len {
                            b[q + 1] = b'"';
                        }
                    }
                    if let Some(k) = backslash.filter(|&k| k < len) {
                        b[k] = b'\\';
                    }
                    for from in 0..=len {
                        let first = b[from..]
                            .iter()
                            .position(|&c| c == b'"' || c == b'\\')
                            .map(|i| from + i);
                        let want = first.filter(|&i| b[i] == b'"');
                        assert_eq!(
                            plain_string_end(&b, from),
                            want,
                            "len {len} quote {quote:?} backslash {backslash:?} from {from}"
                        );
                    }
                    assert_eq!(plain_string_end(&b, len + 1), None);
                }
            }
        }
    }

    #[test]
    fn string_end_skips_escapes_at_every_offset() {
        // The reference: a byte at a time, an escape skipping the byte after it.
        fn reference(b: &[u8], from: usize) -> Option<usize> {
            let mut i = from;
            while i < b.len() {
                match b[i] {
                    b'"' => return Some(i),
                    b'\\' => i += 2,
                    _ => i += 1,
                }
            }
            None
        }
        // Strings of escaped quotes and backslashes at every position around the eight-byte
        // words and the 32 bytes read in a register, closed or not.
        let pieces: [&[u8]; 6] = [b"a", b"\\\"", b"\\\\", b"\\n", b"\xc3\xa9", b"\\"];
        let mut seed = 7u64;
        for _ in 0..4000 {
            let mut body = Vec::new();
            let len = (seed % 23) as usize;
            for _ in 0..len {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                body.extend_from_slice(pieces[(seed >> 33) as usize % pieces.len()]);
            }
            if !seed.is_multiple_of(3) {
                body.push(b'"');
            }
            body.extend_from_slice(b"tail\"x");
            assert_eq!(
                string_end(&body, 0),
                reference(&body, 0),
                "{:?}",
                String::from_utf8_lossy(&body)
            );
            let shifted = [b"xxxxx".as_slice(), &body].concat();
            assert_eq!(string_end(&shifted, 5), reference(&shifted, 5));
        }
    }

    #[test]
    fn strings_and_numbers() {
        assert!(matches!(string(r#""plain""#), Some(Cow::Borrowed("plain"))));
        assert_eq!(string(r#""a\"b\u0041""#).as_deref(), Some("a\"bA"));
        assert_eq!(string("null"), None);
        assert_eq!(string("12"), None);
        assert_eq!(string(r#""bad \q""#), None);
        assert_eq!(unsigned("12"), Some(12));
        for bad in ["", "-1", "1.5", "1e3", "+1", "99999999999999999999999"] {
            assert_eq!(unsigned(bad), None, "{bad}");
        }
    }
}
