//! Text from elsewhere made safe to print.

/// `text` with control characters (terminal escapes, line breaks) and invisible or
/// direction-changing format characters written as `\u{..}` escapes. What narpost prints
/// and logs comes partly from elsewhere: names of files someone left in the queue, a cache
/// server's error message; none of it may drive a terminal or fake a line of a report or a
/// log. (JSON output needs nothing of this: JSON escapes control characters itself.)
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let invisible = matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}');
        if c.is_control() || invisible {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_what_could_drive_a_terminal() {
        assert_eq!(printable("plain ü name"), "plain ü name");
        assert_eq!(printable("a\u{1b}[2Jb\nc"), "a\\u{1b}[2Jb\\u{a}c");
        assert_eq!(printable("x\u{202e}y"), "x\\u{202e}y");
    }
}
