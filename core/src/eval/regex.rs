//! Regular expressions of `matches` clauses, compiled under limits so that one definition cannot
//! cost the server (or a backend service holding the rules) more than a bounded amount of memory.
//!
//! Two costs matter: the compiled program, bounded per pattern by regex-lite's size limit and
//! per flag or segment by a [`Budget`]; and the search cache regex-lite builds at the first match
//! (one per thread that evaluates), which grows with the program times its capture slots. A
//! clause only asks whether a pattern matches, so capture groups are compiled as non-capturing
//! groups: a pattern of 60 groups cost 1.3 MB after its first search, and 62 KB without them.

use std::borrow::Cow;

use regex_lite::{Regex, RegexBuilder};

/// Longest regular expression accepted, in characters.
pub const MAX_REGEX_LEN: usize = 1024;
/// Most memory one compiled regular expression may use.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Most memory the regular expressions of one flag or one segment may use together.
pub const REGEX_BUDGET: usize = 2 * 1024 * 1024;

/// What a flag's or segment's patterns may still use.
#[derive(Debug)]
pub(super) struct Budget {
    left: usize,
}

impl Budget {
    /// The budget of one flag or segment.
    pub(super) fn new() -> Budget {
        Budget { left: REGEX_BUDGET }
    }
}

/// Compiles `pattern`, charging its size (rounded up to a power of four from 1 KiB: regex-lite
/// does not report the exact size, only whether it fits a limit) to `budget`.
pub(super) fn compile(pattern: &str, budget: &mut Budget) -> Result<Regex, String> {
    if pattern.chars().count() > MAX_REGEX_LEN {
        return Err(format!(
            "regular expression longer than {MAX_REGEX_LEN} characters"
        ));
    }
    let pattern = without_captures(pattern);
    let mut limit = 1024;
    loop {
        let cap = limit.min(REGEX_SIZE_LIMIT);
        match RegexBuilder::new(&pattern).size_limit(cap).build() {
            Ok(_) if cap > budget.left => {
                return Err(format!(
                    "the regular expressions of this flag or segment compile to more than {} KiB together; simplify them or split the definition",
                    REGEX_BUDGET / 1024
                ));
            }
            Ok(re) => {
                budget.left -= cap;
                return Ok(re);
            }
            Err(e) if cap < REGEX_SIZE_LIMIT && e.to_string().contains("size limit") => {
                limit *= 4;
            }
            Err(e) if e.to_string().contains("size limit") => {
                return Err(format!(
                    "regular expression compiles to more than {} KiB",
                    REGEX_SIZE_LIMIT / 1024
                ));
            }
            Err(e) => return Err(format!("invalid regular expression: {e}")),
        }
    }
}

/// `pattern` with every capture group (`(…)`, `(?P<name>…)`, `(?<name>…)`) made non-capturing
/// (`(?:…)`): the same matches, without the capture slots. Escapes and character classes are
/// left alone; a pattern in verbose mode (`x` flag), whose comments the scan would misread, is
/// returned unchanged.
fn without_captures(pattern: &str) -> Cow<'_, str> {
    let bytes = pattern.as_bytes();
    if !bytes.contains(&b'(') || has_verbose_flag(pattern) {
        return Cow::Borrowed(pattern);
    }
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut i = 0;
    // Depth of character classes we are in (they nest: `[a-z[0-9]]`).
    let mut class = 0usize;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\\' => {
                // An escape and the character it escapes, whatever it is.
                let end = next_char(pattern, i + 1);
                out.push_str(&pattern[i..end]);
                i = end;
                continue;
            }
            b'[' if class > 0 && bytes.get(i + 1) == Some(&b':') => {
                // `[:alpha:]` inside a class: copy through its `:]`.
                let end = pattern[i + 2..]
                    .find(":]")
                    .map_or(bytes.len(), |p| i + 2 + p + 2);
                out.push_str(&pattern[i..end]);
                i = end;
                continue;
            }
            b'[' => {
                class += 1;
                out.push('[');
                i += 1;
                // A `]` right after `[` or `[^` is a literal, not the end.
                if bytes.get(i) == Some(&b'^') {
                    out.push('^');
                    i += 1;
                }
                if bytes.get(i) == Some(&b']') {
                    out.push(']');
                    i += 1;
                }
                continue;
            }
            b']' if class > 0 => class -= 1,
            b'(' if class == 0 => {
                let rest = &pattern[i + 1..];
                if !rest.starts_with('?') {
                    out.push_str("(?:");
                    i += 1;
                    continue;
                }
                // A named group: `(?P<name>` or `(?<name>` (not a lookaround `(?<=`).
                let named = ["?P<", "?<"].iter().find_map(|prefix| {
                    let name = rest.strip_prefix(prefix)?;
                    if name.starts_with(['=', '!']) {
                        return None;
                    }
                    name.find('>').map(|close| prefix.len() + close + 1)
                });
                if let Some(len) = named {
                    out.push_str("(?:");
                    i += 1 + len;
                    continue;
                }
            }
            _ => {}
        }
        let end = next_char(pattern, i);
        out.push_str(&pattern[i..end]);
        i = end;
    }
    Cow::Owned(out)
}

/// The index after the character starting at `i` (or the end).
fn next_char(s: &str, i: usize) -> usize {
    s[i.min(s.len())..]
        .chars()
        .next()
        .map_or(s.len(), |c| i + c.len_utf8())
}

/// Whether the pattern turns on verbose mode anywhere (`(?x)`, `(?ix:`, …).
fn has_verbose_flag(pattern: &str) -> bool {
    pattern.match_indices("(?").any(|(at, _)| {
        pattern[at + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphabetic() || *c == '-')
            .any(|c| c == 'x')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_groups_become_non_capturing_and_nothing_else_changes() {
        for (pattern, expected) in [
            ("(a|b)c", "(?:a|b)c"),
            ("(?:a)(b)", "(?:a)(?:b)"),
            (
                "(?P<year>[0-9]{4})-(?<m>[0-9]{2})",
                "(?:[0-9]{4})-(?:[0-9]{2})",
            ),
            (r"\(a\)", r"\(a\)"),
            ("[(]x[)]", "[(]x[)]"),
            ("[]()]", "[]()]"),
            ("[^]()](y)", "[^]()](?:y)"),
            ("[a-z[(]](z)", "[a-z[(]](?:z)"),
            ("[[:alpha:]](w)", "[[:alpha:]](?:w)"),
            ("(?i)(é|ü)", "(?i)(?:é|ü)"),
            ("(?i:(a))", "(?i:(?:a))"),
            ("no groups", "no groups"),
        ] {
            assert_eq!(without_captures(pattern), expected, "{pattern}");
        }
        // Verbose mode is left alone: its comments would be misread.
        assert_eq!(without_captures("(?x) (a) # (b"), "(?x) (a) # (b");
    }

    #[test]
    fn the_rewritten_pattern_matches_exactly_what_the_original_does() {
        let patterns = [
            "^(user|admin)-[0-9]+$",
            r"^(?P<local>[^@]+)@(vane\.dev|example\.com)$",
            "([a-c]+)(\\1)?",
            "[(]([0-9]+)[)]",
            "^v?([0-9]+)\\.([0-9]+)(\\.[0-9]+)?(-[a-z.]+)?$",
        ];
        let inputs = [
            "user-12",
            "admin-x",
            "a@vane.dev",
            "b@example.org",
            "(42)",
            "(4",
            "v1.2",
            "1.2.3-rc.1",
            "abc",
            "",
            "user-",
        ];
        for p in patterns {
            let Ok(original) = Regex::new(p) else {
                continue; // a pattern regex-lite refuses either way
            };
            let rewritten = Regex::new(&without_captures(p)).unwrap();
            for s in inputs {
                assert_eq!(original.is_match(s), rewritten.is_match(s), "{p} on {s:?}");
            }
        }
    }

    #[test]
    fn a_definitions_patterns_share_one_budget() {
        let mut budget = Budget::new();
        let heavy = "a{0,40}b{0,40}c{0,40}".repeat(8); // ~80 KB compiled
        let mut compiled = 0;
        let refused = loop {
            match compile(&heavy, &mut budget) {
                Ok(_) => compiled += 1,
                Err(e) => break e,
            }
            assert!(compiled < 100, "the budget never ran out");
        };
        assert!(
            refused.contains("compile to more than 2048 KiB together"),
            "{refused}"
        );
        assert!((4..=32).contains(&compiled), "{compiled} patterns fit");
        // A fresh definition starts with a fresh budget; small patterns cost little.
        let mut budget = Budget::new();
        for _ in 0..1000 {
            compile("^user-[0-9]+$", &mut budget).unwrap();
        }
        let too_big = compile(&"[a-z]{1,100}".repeat(40), &mut Budget::new()).unwrap_err();
        assert!(too_big.contains("more than 256 KiB"), "{too_big}");
        let bad = compile("(", &mut Budget::new()).unwrap_err();
        assert!(bad.starts_with("invalid regular expression"), "{bad}");
    }
}
