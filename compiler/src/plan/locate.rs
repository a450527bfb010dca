//! Where a value of a JSON text lies: a JSON pointer (`/plan/mesh/data`) to
//! its line and column, so that a problem found in the decoded document can
//! point at the text it came from.
//!
//! Input: the text of a JSON document and a JSON pointer (RFC 6901).
//! Output: the 1-based line and column (in bytes, as serde_json counts
//! them) where the value the pointer names starts, or None.
//!
//! Invariants: the text is only scanned, never trusted: a pointer that names
//! nothing, or text that is not well-formed JSON, gives None, never a panic,
//! and every step moves forward, so the scan ends. In an object with a key
//! twice, the first is found.

/// The line and column where the value at `pointer` starts in `text`.
pub fn line_column(text: &[u8], pointer: &str) -> Option<(usize, usize)> {
    let at = offset(text, pointer)?;
    let before = text.get(..at)?;
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = at - before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
    Some((line, column))
}

/// The byte offset where the value at `pointer` starts in `text`.
fn offset(text: &[u8], pointer: &str) -> Option<usize> {
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return None;
    }
    let mut at = space(text, 0);
    for token in pointer.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        match *text.get(at)? {
            b'{' => {
                at = space(text, at + 1);
                loop {
                    let (key, end) = string(text, at)?;
                    at = space(text, end);
                    if *text.get(at)? != b':' {
                        return None;
                    }
                    at = space(text, at + 1);
                    if key == token {
                        break;
                    }
                    at = space(text, value(text, at)?);
                    if *text.get(at)? != b',' {
                        return None;
                    }
                    at = space(text, at + 1);
                }
            }
            b'[' => {
                let index: usize = token.parse().ok()?;
                at = space(text, at + 1);
                for _ in 0..index {
                    at = space(text, value(text, at)?);
                    if *text.get(at)? != b',' {
                        return None;
                    }
                    at = space(text, at + 1);
                }
                if matches!(text.get(at), None | Some(b']')) {
                    return None;
                }
            }
            _ => return None,
        }
    }
    (at < text.len()).then_some(at)
}

/// The first byte at or after `at` that is not JSON whitespace.
fn space(text: &[u8], mut at: usize) -> usize {
    while text.get(at).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// The string starting at `at` (decoded) and the offset just past it.
fn string(text: &[u8], at: usize) -> Option<(String, usize)> {
    let end = string_end(text, at)?;
    let raw = text.get(at..end)?;
    let s = if raw.contains(&b'\\') { serde_json::from_slice(raw).ok()? } else { String::from_utf8_lossy(raw.get(1..raw.len() - 1)?).into_owned() };
    Some((s, end))
}

/// The offset just past the string starting at `at`.
fn string_end(text: &[u8], at: usize) -> Option<usize> {
    if *text.get(at)? != b'"' {
        return None;
    }
    let mut i = at + 1;
    loop {
        match *text.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// The offset just past the value starting at `at`.
fn value(text: &[u8], at: usize) -> Option<usize> {
    match *text.get(at)? {
        b'"' => string_end(text, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            loop {
                match *text.get(i)? {
                    b'"' => {
                        i = string_end(text, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let mut i = at;
            while text.get(i).is_some_and(|b| !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')) {
                i += 1;
            }
            (i > at).then_some(i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::line_column;

    #[test]
    fn pointers_find_their_values() {
        let text = br#"{
  "a": {"b\"c": [1, {"d": "x,]}"}, [2, 3]], "e": null},
  "f": 7
}"#;
        assert_eq!(line_column(text, ""), Some((1, 1)));
        assert_eq!(line_column(text, "/a"), Some((2, 8)));
        assert_eq!(line_column(text, "/a/b\"c/0"), Some((2, 18)));
        assert_eq!(line_column(text, "/a/b\"c/1/d"), Some((2, 27)));
        assert_eq!(line_column(text, "/a/b\"c/2/1"), Some((2, 40)));
        assert_eq!(line_column(text, "/a/e"), Some((2, 50)));
        assert_eq!(line_column(text, "/f"), Some((3, 8)));
    }

    #[test]
    fn what_is_not_there_is_none() {
        let text = br#"{"a": [1, 2], "b": {"c": 1}}"#;
        for p in ["/x", "/a/2", "/a/x", "/b/c/d", "a", "/a/-1", "/b/c/0"] {
            assert_eq!(line_column(text, p), None, "{p}");
        }
        for broken in [&b"{\"a\": [1"[..], b"{\"a\"", b"{\"a\": \"x", b"]]]", b"", b"{\"z\": 1, \"a"] {
            assert_eq!(line_column(broken, "/a/1"), None);
        }
    }
}
