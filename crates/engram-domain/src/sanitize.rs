//! Turns untrusted text into what Engram stores: no control characters, no markup,
//! no script URIs, single spaces.

use std::sync::LazyLock;

use crate::text::is_python_whitespace;

/// Markup is parsed by an HTML5 parser (ammonia/html5ever) that keeps no tag at all, and
/// drops the text inside elements whose text is code or hidden.
static MARKUP_STRIPPER: LazyLock<ammonia::Builder<'static>> = LazyLock::new(|| {
    let mut builder = ammonia::Builder::empty();
    builder.clean_content_tags(
        [
            "script", "style", "iframe", "noscript", "template", "object", "embed", "applet",
            "frame", "frameset", "noembed", "noframes", "xmp",
        ]
        .into(),
    );
    builder
});

/// URI schemes that make a browser run code, matched case-insensitively and removed.
const SCRIPT_URI_SCHEMES: [&str; 3] = ["javascript:", "vbscript:", "data:text/html"];

/// Sanitizes content for storage. The result may be empty, which callers reject.
///
/// Control characters become spaces (so `a\0b` reads `a b`, as in the reference design),
/// markup is removed, a `<` or `>` left in plain text stays escaped as `&lt;`/`&gt;` so
/// stored text can never form a tag, script URI schemes are removed, and whitespace runs
/// collapse to one space with none at either end.
pub fn sanitize_text(raw: &str) -> String {
    collapse_whitespace(&remove_script_uris(without_markup(without_controls(raw))))
}

/// Text without `<`, `>`, `&` or a no-break space comes out of the parser exactly as it went
/// in (the serializer escapes only those), so it skips the parser: most text an agent
/// stores, and most metadata values, are plain.
fn without_markup(text: String) -> String {
    if text.contains(['<', '>', '&', '\u{A0}']) {
        through_parser(&text)
    } else {
        text
    }
}

fn through_parser(text: &str) -> String {
    let serialized = MARKUP_STRIPPER
        .clean(text)
        .to_string()
        .replace("&nbsp;", " ")
        .replace("&amp;", "&");
    // Again: the parser decodes character references, so `&#1;` or `&#x202E;` come out as
    // the characters they name.
    without_controls(&serialized)
}

/// Drops invisible controls and turns every other control character into a space.
fn without_controls(text: &str) -> String {
    text.chars()
        .filter(|c| !is_invisible_control(*c))
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Bidirectional overrides and isolates reorder how text displays and hide what it says.
fn is_invisible_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

fn remove_script_uris(mut text: String) -> String {
    // Every scheme holds a colon, and most text has none: it needs no lowercased copy.
    if !text.contains(':') {
        return text;
    }
    // Repeat until stable: removing one scheme may join the halves of another.
    loop {
        let lowered = text.to_ascii_lowercase();
        let found = SCRIPT_URI_SCHEMES
            .iter()
            .filter_map(|scheme| lowered.find(scheme).map(|at| (at, scheme.len())))
            .min();
        match found {
            // ASCII lowercasing keeps byte offsets, so they index `text` too.
            Some((at, len)) => text.replace_range(at..at + len, ""),
            None => return text,
        }
    }
}

/// Collapses runs of whitespace (Python's definition, as the content hash uses) to one space.
pub fn collapse_whitespace(text: &str) -> String {
    let mut collapsed = String::with_capacity(text.len());
    for word in text
        .split(is_python_whitespace)
        .filter(|word| !word.is_empty())
    {
        if !collapsed.is_empty() {
            collapsed.push(' ');
        }
        collapsed.push_str(word);
    }
    collapsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_bytes_and_space_runs_become_single_spaces() {
        assert_eq!(
            sanitize_text("Test\x00with\x00null\x00bytes   and    extra     spaces"),
            "Test with null bytes and extra spaces"
        );
    }

    #[test]
    fn script_elements_vanish_with_their_code() {
        assert_eq!(sanitize_text("<script>alert('xss')</script>"), "");
        assert_eq!(
            sanitize_text("hi <script>alert(1)</script>there"),
            "hi there"
        );
        assert_eq!(sanitize_text("<img src=x onerror=alert(1)>"), "");
    }

    #[test]
    fn tags_go_but_their_text_stays() {
        assert_eq!(sanitize_text("<b>likes</b> <i>tea</i>"), "likes tea");
        assert_eq!(
            sanitize_text("<a href=\"javascript:alert(1)\">click</a>"),
            "click"
        );
    }

    #[test]
    fn script_uris_are_removed_even_when_nested() {
        assert_eq!(sanitize_text("javascript:alert(1)"), "alert(1)");
        assert_eq!(sanitize_text("JaVaScRiPt:alert(1)"), "alert(1)");
        assert_eq!(sanitize_text("javajavascript:script:x"), "x");
        assert_eq!(sanitize_text("vbscript:msgbox"), "msgbox");
    }

    #[test]
    fn plain_text_comparisons_stay_readable_but_inert() {
        assert_eq!(sanitize_text("Tom & Jerry"), "Tom & Jerry");
        assert_eq!(sanitize_text("a < b"), "a &lt; b");
        assert!(!sanitize_text("<<script>script>alert(1)<</script>/script>").contains('<'));
    }

    #[test]
    fn bidi_overrides_are_dropped_and_unicode_kept() {
        assert_eq!(sanitize_text("abc\u{202E}def"), "abcdef");
        assert_eq!(
            sanitize_text("Zoë prefers 日本語 👩‍💻"),
            "Zoë prefers 日本語 👩‍💻"
        );
    }

    #[test]
    fn character_references_cannot_smuggle_controls_in() {
        assert_eq!(sanitize_text("&#1A"), "A");
        assert_eq!(sanitize_text("a&#0;b&#x1b;c"), "a\u{FFFD}b c");
        assert_eq!(sanitize_text("abc&#x202E;def"), "abcdef");
    }

    #[test]
    fn python_only_whitespace_separates_words() {
        assert_eq!(collapse_whitespace("a\u{1c}b\u{3000} c "), "a b c");
    }

    /// What `sanitize_text` would be if every text went through the parser.
    fn sanitized_through_parser(raw: &str) -> String {
        collapse_whitespace(&remove_script_uris(through_parser(&without_controls(raw))))
    }

    #[test]
    fn plain_text_skips_the_parser_and_comes_out_the_same() {
        let plain = |c: char| !matches!(c, '<' | '>' | '&' | '\u{A0}');
        // Every character from U+0020 to U+33FF and of the emoji blocks, in runs of 64.
        let everything: Vec<char> = (0x20..0x3400u32)
            .chain(0x1F300..0x1F700)
            .filter_map(char::from_u32)
            .filter(|c| plain(*c))
            .collect();
        for run in everything.chunks(64) {
            let text: String = run.iter().collect();
            assert_eq!(
                sanitize_text(&text),
                sanitized_through_parser(&text),
                "{text:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn skipping_the_parser_changes_nothing(raw in "\\PC{0,80}|[a-z\"'=/!\\-\\] \\x00-\\x1f\u{A0}<>&#;]{0,40}") {
            proptest::prop_assert_eq!(sanitize_text(&raw), sanitized_through_parser(&raw));
        }

        #[test]
        fn output_never_carries_markup_controls_or_edge_spaces(raw in "\\PC{0,80}|[<>a-z\"'=/ \\x00-\\x1f]{0,80}") {
            let clean = sanitize_text(&raw);
            proptest::prop_assert!(!clean.contains('<') && !clean.contains('>'));
            proptest::prop_assert!(!clean.chars().any(|c| c.is_control()));
            proptest::prop_assert!(!clean.starts_with(' ') && !clean.ends_with(' '));
            proptest::prop_assert!(!clean.contains("  "));
            proptest::prop_assert!(!clean.to_ascii_lowercase().contains("javascript:"));
        }
    }
}
